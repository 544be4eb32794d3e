"""torchfile.py owns the ``torch.save`` containers: the zip format (since torch 1.6) and the legacy stream.

It finds ``data.pkl`` and the storage records inside the zip with :mod:`zipfile` (pure Python, so corrupt
bytes raise instead of crashing), memory-maps the file once and hands the inert unpickler flat views of
each storage, like ``torch.load(mmap=True)``. A zip embedded in a larger file (a DCP ``.distcp`` item) is
read through a byte window. It interprets nothing in the tree: :mod:`nanguard.ckpt.formats` does.
"""

from __future__ import annotations

import io
import mmap
import os
import pickle
import struct
import zipfile
from pathlib import Path
from typing import Any

import torch

from nanguard.ckpt.pickle_scan import (
    INFLATE_SLACK_BYTES,
    MAX_INFLATE_RATIO,
    MAX_INFLATED_PICKLE_BYTES,
    CheckpointLimit,
    inert_load_bounded,
)

ZIP_MAGIC = b"PK\x03\x04"
LEGACY_MAGIC_NUMBER = 0x1950A86A20F9469CFC6C
LEGACY_PROTOCOL_VERSION = 1001
_TEXT_PICKLE_STARTS = (b"c", b"(", b"}", b"]", b"N", b"I", b"V", b"S")
"""First opcodes of protocol 0/1 pickles (GLOBAL, MARK, EMPTY_DICT, EMPTY_LIST, NONE, INT, UNICODE, STRING)."""
_LOCAL_HEADER = struct.Struct("<4s5H3L2H")


class Window(io.RawIOBase):
    """A read-only file view of ``length`` bytes at ``start`` of a larger file."""

    def __init__(self, file: io.BufferedReader, start: int, length: int) -> None:
        super().__init__()
        self._file, self._start, self._length, self._pos = file, start, length, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = 0) -> int:
        base = {0: 0, 1: self._pos, 2: self._length}[whence]
        self._pos = max(0, base + offset)
        return self._pos

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer).cast("B")
        count = max(0, min(len(view), self._length - self._pos))
        self._file.seek(self._start + self._pos)
        got = self._file.readinto(view[:count]) if count else 0
        self._pos += got or 0
        return got or 0


class MappedFile:
    """One memory map of a whole file as a uint8 tensor, shared by every storage read from it."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.size = path.stat().st_size
        self._bytes: torch.Tensor | None = None

    def bytes_at(self, start: int, nbytes: int) -> torch.Tensor:
        """A uint8 view of ``nbytes`` at ``start``, mapped (copy-on-write) rather than read."""
        if start < 0 or nbytes < 0 or start + nbytes > self.size:
            raise pickle.UnpicklingError(f"storage of {nbytes} bytes at {start} lies outside {self.size}-byte file")
        if nbytes == 0:
            return torch.empty(0, dtype=torch.uint8)
        if self._bytes is None:
            try:
                storage = torch.UntypedStorage.from_file(str(self.path), shared=False, nbytes=self.size)
                self._bytes = torch.empty(0, dtype=torch.uint8).set_(storage, 0, (self.size,), (1,))  # type: ignore[arg-type]
            except (RuntimeError, OSError):  # no mmap here (special files): read the bytes instead
                with self.path.open("rb") as f:
                    f.seek(start)
                    return torch.frombuffer(bytearray(f.read(nbytes)), dtype=torch.uint8)
        return self._bytes[start : start + nbytes]


def typed_view(raw: torch.Tensor, dtype: torch.dtype, numel: int) -> torch.Tensor:
    """``numel`` elements of ``dtype`` from the uint8 tensor ``raw`` (a copy only when misaligned)."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    if raw.numel() < numel * itemsize:
        raise pickle.UnpicklingError(f"storage holds {raw.numel()} bytes, needs {numel * itemsize}")
    raw = raw[: numel * itemsize]
    if itemsize == 1:
        return raw.view(dtype)
    try:
        return raw.view(dtype)
    except RuntimeError:  # offset not a multiple of the element size
        return raw.clone().view(dtype)


def read_zip(mapped: MappedFile, start: int = 0, length: int | None = None) -> tuple[Any, list[str]]:
    """Read a torch zip checkpoint (whole file, or the window ``[start, start + length)``) inertly.

    Returns:
        The object tree and the globals its pickle references.
    """
    length = mapped.size - start if length is None else length
    with mapped.path.open("rb") as raw:
        stream = Window(raw, start, length) if (start or length != mapped.size) else raw
        with zipfile.ZipFile(stream) as zf:
            infos = {info.filename: info for info in zf.infolist()}
            pickles = [n for n in infos if n.endswith("data.pkl") and n.count("/") == 1]
            if len(pickles) != 1:
                raise pickle.UnpicklingError("zip holds no torch data.pkl record")
            prefix = pickles[0][: -len("data.pkl")]
            byteorder = infos.get(prefix + "byteorder")
            if byteorder is not None and read_member(zf, byteorder, 16).strip() not in (b"little", b""):
                raise pickle.UnpicklingError("big-endian checkpoints are not supported")
            pickle_info = infos[pickles[0]]
            stored = pickle_info.compress_type == zipfile.ZIP_STORED
            data = read_member(zf, pickle_info, length if stored else MAX_INFLATED_PICKLE_BYTES)
            inflated = [0, 0]  # bytes inflated from compressed storage records, and their compressed bytes

            def load_storage(key: str, dtype: torch.dtype, numel: int) -> torch.Tensor:
                info = infos.get(f"{prefix}data/{key}")
                if info is None:
                    raise pickle.UnpicklingError(f"storage record {key!r} is missing")
                nbytes = numel * _dtype_itemsize(dtype)
                if info.compress_type != zipfile.ZIP_STORED:
                    # Inflate only the bytes the pickle asks for, and only within the budget: checked before
                    # inflating, so a zip bomb costs nothing.
                    inflated[0] += nbytes
                    inflated[1] += info.compress_size
                    budget = INFLATE_SLACK_BYTES + MAX_INFLATE_RATIO * inflated[1]
                    if inflated[0] > budget:
                        raise CheckpointLimit(
                            f"compressed storage records would inflate to {inflated[0]} bytes, over the limit of "
                            f"{budget} (64 MiB + {MAX_INFLATE_RATIO}x their compressed size)"
                        )
                    raw = read_member(zf, info, nbytes)
                    return typed_view(torch.frombuffer(bytearray(raw), dtype=torch.uint8), dtype, numel)
                stream.seek(info.header_offset)
                header = stream.read(_LOCAL_HEADER.size)
                if len(header) != _LOCAL_HEADER.size or header[:4] != ZIP_MAGIC:
                    raise pickle.UnpicklingError(f"storage record {key!r} has a bad local header")
                fields = _LOCAL_HEADER.unpack(header)
                offset = info.header_offset + _LOCAL_HEADER.size + fields[-2] + fields[-1]
                return typed_view(mapped.bytes_at(start + offset, info.file_size), dtype, numel)

            root, globals_, _ = inert_load_bounded(data, load_storage=load_storage)
            return root, globals_


def read_member(zf: zipfile.ZipFile, info: zipfile.ZipInfo, limit: int) -> bytes:
    """The bytes of zip member ``info``, reading (inflating) at most ``limit``: the declared size can lie.

    Raises:
        CheckpointLimit: the member holds more than ``limit`` bytes (only past ``limit`` is it refused).
    """
    with zf.open(info) as member:
        data = member.read(limit + 1)
    if len(data) > limit:
        if info.compress_type == zipfile.ZIP_STORED:
            raise CheckpointLimit(f"zip member {info.filename} is larger than the {limit} bytes it may hold")
        mib = limit / (1024 * 1024)
        raise CheckpointLimit(f"zip member {info.filename} inflates past the limit of {mib:g} MiB")
    return data


def _dtype_itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def read_legacy(mapped: MappedFile) -> tuple[Any, list[str]]:
    """Read a pre-1.6 ``torch.save`` stream: magic, protocol, sys info, object, storage keys, raw storages.

    Each pickle is scanned for its exact extent and unpickled from that slice of a memory map (the raw
    storages after it are never read into memory). The storages follow the object pickle, so the object is
    unpickled twice: first with placeholder meta storages to learn each storage's dtype, then with views of
    the mapped file.
    """
    with mapped.path.open("rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
        magic, _, pos = inert_load_bounded(data)
        if magic != LEGACY_MAGIC_NUMBER:
            raise pickle.UnpicklingError("not a torch checkpoint (bad magic number)")
        protocol, _, pos = inert_load_bounded(data, pos)
        if protocol != LEGACY_PROTOCOL_VERSION:
            raise pickle.UnpicklingError(f"unsupported legacy protocol {protocol!r}")
        _, _, object_start = inert_load_bounded(data, pos)  # sys_info
        dtypes: dict[str, tuple[torch.dtype, int]] = {}

        def placeholder(key: str, dtype: torch.dtype, numel: int) -> torch.Tensor:
            dtypes[key] = (dtype, numel)
            return torch.empty(numel, dtype=dtype, device="meta")

        _, _, pos = inert_load_bounded(data, object_start, load_storage=placeholder)
        keys, _, pos = inert_load_bounded(data, pos)
        if not isinstance(keys, list):
            raise pickle.UnpicklingError("legacy storage key list is missing")
        offsets: dict[str, int] = {}
        for key in map(str, keys):
            header = data[pos : pos + 8]
            if len(header) != 8 or key not in dtypes:
                raise pickle.UnpicklingError(f"legacy storage {key!r} is missing or truncated")
            numel = struct.unpack("<q", header)[0]
            dtype, _ = dtypes[key]
            offsets[key] = pos + 8
            pos += 8 + numel * _dtype_itemsize(dtype)

        def load_storage(key: str, dtype: torch.dtype, numel: int) -> torch.Tensor:
            if key not in offsets:
                raise pickle.UnpicklingError(f"legacy storage {key!r} is missing")
            nbytes = numel * _dtype_itemsize(dtype)
            return typed_view(mapped.bytes_at(offsets[key], nbytes), dtype, numel)

        root, globals_, _ = inert_load_bounded(data, object_start, load_storage=load_storage)
        return root, globals_


def read_pickle_file(mapped: MappedFile) -> tuple[Any, list[str]]:
    """Read a plain pickle file (no storages) inertly."""
    root, globals_, _ = inert_load_bounded(mapped.path.read_bytes())
    return root, globals_


def sniff(path: Path) -> str:
    """The container of file ``path``: ``zip``, ``legacy``, ``safetensors``, ``pickle`` or ``unknown``."""
    with path.open("rb") as f:
        head = f.read(16)
    if head.startswith(ZIP_MAGIC):
        return "zip"
    if head.startswith(b"\x80\x02\x8a\x0a"):
        return "legacy"
    if len(head) >= 9 and head[8:9] == b"{" and struct.unpack("<Q", head[:8])[0] < min(os.path.getsize(path), 1 << 28):
        return "safetensors"
    if (head[:1] == b"\x80" and len(head) > 1 and 2 <= head[1] <= 5) or head[:1] in _TEXT_PICKLE_STARTS:
        return "pickle"
    return "unknown"
