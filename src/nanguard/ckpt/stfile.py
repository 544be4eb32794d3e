"""stfile.py owns reading ``.safetensors`` files: JSON header, then raw little-endian tensor bytes.

The header is parsed and validated here (offsets inside the file, shapes matching byte spans, known
dtypes) and the tensors are views of one memory map, so the format cannot run code and the
``safetensors`` package is not needed. Writing is left to the ``safetensors`` package.
"""

from __future__ import annotations

import json
import math
import struct
from typing import Any

import torch

from nanguard.ckpt.torchfile import MappedFile, typed_view

_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "C64": torch.complex64,
}
for _name, _attr in (("F8_E4M3", "float8_e4m3fn"), ("F8_E5M2", "float8_e5m2"), ("U16", "uint16"),
                     ("U32", "uint32"), ("U64", "uint64")):
    if hasattr(torch, _attr):
        _DTYPES[_name] = getattr(torch, _attr)

MAX_HEADER_BYTES = 100 * 1024 * 1024
"""The safetensors specification caps the JSON header at 100 MB."""


class SafetensorsError(ValueError):
    """The file does not follow the safetensors layout."""


def read_safetensors(mapped: MappedFile) -> tuple[dict[str, Any], dict[str, str]]:
    """Read ``mapped`` as safetensors.

    Returns:
        The tensors by name (memory-mapped views, in header order) and the ``__metadata__`` strings.

    Raises:
        SafetensorsError: on any inconsistency; the message says which.
    """
    with mapped.path.open("rb") as f:
        prefix = f.read(8)
        if len(prefix) != 8:
            raise SafetensorsError("file is shorter than the 8-byte header length")
        (header_len,) = struct.unpack("<Q", prefix)
        if header_len > min(MAX_HEADER_BYTES, mapped.size - 8):
            raise SafetensorsError(f"header length {header_len} exceeds the file")
        try:
            header = json.loads(f.read(header_len))
        except (UnicodeDecodeError, ValueError) as exc:
            raise SafetensorsError(f"header is not JSON: {exc}") from None
    if not isinstance(header, dict):
        raise SafetensorsError("header is not a JSON object")
    data_start = 8 + header_len
    metadata = header.pop("__metadata__", None) or {}
    tensors: dict[str, Any] = {}
    for name, entry in header.items():
        if not isinstance(entry, dict):
            raise SafetensorsError(f"entry {name!r} is not an object")
        dtype = _DTYPES.get(entry.get("dtype"))  # type: ignore[arg-type]
        shape, span = entry.get("shape"), entry.get("data_offsets")
        if dtype is None:
            raise SafetensorsError(f"entry {name!r} has unknown dtype {entry.get('dtype')!r}")
        if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
            raise SafetensorsError(f"entry {name!r} has a bad shape {shape!r}")
        if not isinstance(span, list) or len(span) != 2 or not all(type(x) is int and x >= 0 for x in span):
            raise SafetensorsError(f"entry {name!r} has bad data_offsets {span!r}")
        begin, end = span
        numel = math.prod(shape)
        itemsize = torch.empty((), dtype=dtype).element_size()
        if end < begin or end - begin != numel * itemsize or data_start + end > mapped.size:
            raise SafetensorsError(f"entry {name!r}: offsets {span} do not fit shape {shape} or the file")
        raw = mapped.bytes_at(data_start + begin, end - begin)
        tensors[name] = typed_view(raw, dtype, numel).reshape(shape)
    return tensors, {str(k): str(v) for k, v in metadata.items()} if isinstance(metadata, dict) else {}
