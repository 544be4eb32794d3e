"""scanner.py owns scanning a stream or a file: :class:`LogScanner` (incremental, any chunking) and
:func:`scan_file` (the fast path for whole files), and the folding of events into a
:class:`~nanguard.logscan.events.ScanResult`.

A stream is cut into *pieces* at every ``\\n`` and ``\\r`` (Ultralytics redraws its progress line with
``\\r\\x1b[K``); the piece after the last break waits for the next chunk, so a chunk may end anywhere, even in
an ANSI code. :meth:`LogScanner.feed` reads every piece. :func:`scan_file` reads only the pieces that can hold
an incident, which it finds with ``bytes.find`` over 8 MiB buffers (no per-line Python work for the millions
of finite redraws), plus the last progress piece of each buffer for the position; see :meth:`_fast_spans`.
Both give the same :class:`ScanResult` for the same log. It prints nothing and imports no torch.
"""

from __future__ import annotations

import codecs
import copy
import json
import math
import os
import re
from pathlib import Path

from nanguard.logscan.events import MAX_RECOVERIES, EpochIncidents, LogEvent, LogScanError, ScanResult
from nanguard.logscan.lines import NONFINITE_WORD, PieceParser
from nanguard.paths import BadPath, open_regular_file

CHUNK_BYTES = 8 << 20
"""Read size of :func:`scan_file`: large enough that per-buffer Python work is noise."""

SNIFF_BYTES = 64 << 10
"""How much of a file ``auto`` looks at to choose the fast path (Ultralytics or line-based) and spot binaries."""

_ANSI = re.compile(rb"\x1b\[[0-9;?]*[A-Za-z]")  # reference/ultralytics.md §10.2 (and ?-private modes)
_PIECE = re.compile(rb"[^\r\n]+")
# Case folding for the fast path's search only: NaN, NAN, Inf, INF, Infinity and Non-finite all become
# lowercase, so three plain finds see every spelling. bytes.translate runs at memory speed; .lower() does not.
_FOLD = bytes.maketrans(b"NAIF", b"naif")
MAX_PIECE_BYTES = 64 << 10
"""Longest piece (line, or redraw between ``\\r``) read whole. Real frames and lines are far shorter (an
Ultralytics frame is ~150 bytes, an HF Trainer dict a few KiB); a longer piece is glued-together output or
junk, and keeping it whole would let one line of a log hold the scan's memory hostage."""

KEEP_BYTES = 32 << 10
"""Of a piece longer than :data:`MAX_PIECE_BYTES`: how much of its start and of its end is read whole."""

HIT_CONTEXT_CHARS = 200
"""Of a long piece's middle: the text kept on each side of its first NaN/Inf word (enough for ``key=nan``)."""

_POSITION_TRIES = 64  # pieces tried backwards from a buffer's end for the last progress frame or dict line


class LongPiece:
    """A piece longer than :data:`MAX_PIECE_BYTES`, read in bounded memory and linear time, in any chunks.

    It keeps the first and the last :data:`KEEP_BYTES` whole and streams through the middle, searching it for
    the NaN/Inf words a generic or JSON line is read for (ANSI codes removed, UTF-8 decoded across chunks);
    of the first word found it keeps :data:`HIT_CONTEXT_CHARS` on each side. :meth:`text` is what the parser
    reads: start, `` … ``, the word with its context, `` … ``, end. So a NaN anywhere in a line of any length
    is found; a ``--pattern`` sees only the start, the first NaN word and the end of such a line.
    """

    _SEP = " \u2026 "  # " … ": no word character, so nothing on either side is glued into one word or key=value
    _BEHIND = 16  # characters kept before the unsearched text: more than NONFINITE_WORD's lookbehind needs

    def __init__(self) -> None:
        self.head = bytearray()
        self.tail = bytearray()
        self.hit: str | None = None
        self._decoder = codecs.getincrementaldecoder("utf-8")("replace")
        self._pending = ""  # middle text not searched yet, after _BEHIND characters of context
        self._ansi_hold = b""  # an ANSI code cut by a chunk boundary, until its end arrives
        self._started = False

    def add(self, data: bytes) -> None:
        """Append the next bytes of the piece (any size; searched 1 MiB at a time)."""
        for at in range(0, len(data), 1 << 20):
            self._add(memoryview(data)[at: at + (1 << 20)])

    def _add(self, view: memoryview) -> None:
        room = KEEP_BYTES - len(self.head)
        if room > 0:
            self.head += view[:room]
            view = view[room:]
        if not view:
            return
        self.tail += view
        if len(self.tail) > 2 * KEEP_BYTES:  # trimmed in halves: each byte is copied O(1) times
            excess = bytes(self.tail[:-KEEP_BYTES])
            del self.tail[:-KEEP_BYTES]
            self._search(excess)

    def _search(self, raw: bytes) -> None:
        if not self._started:
            self._started = True
            self._pending = _text(bytes(self.head[-self._BEHIND:]))  # context for a word right at the middle's start
        if self.hit is not None:
            return
        raw = self._ansi_hold + raw
        cut = raw.rfind(b"\x1b", max(len(raw) - 32, 0))
        if cut != -1 and _ANSI.match(raw, cut) is None:
            raw, self._ansi_hold = raw[:cut], raw[cut:]
        else:
            self._ansi_hold = b""
        if b"\x1b" in raw:
            raw = _ANSI.sub(b"", raw)
        start = min(len(self._pending), self._BEHIND)
        text = self._pending + self._decoder.decode(raw)
        found = NONFINITE_WORD.search(text, start, max(len(text) - HIT_CONTEXT_CHARS, start))
        if found is not None:
            # a match found in the search window may look past its end for its lookahead: text goes on
            self.hit = text[max(found.start() - HIT_CONTEXT_CHARS, 0): found.start() + HIT_CONTEXT_CHARS]
            self._pending = ""
            return
        self._pending = text[-(HIT_CONTEXT_CHARS + self._BEHIND):]

    def text(self) -> str:
        """The piece as the parser reads it (see the class docstring)."""
        if not self._started:  # nothing was left out: start and end are one text
            return _text(bytes(self.head + self._ansi_hold + self.tail))
        head = _text(bytes(self.head))
        unsearched = self._pending[self._BEHIND:] if self.hit is None else ""
        tail = unsearched + _text(self._ansi_hold + bytes(self.tail))
        parts = [head] + ([self.hit] if self.hit is not None else []) + ([tail] if tail else [])
        return self._SEP.join(parts)

    def __bool__(self) -> bool:
        return bool(self.head.strip(b"\r\n") or self.tail.strip(b"\r\n") or self.hit)

    @classmethod
    def of(cls, raw: bytes) -> LongPiece:
        piece = cls()
        piece.add(raw)
        return piece


class LogScanner:
    """Reads one log stream incrementally and keeps what it found.

    Args:
        fmt: ``"auto"``, ``"ultralytics"``, ``"results-csv"``, ``"generic"`` or ``"jsonl"``.
        pattern: a regular expression for extra incident lines (``"match"`` events).
        source: the stream's label in the result.

    Raises:
        LogScanError: an unknown ``fmt`` or a ``pattern`` that does not compile.
    """

    def __init__(self, fmt: str = "auto", pattern: str | None = None, source: str = "<stream>") -> None:
        self._parser = PieceParser(fmt, pattern)
        self._result = ScanResult(source=source, format=self._parser.format)
        self._carry = b""
        self._long: LongPiece | None = None  # the carried piece, once it outgrew MAX_PIECE_BYTES
        self._carry_size = 0  # bytes of the carried piece (all of them, also those a LongPiece left out)
        self._offset = 0  # stream offset of self._carry's first byte
        self._head_offset = 0
        self._position: LogEvent | None = None  # the last event that says where training is

    def __repr__(self) -> str:
        return f"LogScanner(fmt={self._parser.fmt!r}, source={self._result.source!r})"

    # ------------------------------------------------------------------ public
    def feed(self, chunk: str) -> list[LogEvent]:
        """Read the next text of the stream; returns the events of every piece it completed, in order."""
        return self.feed_bytes(chunk.encode("utf-8", "surrogateescape"))

    def feed_bytes(self, chunk: bytes) -> list[LogEvent]:
        """:meth:`feed` for raw bytes (UTF-8; undecodable bytes read as U+FFFD)."""
        head, lo, hi, base = self._take(chunk)
        events: list[LogEvent] = []
        if head:
            event = self._piece(head, self._head_offset)
            if event is not None:
                events.append(event)
        for piece in _PIECE.finditer(chunk, lo, hi):
            event = self._piece(piece.group(), base + piece.start())
            if event is not None:
                events.append(event)
        return events

    def finish(self) -> list[LogEvent]:
        """Read the trailing piece that no line break ended yet (call at the end of the stream)."""
        piece, base = self._carried(), self._offset
        self._offset += self._carry_size
        self._carry, self._long, self._carry_size = b"", None, 0
        event = self._piece(piece, base) if piece and (isinstance(piece, LongPiece) or piece.strip(b"\r\n")) else None
        return [] if event is None else [event]

    def result(self) -> ScanResult:
        """What was found so far (a copy: later feeds do not change it)."""
        out = copy.deepcopy(self._result)
        out.format = self._parser.format
        event = self._position
        if event is not None:
            out.position = {"epoch": event.epoch, "epochs": event.epochs, "batch": event.batch,
                            "batches": event.batches, "step": event.step}
        return out

    # ------------------------------------------------------------------ internals
    def _take(self, chunk: bytes) -> tuple[bytes | LongPiece | None, int, int, int]:
        """Split carry + ``chunk`` without copying ``chunk``: the piece the carry completes (or None), and the
        range ``[lo, hi)`` of ``chunk`` holding whole pieces, with the stream offset of ``chunk[0]``.

        Copying an 8 MiB buffer to glue a few carried bytes in front of it would cost as much as searching it.
        """
        self._result.bytes_scanned += len(chunk)
        base = self._offset + self._carry_size
        first = _first_break(chunk)
        if first == -1:  # no line break yet: the whole chunk continues the carried piece
            self._carry_more(chunk)
            return None, 0, 0, base
        self._carry_more(chunk[:first])
        head = self._carried()
        head_offset = self._offset
        hi = max(chunk.rfind(b"\n"), chunk.rfind(b"\r")) + 1
        self._carry, self._long, self._carry_size, self._offset = chunk[hi:], None, len(chunk) - hi, base + hi
        self._head_offset = head_offset
        return head, first + 1, hi, base

    def _carry_more(self, data: bytes) -> None:
        """Append to the carried piece: kept whole up to MAX_PIECE_BYTES, then as a :class:`LongPiece`
        (gluing bytes objects would copy the whole carry for every chunk: quadratic for a long line)."""
        self._carry_size += len(data)
        if self._long is not None:
            self._long.add(data)
        elif self._carry_size > MAX_PIECE_BYTES:
            self._long = LongPiece()
            self._long.add(self._carry)
            self._long.add(data)
            self._carry = b""
        elif data:
            self._carry += data  # at most MAX_PIECE_BYTES: bounded copies

    def _carried(self) -> bytes | LongPiece:
        return self._long if self._long is not None else self._carry

    def _piece(self, raw: bytes | LongPiece, offset: int) -> LogEvent | None:
        if isinstance(raw, bytes) and len(raw) > MAX_PIECE_BYTES:
            raw = LongPiece.of(raw)
        event = self._parser.parse(raw.text() if isinstance(raw, LongPiece) else _text(raw), offset)
        if event is not None:
            self._fold(event)
        return event

    def _fold(self, event: LogEvent) -> None:
        result, kind = self._result, event.kind
        if kind == "header":
            result.loss_names = list(self._parser.loss_names)
            return
        if kind in ("progress", "metrics") or (kind == "nonfinite" and event.detail in ("json", "csv")):
            self._position = event  # made into ScanResult.position by result(): once, not per frame
        if self._parser.csv_mode and kind in ("metrics", "nonfinite"):
            result.epochs.pop(event.epoch, None)  # results.csv repeats an epoch after a resume: last row wins
        if kind == "boundary":
            if event.detail == "resume":
                result.resumes += 1
            return
        if kind == "warning":
            result.warning_lines += 1
            self._note(event)
            return
        if not event.is_incident:
            return
        row = result.epochs.get(event.epoch)
        if row is None:
            row = result.epochs[event.epoch] = EpochIncidents(epoch=event.epoch)
        if not row.first_text:
            row.first_text = event.text
        if kind == "progress":
            row.nonfinite_frames += 1
            if event.batch is not None and (row.first_batch is None or event.batch < row.first_batch):
                row.first_batch = event.batch
        elif kind == "nonfinite":
            row.nonfinite_lines += 1
            if event.batch is not None and (row.first_batch is None or event.batch < row.first_batch):
                row.first_batch = event.batch
            if event.step is not None and (row.first_step is None or event.step < row.first_step):
                row.first_step = event.step
        elif kind == "recovery":
            row.recovery_lines += 1
            self._note(event)
        elif kind == "match":
            row.pattern_lines += 1
        for name, value in event.losses.items():
            if not math.isfinite(value) and name not in row.nonfinite_losses:
                row.nonfinite_losses.append(name)

    def _note(self, event: LogEvent) -> None:
        if len(self._result.recoveries) < MAX_RECOVERIES:
            self._result.recoveries.append(
                {"kind": event.kind, "detail": event.detail, "epoch": event.epoch, "text": event.text})

    # ------------------------------------------------------------------ the fast path
    def _feed_fast(self, chunk: bytes, *, ultralytics: bool) -> list[LogEvent]:
        """Like :meth:`feed_bytes`, but reads only the pieces :meth:`_fast_spans` picks."""
        head, lo, hi, base = self._take(chunk)
        events: list[LogEvent] = []
        if head:
            event = self._piece(head, self._head_offset)
            if event is not None:
                events.append(event)
        self._bulk: dict[int, int] = {}
        for start, end in self._fast_spans(chunk, lo, hi, ultralytics=ultralytics):
            event = self._piece(chunk[start:end], base + start)
            if event is not None:
                events.append(event)
                middle = self._bulk.get(start)
                if middle:
                    self._result.epochs[event.epoch].nonfinite_frames += middle
        return events

    def _fast_spans(self, body: bytes, lo: int, hi: int, *, ultralytics: bool) -> list[tuple[int, int]]:
        """(start, end) of the pieces of ``body`` that can change the result, in order.

        Every piece holding ``nan``/``inf`` (any case) or ``non-finite``; in Ultralytics logs also every line
        that is no progress redraw (headers, recovery, warning and boundary lines are ``\\n`` lines) and the
        first and last piece of each redraw line (where other output gets glued to a frame); and the last
        progress frame or dict line, for the position. What is left are redraws of finite frames, which only
        move the position.
        """
        spans: dict[int, int] = {}
        size = hi
        needles: tuple[bytes, ...]
        if ultralytics:
            # Ultralytics prints non-finite losses as "nan"/"inf" (%g); its other NaN lines are \n lines.
            haystack, needles = body, (b"nan", b"inf")
            start = lo
            while start < size:
                newline = body.find(b"\n", start, size)
                end = size if newline == -1 else newline
                cr = body.find(b"\r", start, end)
                if cr == -1:
                    spans[start] = end
                else:
                    if cr > start:
                        spans[start] = cr
                    last = body.rfind(b"\r", cr, end) + 1
                    if last < end:
                        spans[last] = end
                start = end + 1
        else:
            haystack, needles = body.translate(_FOLD), (b"nan", b"inf", b"non-finite")
        bounds = _PieceBounds(body, lo, hi)
        nexts = [haystack.find(needle, lo, hi) for needle in needles]
        while True:
            live = [at for at in nexts if at != -1]
            if not live:
                break
            start, end = bounds.around(min(live))
            spans[start] = end
            resume = end
            if ultralytics and body.startswith(b"\r", end):
                resume = self._bulk_redraws(body, haystack, needles, start, end, hi, spans, bounds)
            nexts = [haystack.find(needle, resume, hi) if 0 <= at < resume else at
                     for needle, at in zip(needles, nexts, strict=True)]
        position = self._last_position_span(body, lo, hi)
        if position is not None:
            spans[position[0]] = position[1]
        return sorted((start, end) for start, end in spans.items() if end > start)

    def _bulk_redraws(self, body: bytes, haystack: bytes, needles: tuple[bytes, ...], start: int, end: int,
                      hi: int, spans: dict[int, int], bounds: _PieceBounds) -> int:
        """A non-finite redraw at ``body[start:end]``: when the last non-finite piece of the same redraw line
        is a non-finite frame of the same epoch, every redraw between them is one too (the losses are running
        epoch means, and a progress bar is one line: it stays NaN until the bar closes). Those are counted, not
        read (:attr:`_bulk`), which keeps a NaN epoch of 10,000 redraws cheap. Returns where to search on."""
        newline = body.find(b"\n", end, hi)
        line_end = hi if newline == -1 else newline
        last_hit = max(haystack.rfind(needle, end, line_end) for needle in needles)
        if last_hit == -1:
            return end
        last_start = body.rfind(b"\r", end, last_hit) + 1
        cr = body.find(b"\r", last_hit, line_end)
        last_end = line_end if cr == -1 else cr
        first = self._parser.frame_state(_text(body[start:end]))
        if first is None or first != self._parser.frame_state(_text(body[last_start:last_end])):
            return end
        self._bulk[start] = body.count(b"\r", end, last_start) - 1
        spans[last_start] = last_end
        bounds.low = last_end
        return last_end

    def _last_position_span(self, body: bytes, lo: int, hi: int) -> tuple[int, int] | None:
        """The last piece of ``body[lo:hi]`` that is a progress frame or a dict line (tried backwards, a few)."""
        end = hi
        for _ in range(_POSITION_TRIES):
            # "G " follows the GPU_mem column of every training frame (validation bars have none); "{" opens
            # a dict line.
            mark = max(body.rfind(b"G ", lo, end), body.rfind(b"{", lo, end))
            if mark == -1:
                return None
            start, stop = _PieceBounds(body, lo, hi).around(mark)
            if self._parser.is_position(_text(body[start:stop])):
                return start, stop
            end = start
        return None


class _PieceBounds:
    """Finds the piece around an index of ``body``, for indices given in increasing order.

    Backward searches stop at the end of the previous piece found, and forward searches remember the next
    line break, so finding every hit of a needle costs one pass over ``body`` in all (a line without any
    ``\r`` would otherwise be searched to its end once per hit).
    """

    def __init__(self, body: bytes, lo: int, hi: int) -> None:
        self.body, self.low, self.hi = body, lo, hi
        self.next_nl, self.next_cr = -1, -1

    def around(self, at: int) -> tuple[int, int]:
        body, hi = self.body, self.hi
        line_start = max(body.rfind(b"\n", self.low, at) + 1, self.low)
        start = max(body.rfind(b"\r", line_start, at) + 1, line_start)
        if self.next_nl < at:
            found = body.find(b"\n", at, hi)
            self.next_nl = hi if found == -1 else found
        if self.next_cr < at:
            found = body.find(b"\r", at, hi)
            self.next_cr = hi if found == -1 else found
        end = min(self.next_nl, self.next_cr)
        self.low = end
        return start, end


def _text(raw: bytes) -> str:
    """A piece as text: ANSI codes removed, undecodable bytes as U+FFFD."""
    if raw.startswith(b"\x1b[K"):  # every Ultralytics redraw starts so; cheaper than the regex
        raw = raw[3:]
    if b"\x1b" in raw:
        raw = _ANSI.sub(b"", raw)
    return raw.decode("utf-8", "replace")


def _first_break(chunk: bytes) -> int:
    """Index of the first ``\n`` or ``\r`` in ``chunk``, -1 if none (the ``\r`` search stops at the ``\n``)."""
    newline = chunk.find(b"\n")
    cr = chunk.find(b"\r", 0, newline if newline != -1 else len(chunk))
    return newline if cr == -1 else cr


def sniff_format(path: Path, head: bytes, fmt: str) -> str:
    """The reading a file gets: ``fmt`` unless ``auto``; then ``results-csv`` (by name or first line),
    ``trainer-state`` (HF's trainer_state.json), ``ultralytics`` (its banner or header near the top) or
    ``lines`` (generic and JSON lines)."""
    if fmt not in ("auto", "jsonl"):
        return fmt
    text = head.lstrip()
    if path.name == "trainer_state.json" or (text.startswith(b"{") and b'"log_history"' in head):
        return "trainer-state"
    if fmt == "jsonl":
        return fmt
    if path.name == "results.csv" or re.match(rb"\s*epoch\s*,", text, re.IGNORECASE):
        return "results-csv"
    if b"GPU_mem" in head or b"Ultralytics" in head:
        return "ultralytics"
    return "lines"


def open_log(path: Path) -> tuple[int, bytes]:
    """Open a log for reading: the descriptor and its first :data:`SNIFF_BYTES`. Refuses (one line naming the
    file) what is missing or unreadable, a folder, a FIFO or device (checked on the open descriptor, which a FIFO
    cannot block: :func:`nanguard.paths.open_regular_file`) and a binary file."""
    try:
        fd = open_regular_file(path, "log file")
    except BadPath as err:
        raise LogScanError(str(err)) from None
    try:
        head = os.pread(fd, SNIFF_BYTES, 0)
    except OSError as err:
        os.close(fd)
        raise LogScanError(f"{path}: {err.strerror or err}") from None
    if b"\x00" in head[:8192]:
        os.close(fd)
        raise LogScanError(f"{path}: binary file (NUL bytes), not a text log")
    return fd, head


def check_readable(path: str | os.PathLike[str]) -> None:
    """Raise :class:`LogScanError` (naming the file) unless ``path`` is a readable text file."""
    fd, _ = open_log(Path(path))
    os.close(fd)


def scan_file(path: str | os.PathLike[str], fmt: str = "auto", pattern: str | None = None) -> ScanResult:
    """Scan a whole log file with the fast path; see the package docstring for what it reads.

    With ``pattern`` every piece is read (the pattern can match anything), at a lower speed.

    Raises:
        LogScanError: the file is missing, unreadable, a folder or binary; a bad ``fmt`` or ``pattern``.
    """
    file = Path(path)
    scanner = LogScanner(fmt, pattern, source=str(path))
    fd, head = open_log(file)
    try:
        reading = sniff_format(file, head, fmt)
        if reading == "trainer-state":
            _scan_trainer_state(scanner, fd, file)
        else:
            scan_fd_into(scanner, fd, fast=pattern is None and reading != "results-csv",
                         ultralytics=reading == "ultralytics")
    finally:
        os.close(fd)
    scanner.finish()
    return scanner.result()


def scan_fd_into(scanner: LogScanner, fd: int, *, fast: bool, ultralytics: bool) -> int:
    """Read ``fd`` from its current position to its end into ``scanner``; returns the bytes read."""
    total = 0
    while True:
        chunk = os.read(fd, CHUNK_BYTES)
        if not chunk:
            return total
        total += len(chunk)
        if fast:
            scanner._feed_fast(chunk, ultralytics=ultralytics)
        else:
            scanner.feed_bytes(chunk)


def _scan_trainer_state(scanner: LogScanner, fd: int, path: Path) -> None:
    """HF Trainer's trainer_state.json: one JSON document; each ``log_history`` entry is read as one line."""
    data = b"".join(iter(lambda: os.read(fd, CHUNK_BYTES), b""))
    try:
        state = json.loads(data)  # json reads NaN and Infinity, as json.dump wrote them
    except ValueError as err:
        raise LogScanError(f"{path}: not a readable trainer_state.json ({err})") from None
    history = state.get("log_history") if isinstance(state, dict) else None
    if not isinstance(history, list):
        raise LogScanError(f"{path}: no log_history list in this JSON document")
    for entry in history:
        scanner.feed(json.dumps(entry) + "\n")
    scanner._result.bytes_scanned = len(data)
