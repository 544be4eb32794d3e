"""lock.py owns nanguard's locks on a run folder, and the one way they are held: ``flock``.

Three lock files live in ``<run_dir>/.nanguard/``, all held the same way by :func:`acquire`:

- ``lock`` (:func:`run_lock`): the writer of the run folder's own files (``weights/*.pt``, ``results.csv``):
  ``nanguard rollback`` and ``nanguard undo`` while they run, and ``nanguard run`` for the whole time it
  supervises (its training alive or between restarts; its own rollbacks run under the lock it holds).
- ``guard.lock`` (:func:`guard_lock`): a :class:`~nanguard.guard.Guard`, for its life (it writes the journal,
  disk snapshots and, inside Ultralytics, the run's checkpoints). It is not ``lock`` because
  ``nanguard run -- python train.py`` supervises a guarded script: the supervisor (holding ``lock``) and
  its own child (holding ``guard.lock``) must not refuse each other, while a second Guard on the same folder
  must be refused. Rollback and undo take both: they refuse a live Guard too.
- ``supervisor.pid`` (:func:`nanguard.supervise.state.pid_lock`): one ``nanguard run`` per folder.

The file is never the lock itself: the lock is an exclusive ``flock`` on a descriptor kept open for the
holder's life, so the kernel releases it when the holder dies, even by SIGKILL, and a stale file blocks
nothing. The descriptor is opened ``O_CLOEXEC`` (children such as the supervised training do not inherit it).
The holder's pid, host, time and purpose are written into the file only so that a refusal can name them. A held
lock raises :class:`RunLocked` (exit code ``LOCKED``) before anything is created or changed.

It does not decide what happens under the lock: :mod:`~nanguard.runs.ultralytics_disk`,
:mod:`~nanguard.runs.backups` and :mod:`~nanguard.runs.intent` do.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import json
import os
import socket
import stat
import time
from collections.abc import Iterator
from pathlib import Path

from nanguard.errors import ExitCode, JournalError, NanguardError
from nanguard.journal import JOURNAL_DIR
from nanguard.paths import BadPath, describe_kind, open_regular_file

LOCK_FILE = "lock"
GUARD_LOCK_FILE = "guard.lock"
_HOLDER_BYTES = 4096
"""At most this much of a lock file is read to name its holder: the file is anyone's to write."""


class RunLocked(NanguardError):
    """Another live process holds one of the run folder's locks; the message names it."""

    exit_code = ExitCode.LOCKED


class HeldLock:
    """An exclusive ``flock`` on ``path``, held until :meth:`release` (or the process's death)."""

    def __init__(self, path: Path, fd: int) -> None:
        self.path = path
        self._fd: int | None = fd

    @property
    def held(self) -> bool:
        return self._fd is not None

    def release(self) -> None:
        """Remove the file (when it is still ours) and drop the lock. Idempotent."""
        fd, self._fd = self._fd, None
        if fd is None:
            return
        try:
            # Unlink before closing: whoever opened the old file meanwhile sees it is gone and starts over.
            with contextlib.suppress(OSError):
                if os.stat(self.path).st_ino == os.fstat(fd).st_ino:
                    self.path.unlink()
        finally:
            os.close(fd)

    def __enter__(self) -> HeldLock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def acquire(path: Path, purpose: str, refusal: str) -> HeldLock:
    """Take the exclusive ``flock`` of ``path`` (created when missing; its folder must exist) and write the
    holder (pid, host, time, purpose) into it.

    Raises:
        RunLocked: a live process holds it; the message is ``{path}: {refusal} (held by {holder})``.
    """
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NONBLOCK | os.O_CLOEXEC, 0o644)
        except OSError as err:
            raise JournalError(f"{path}: cannot open the lock file ({err.strerror or err})") from None
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):  # a FIFO or device named like the lock: not one nanguard made
            os.close(fd)
            raise JournalError(f"{path}: is {describe_kind(mode)}, not a lock file; inspect the run folder, then "
                               "remove it")
        os.set_blocking(fd, True)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = holder_text(os.read(fd, _HOLDER_BYTES))
            os.close(fd)
            raise RunLocked(f"{path}: {refusal} (held by {holder})") from None
        except BaseException:
            os.close(fd)
            raise
        # The holder may have removed the file between our open and our flock: then we locked a file nobody
        # else can see, and must start over on the new one.
        try:
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    info = {"pid": os.getpid(), "host": socket.gethostname(), "time": utc_now(), "purpose": purpose}
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(info).encode("utf-8"), 0)
    return HeldLock(path, fd)


def check_free(path: Path, refusal: str) -> None:
    """Raise :class:`RunLocked` (the same message as :func:`acquire`) when a live process holds ``path``;
    creates nothing (the dry run's check)."""
    try:
        fd = open_regular_file(path, "lock file")  # O_NONBLOCK: a FIFO named like the lock never blocks
    except BadPath:
        if not os.path.lexists(path):
            return
        raise
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RunLocked(f"{path}: {refusal} (held by {holder_text(os.read(fd, _HOLDER_BYTES))})") from None
        fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def holder_text(raw: bytes) -> str:
    """``pid N on HOST since TIME (PURPOSE)`` from a lock file's bytes; a bare pid or ``another process``
    when it holds something else."""
    try:
        info = json.loads(raw.decode("utf-8"))
        if isinstance(info, dict):
            return f"pid {info.get('pid')} on {info.get('host')} since {info.get('time')} ({info.get('purpose')})"
    except (ValueError, RecursionError):  # RecursionError: a file of [[[[... nested past the decoder's depth
        pass
    text = raw.decode("ascii", "replace").strip()
    return f"pid {text}" if text.isdigit() else "another process"


RUN_REFUSAL = "the run folder is being changed by another nanguard process; wait for it to finish"
GUARD_REFUSAL = "a live nanguard Guard is training in this run folder"


def state_folder(run_dir: str | Path, *, create: bool) -> Path:
    """``<run_dir>/.nanguard``, made when ``create`` (its run folder must exist: call it only on a real run).

    Raises:
        JournalError: it exists and is not a folder (the same refusal with or without ``create``), or it
            cannot be created.
    """
    folder = Path(run_dir) / JOURNAL_DIR
    if folder.exists() and not folder.is_dir():
        raise JournalError(f"{folder}: not a folder; nanguard keeps the run's journal, locks and backups there")
    if create:
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise JournalError(f"{folder}: cannot create nanguard's folder ({err.strerror or err})") from None
    return folder


def run_lock(run_dir: str | Path, purpose: str) -> HeldLock:
    """Hold ``<run_dir>/.nanguard/lock`` (creating ``.nanguard/``: call it only on a real run folder).

    Raises:
        RunLocked: a live process holds it; the message names the holder.
    """
    return acquire(state_folder(run_dir, create=True) / LOCK_FILE, purpose, RUN_REFUSAL)


def guard_lock(run_dir: str | Path, purpose: str) -> HeldLock:
    """Hold ``<run_dir>/.nanguard/guard.lock``: the one live Guard training in the folder (journal, snapshots).

    Raises:
        RunLocked: another live Guard (or a rollback or undo) holds it; the message names the holder.
    """
    return acquire(state_folder(run_dir, create=True) / GUARD_LOCK_FILE, purpose, GUARD_REFUSAL)


@contextlib.contextmanager
def folder_writer(run_dir: str | Path, purpose: str, held: HeldLock | None = None) -> Iterator[HeldLock]:
    """Hold what rollback and undo need: the run lock (or ``held``, the one the caller already holds: the
    supervisor between restarts) and the Guard lock (no live Guard writes into the folder meanwhile).

    Raises:
        RunLocked: either is held by a live process.
    """
    with contextlib.ExitStack() as stack:
        lock = held if held is not None else stack.enter_context(run_lock(run_dir, purpose))
        stack.enter_context(guard_lock(run_dir, purpose))
        yield lock


def check_writer_free(run_dir: str | Path, *, run_lock_held: bool = False) -> None:
    """Raise :class:`RunLocked` exactly where :func:`folder_writer` would; creates nothing. ``run_lock_held``:
    this process holds the run lock already (only the Guard lock is checked)."""
    folder = state_folder(run_dir, create=False)
    if not run_lock_held:
        check_free(folder / LOCK_FILE, RUN_REFUSAL)
    check_free(folder / GUARD_LOCK_FILE, GUARD_REFUSAL)


def utc_now() -> str:
    """The current UTC time to the second, ISO 8601 (the lock file's and backup manifests' timestamps)."""
    return dt.datetime.fromtimestamp(time.time(), dt.UTC).isoformat(timespec="seconds")
