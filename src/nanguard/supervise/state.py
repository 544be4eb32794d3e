"""state.py owns what the supervisor shows the outside: its states and their one transition table, the status
file ``<run>/.nanguard/supervisor.json``, and the PID file ``<run>/.nanguard/supervisor.pid`` that is also
its lock.

The status file is the contract with ``nanguard status`` (see docs/supervise.md): rewritten atomically
(:func:`nanguard.atomic.atomic_write_bytes`) on every state change and at most once a second as progress
lines arrive. The PID file is held with ``flock`` for the supervisor's life, so the kernel releases it when
the supervisor dies, even by SIGKILL: a stale file never blocks a new ``nanguard run``. It is taken the same
way as the run lock (:mod:`nanguard.runs.lock`), which the supervisor also holds for its whole life (so
``nanguard rollback`` and ``undo`` from another shell are refused) and under which its own rollbacks run.
"""

from __future__ import annotations

import json
import os
import time
from enum import Enum
from pathlib import Path
from typing import Any

from nanguard.atomic import atomic_write_bytes
from nanguard.paths import BadPath, read_json_file
from nanguard.runs.lock import HeldLock, acquire

STATUS_FILE = "supervisor.json"
MAX_STATUS_BYTES = 1 << 20
"""Largest supervisor.json read (1 MiB): the supervisor writes a few KB (pids, times, the command, the last
progress line); a larger file is not one it wrote, and is reported unreadable instead of read."""
PID_FILE = "supervisor.pid"
LOG_FILE = "supervisor/train.log"
"""The tee'd output of every attempt, relative to ``<run>/.nanguard``."""


class State(str, Enum):
    """Where the supervisor is; ``supervisor.json`` holds the value."""

    STARTING = "starting"
    """About to start the command (first attempt or a restart)."""
    RUNNING = "running"
    """The command runs; its output is tee'd and scanned."""
    STOPPING = "stopping"
    """A trigger fired, the command exited, or a signal came: its process group is being ended and reaped."""
    ROLLING_BACK = "rolling_back"
    """Auditing checkpoints and rolling the run back on disk before a restart."""
    WAITING = "waiting"
    """Backing off before the restart."""
    FINISHED = "finished"
    """The command exited 0. Final."""
    FAILED = "failed"
    """The restart budget was spent, or a rollback could not be done. Final."""
    STOPPED = "stopped"
    """SIGINT or SIGTERM reached the supervisor; it ended the command and exited. Final."""


TRANSITIONS: dict[State, frozenset[State]] = {
    State.STARTING: frozenset({State.RUNNING, State.STOPPING}),
    State.RUNNING: frozenset({State.STOPPING}),
    State.STOPPING: frozenset({State.FINISHED, State.FAILED, State.STOPPED, State.ROLLING_BACK}),
    State.ROLLING_BACK: frozenset({State.WAITING, State.FAILED, State.STOPPED}),
    State.WAITING: frozenset({State.STARTING, State.STOPPED}),
    State.FINISHED: frozenset(),
    State.FAILED: frozenset(),
    State.STOPPED: frozenset(),
}
"""Every legal move; :meth:`StatusFile.move` refuses any other. STARTING → STOPPING covers a restart command
that cannot be run (treated like a failed exit). An exception (a bug, a full disk, a rollback that cannot be
applied) ends any state in FAILED through :meth:`StatusFile.abort`."""


class IllegalTransition(RuntimeError):
    """A move not in :data:`TRANSITIONS`: a bug in the supervisor, never the user's input."""


class StatusFile:
    """The supervisor's state as ``supervisor.json``; every change goes through :meth:`move` or :meth:`update`."""

    def __init__(self, state_dir: Path, fields: dict[str, Any]) -> None:
        self.path = state_dir / STATUS_FILE
        self.state = State.STARTING
        now = time.time()
        self.data: dict[str, Any] = {
            "pid": os.getpid(), "child_pid": None, "state": self.state.value, "attempt": 1, "restarts": 0,
            "max_restarts": 0, "log": f"{state_dir.name}/{LOG_FILE}", "command": [], "resume_command": None,
            "started_at": now, "updated_at": now, "last_trigger": None, "last_progress": None,
        }
        self.data.update(fields)
        self._written = 0.0
        self.write()

    def move(self, state: State, **fields: Any) -> None:
        """Change state (checked against :data:`TRANSITIONS`) and any other fields, and write the file."""
        if state is not self.state and state not in TRANSITIONS[self.state]:
            raise IllegalTransition(f"supervisor state {self.state.value} -> {state.value}")
        self.state = state
        self.update(state=state.value, **fields)

    def abort(self, reason: str) -> None:
        """An unexpected error (a bug, a full disk) ends any state in ``failed``; outside the table on purpose."""
        self.state = State.FAILED
        self.update(state=State.FAILED.value, child_pid=None, last_trigger=f"error: {reason}")

    def update(self, *, throttle: bool = False, **fields: Any) -> None:
        """Change fields and write the file; with ``throttle``, write at most once a second."""
        self.data.update(fields)
        if throttle and time.monotonic() - self._written < 1.0:
            return
        self.write()

    def write(self) -> None:
        self.data["updated_at"] = time.time()
        atomic_write_bytes(self.path, (json.dumps(self.data, indent=2) + "\n").encode("utf-8"))
        self._written = time.monotonic()


def status_path(run_dir: str | Path) -> Path:
    """Where the supervisor of ``run_dir`` keeps its status file."""
    from nanguard.journal import JOURNAL_DIR

    return Path(run_dir) / JOURNAL_DIR / STATUS_FILE


def load_status(run_dir: str | Path) -> dict[str, Any]:
    """The supervisor's status file of ``run_dir``, parsed: the one reader of it (``nanguard status`` too).

    Raises:
        OSError: it cannot be read (``FileNotFoundError`` when there is none).
        ValueError: it is not JSON (``UnicodeDecodeError`` included) or not a JSON object.
    """
    try:
        data = read_json_file(status_path(run_dir), MAX_STATUS_BYTES, "supervisor status file")
    except BadPath as err:  # too large, a FIFO (would block), a folder: as unreadable as a missing file
        raise OSError(str(err)) from None
    if not isinstance(data, dict):
        raise ValueError(f"not a JSON object (a {type(data).__name__})")
    return data


def read_status(run_dir: str | Path) -> dict[str, Any] | None:
    """The supervisor's status file of ``run_dir``, or ``None`` when there is none (or it is unreadable)."""
    try:
        return load_status(run_dir)
    except (OSError, ValueError):
        return None


def pid_lock(state_dir: Path) -> HeldLock:
    """Hold ``supervisor.pid`` (:func:`nanguard.runs.lock.acquire`: ``flock``, holding this process's pid, host,
    time); removed when released.

    Raises:
        RunLocked: another live supervisor holds it (exit code 5); the message names its pid.
    """
    state_dir.mkdir(parents=True, exist_ok=True)
    return acquire(state_dir / PID_FILE, "nanguard run",
                   "another nanguard run supervises this run folder; stop it first")
