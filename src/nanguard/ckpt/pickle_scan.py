"""pickle_scan.py owns bounding a pickle before it is unpickled, and the reader's limits on hostile input.

CPython's C unpickler trusts numbers it reads: it presizes its memo from a ``PUT``/``BINPUT``/``LONG_BINPUT``
index (about 16 bytes per slot, so a 9-byte pickle asks for gigabytes) and allocates the declared length of
``BINBYTES8``/``BINUNICODE8``/``BYTEARRAY8``/``LONG4``… before reading it. :func:`scan_pickle` walks the
opcodes once, in linear time and without building anything, and refuses a pickle where

- a memo index is not below the number of opcodes seen so far (a real pickler numbers its memo entries
  0, 1, 2… in the order it writes them, so this never refuses a real file, and the memo stays under
  16 bytes per opcode of the file);
- a declared length (strings, bytes, longs, frames) is larger than the bytes left in the pickle;
- an opcode is unknown, or the pickle ends before its ``STOP``.

It returns where the pickle ends, so a stream of several pickles (the legacy ``torch.save`` format) is
unpickled one exact slice at a time. :func:`inert_load_bounded` is the one way the readers unpickle.
The limits on containers (inflated zip members) and trees (nesting depth, elements scanned) live here too,
with why each has its value; refusing any of them raises :class:`CheckpointLimit`.
"""

from __future__ import annotations

import io
import pickle
from typing import Any, Protocol

from nanguard.ckpt.unpickler import InertUnpickler, LoadStorage

MAX_INFLATED_PICKLE_BYTES = 64 * 1024 * 1024
"""A *compressed* ``data.pkl`` may inflate to at most 64 MiB. ``torch.save`` stores ``data.pkl`` uncompressed
(then its size is bounded by the file itself); the pickle of a real checkpoint holds the tree and small
values only (tensors live in their own records), a few MB even for Ultralytics' largest models."""

INFLATE_SLACK_BYTES = 64 * 1024 * 1024
MAX_INFLATE_RATIO = 16
"""Compressed *storage* records may inflate, all together, to at most 64 MiB plus 16 times their compressed
bytes. ``torch.save`` never compresses storages; a re-zipped checkpoint's float data shrinks by far less than
16x, while a zip bomb (zeros) shrinks by about 1000x."""

MAX_DEPTH = 1000
"""Deepest nesting the walk accepts. A real checkpoint is under 50 levels deep, and ``pickle.dumps`` itself
stops near Python's recursion limit (1000), so no real pickler writes a deeper tree."""

SCAN_FACTOR = 4
SCAN_SLACK_BYTES = 64 * 1024 * 1024
"""The audit scans at most 4 times the bytes its tensors' views span, plus 64 MiB: a pickle can name
one storage (or one stride-0 element) a million times at 3 bytes per reference, so the work must be bounded
by what the file holds, not by how often it is referenced. Real overlapping views (a fused ``qkv`` weight
saved beside its slices) stay far below 4x."""


class CheckpointLimit(pickle.UnpicklingError):
    """The input passes one of the reader's bounds; the message says which and by how much."""


class Buffer(Protocol):
    """What the scanner reads: ``bytes`` or an ``mmap`` (indexing gives ints, ``find`` and slicing work)."""

    def __getitem__(self, index: Any) -> Any: ...

    def __len__(self) -> int: ...

    def find(self, sub: bytes, start: int = ..., end: int = ...) -> int: ...


# Argument layout of each opcode: ("fixed", n) n bytes; ("sized", n, signed) an n-byte little-endian length,
# then that many bytes; ("line", k) k newline-terminated lines; ("put", n) a memo index of n bytes (0: a line).
_NONE = ("fixed", 0)
_LAYOUT: dict[int, tuple[Any, ...]] = {
    **{ord(c): _NONE for c in "(.012NRbaelds}ut)oQ]"},
    **{c: _NONE for c in (0x88, 0x89, 0x85, 0x86, 0x87, 0x81, 0x92, 0x93, 0x94, 0x8F, 0x90, 0x91, 0x97, 0x98)},
    ord("J"): ("fixed", 4), ord("K"): ("fixed", 1), ord("M"): ("fixed", 2), ord("G"): ("fixed", 8),
    ord("h"): ("fixed", 1), ord("j"): ("fixed", 4),  # BINGET, LONG_BINGET: a missing entry is the unpickler's error
    0x80: ("fixed", 1), 0x82: ("fixed", 1), 0x83: ("fixed", 2), 0x84: ("fixed", 4),  # PROTO, EXT1/2/4
    0x8A: ("sized", 1, False), 0x8B: ("sized", 4, True),  # LONG1, LONG4
    ord("U"): ("sized", 1, False), ord("T"): ("sized", 4, True),  # SHORT_BINSTRING, BINSTRING
    0x8C: ("sized", 1, False), ord("X"): ("sized", 4, False), 0x8D: ("sized", 8, False),  # *BINUNICODE*
    ord("C"): ("sized", 1, False), ord("B"): ("sized", 4, False), 0x8E: ("sized", 8, False),  # *BINBYTES*
    0x96: ("sized", 8, False),  # BYTEARRAY8
    0x95: ("frame", 8),  # FRAME: a length only; the frame's opcodes follow and are scanned like the rest
    ord("I"): ("line", 1), ord("L"): ("line", 1), ord("S"): ("line", 1), ord("V"): ("line", 1),
    ord("F"): ("line", 1), ord("g"): ("line", 1), ord("P"): ("line", 1),
    ord("c"): ("line", 2), ord("i"): ("line", 2),  # GLOBAL, INST: module and name lines
    ord("p"): ("put", 0), ord("q"): ("put", 1), ord("r"): ("put", 4),  # PUT, BINPUT, LONG_BINPUT
}
_STOP = ord(".")

# The same table as flat lists indexed by opcode byte, for speed (about 3x pickletools.genops):
# kind 0 fixed width, 1 sized, 2 lines, 3 binary memo index, 4 text memo index, 5 frame, 6 STOP, -1 unknown.
_KIND = [-1] * 256
_WIDTH = [0] * 256
_SIGNED = [False] * 256
for _code, _spec in _LAYOUT.items():
    _KIND[_code] = {"fixed": 0, "sized": 1, "line": 2, "frame": 5}.get(_spec[0], 3 if _spec[1] else 4)
    _WIDTH[_code] = _spec[1]
    _SIGNED[_code] = len(_spec) > 2 and _spec[2]
_KIND[_STOP] = 6


def scan_pickle(data: Buffer, start: int = 0, end: int | None = None) -> int:
    """Check the pickle at ``data[start:end]`` against what it can hold; returns the offset just past its STOP.

    Raises:
        CheckpointLimit: a memo index or declared length the pickle cannot hold.
        pickle.UnpicklingError: an unknown opcode, or no STOP before the end.
    """
    end = len(data) if end is None else end
    pos, ops = start, 0
    kinds, widths, signs = _KIND, _WIDTH, _SIGNED
    from_bytes = int.from_bytes
    while pos < end:
        code = data[pos]
        kind = kinds[code]
        pos += 1
        ops += 1
        if kind == 0:
            pos += widths[code]
        elif kind == 1 or kind == 5:
            width = widths[code]
            raw = data[pos : pos + width]
            size = from_bytes(raw, "little", signed=signs[code])
            pos += width
            if len(raw) < width or size < 0 or size > end - pos:
                what = "frame" if kind == 5 else f"opcode 0x{code:02x}"
                raise CheckpointLimit(
                    f"{what} at byte {pos - width - 1} declares {size} bytes but only {max(0, end - pos)} follow"
                )
            if kind == 1:
                pos += size
        elif kind == 3:
            width = widths[code]
            _check_memo(from_bytes(data[pos : pos + width], "little"), ops, pos)
            pos += width
        elif kind == 2 or kind == 4:
            for _ in range(widths[code] if kind == 2 else 1):
                newline = data.find(b"\n", pos, end)
                if newline < 0:
                    raise pickle.UnpicklingError(f"pickle line at byte {pos} has no end")
                if kind == 4:
                    _check_memo(data[pos:newline].strip(), ops, pos)
                pos = newline + 1
        elif kind == 6:
            return pos
        else:
            raise pickle.UnpicklingError(f"unknown pickle opcode 0x{code:02x} at byte {pos - 1}")
    raise pickle.UnpicklingError("pickle ends before its STOP opcode")


def _check_memo(index: int | bytes, ops: int, pos: int) -> None:
    if isinstance(index, bytes):
        text = index.decode("ascii", "replace")
        if not text.isdigit() or len(text) > 19:
            raise pickle.UnpicklingError(f"PUT at byte {pos} has a bad memo index {text[:40]!r}")
        index = int(text)
    if index >= ops:
        raise CheckpointLimit(f"memo index {index} at byte {pos} is past the {ops} opcodes read so far")


def inert_load_bounded(
    data: Buffer, start: int = 0, end: int | None = None, load_storage: LoadStorage | None = None
) -> tuple[Any, list[str], int]:
    """Scan, then inertly unpickle exactly the pickle at ``data[start:end]``.

    Returns:
        The object, the globals it references, and the offset just past the pickle.
    """
    stop = scan_pickle(data, start, end)
    unpickler = InertUnpickler(io.BytesIO(data[start:stop]), load_storage)
    return unpickler.load(), list(unpickler.globals), stop
