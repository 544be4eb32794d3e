"""lock.py owns the run lock: ``<run_dir>/.nanguard/lock``, which keeps two nanguard processes from changing
one run folder at once.

:func:`run_lock` creates the file with ``O_EXCL`` (holding pid, host, time and purpose) and removes it on
exit; a held lock raises :class:`RunLocked` (exit code ``LOCKED``) naming its holder. It does not decide what
happens under the lock: :mod:`~nanguard.runs.ultralytics_disk` and :mod:`~nanguard.runs.backups` do.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path

from nanguard.errors import ExitCode, NanguardError
from nanguard.journal import JOURNAL_DIR

LOCK_FILE = "lock"


class RunLocked(NanguardError):
    """Another nanguard process holds the run's lock file (``.nanguard/lock``)."""

    exit_code = ExitCode.LOCKED


@contextlib.contextmanager
def run_lock(run_dir: str | Path, purpose: str) -> Iterator[Path]:
    """Hold ``<run_dir>/.nanguard/lock`` (created with ``O_EXCL``, holding pid, host, time and purpose).

    Raises:
        RunLocked: the lock file exists; the message names its holder.
    """
    folder = Path(run_dir) / JOURNAL_DIR
    folder.mkdir(parents=True, exist_ok=True)
    lock = folder / LOCK_FILE
    try:
        fd = os.open(lock, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:
        raise RunLocked(f"{lock}: the run is locked by {_lock_holder(lock)}; wait for it to finish, or delete "
                        "the file if no such process is running") from None
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            json.dump({"pid": os.getpid(), "host": socket.gethostname(), "time": utc_now(), "purpose": purpose},
                      handle)
            handle.flush()
            os.fsync(handle.fileno())
        yield lock
    finally:
        with contextlib.suppress(FileNotFoundError):
            lock.unlink()


def _lock_holder(lock: Path) -> str:
    try:
        info = json.loads(lock.read_text(encoding="utf-8"))
        return f"pid {info.get('pid')} on {info.get('host')} since {info.get('time')} ({info.get('purpose')})"
    except (OSError, ValueError, AttributeError):
        return "another process"


def utc_now() -> str:
    """The current UTC time to the second, ISO 8601 (the lock file's and backup manifests' timestamps)."""
    return dt.datetime.fromtimestamp(time.time(), dt.UTC).isoformat(timespec="seconds")
