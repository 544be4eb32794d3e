"""follow.py owns following growing log files (``nanguard scan-log -f``): polling, truncation, rotation.

:func:`follow` reads what each file holds now (with the fast path), then polls for appended bytes and feeds
them to the file's :class:`~nanguard.logscan.scanner.LogScanner`, yielding the events each poll produced. A
file that shrinks was truncated (``> train.log`` again): it is read again from its start. A path that now
names another file (``logrotate``, ``mv`` + new file) was rotated: the old file is read to its end, then the
new one from its start. It prints nothing; the CLI decides what to show.
"""

from __future__ import annotations

import os
import time
from collections.abc import Generator, Sequence
from dataclasses import dataclass
from pathlib import Path

from nanguard.logscan.events import LogEvent
from nanguard.logscan.scanner import LogScanner, open_log, scan_fd_into, sniff_format

POLL_SECONDS = 0.2
"""How often a followed file is checked for new bytes."""


@dataclass(slots=True)
class _Followed:
    path: Path
    scanner: LogScanner
    fd: int
    inode: int
    position: int


def _open_followed(path: Path, scanner: LogScanner, fmt: str, pattern: str | None, *, first: bool) -> _Followed:
    fd, head = open_log(path)
    reading = sniff_format(path, head, fmt)
    # What the file holds already is read fast (it may be gigabytes); what it grows by is read piece by piece.
    fast = first and pattern is None and reading in ("ultralytics", "lines")
    position = scan_fd_into(scanner, fd, fast=fast, ultralytics=reading == "ultralytics")
    return _Followed(path, scanner, fd, os.fstat(fd).st_ino, position)


def follow(
    paths: Sequence[str | os.PathLike[str]],
    *,
    fmt: str = "auto",
    pattern: str | None = None,
    idle_exit_s: float | None = None,
    poll_s: float = POLL_SECONDS,
) -> Generator[tuple[LogScanner, list[LogEvent]], None, None]:
    """Follow ``paths``; yields ``(scanner, events)`` for each file whose read produced events.

    The first yield per file carries the events of its existing content (only the pieces the fast path
    reads). Ends when no file grew for ``idle_exit_s`` seconds (never when None); the caller ends it early
    by closing the generator (Ctrl-C). Call ``scanner.finish()`` and ``scanner.result()`` afterwards.

    Raises:
        LogScanError: a path is missing, unreadable, a folder or binary when following starts.
    """
    followed: list[_Followed] = []
    try:
        for raw in paths:
            path = Path(raw)
            scanner = LogScanner(fmt, pattern, source=str(path))
            before = len(followed)
            followed.append(_open_followed(path, scanner, fmt, pattern, first=True))
            yield followed[before].scanner, []
        last_growth = time.monotonic()
        while True:
            grew = False
            for item in followed:
                events = _poll(item, fmt, pattern)
                if events is None:
                    continue
                grew = True
                if events:
                    yield item.scanner, events
            now = time.monotonic()
            if grew:
                last_growth = now
            elif idle_exit_s is not None and now - last_growth >= idle_exit_s:
                return
            time.sleep(poll_s)
    finally:
        for item in followed:
            os.close(item.fd)


def _poll(item: _Followed, fmt: str, pattern: str | None) -> list[LogEvent] | None:
    """New events of one followed file; None when it did not change."""
    try:
        stat = os.stat(item.path)
    except FileNotFoundError:
        stat = None  # rotated away and not yet recreated: keep reading the old file
    size = os.fstat(item.fd).st_size
    events: list[LogEvent] = []
    changed = False
    if size < item.position:  # truncated in place: the log starts over (its unfinished last piece ends here)
        events += item.scanner.finish()
        item.position = 0
        changed = True
    if size > item.position:
        events += _read_new(item)
        changed = True
    if stat is not None and stat.st_ino != item.inode:  # rotated: the path names a new file now
        events += _read_new(item)
        events += item.scanner.finish()
        os.close(item.fd)
        fresh = _open_followed(item.path, item.scanner, fmt, pattern, first=False)
        item.fd, item.inode, item.position = fresh.fd, fresh.inode, fresh.position
        changed = True
    return events if changed else None


def _read_new(item: _Followed) -> list[LogEvent]:
    events: list[LogEvent] = []
    while True:
        chunk = os.pread(item.fd, 1 << 20, item.position)
        if not chunk:
            return events
        item.position += len(chunk)
        events += item.scanner.feed_bytes(chunk)
