"""processes.py owns what ``nanguard status`` says about live processes: the supervisor's state file and psutil.

``nanguard run`` (the supervisor) keeps ``RUN_DIR/.nanguard/supervisor.json`` current: its pid and its child's,
its state (starting, running, stopping, rolling_back, waiting, finished, failed, stopped), attempts and
restarts, the log, the commands, and the last progress it parsed. :func:`read_supervisor` reads it and never
fails: a missing file means no supervisor, a malformed one is reported as such. :func:`probe` asks psutil
whether a pid is alive and what it costs (CPU, resident memory), refusing a pid that was reused by a
process started after the one the journal or the state file names.

It signals nothing and writes nothing. psutil is optional (the ``monitor`` extra); without it the process
state is reported as unknown.
"""

from __future__ import annotations

import math
import os
import socket
from dataclasses import asdict, dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from nanguard.supervise.state import STATUS_FILE, State, load_status, status_path

SUPERVISOR_FILE = STATUS_FILE
"""The supervisor's state file, in the run's ``.nanguard`` folder (owned by :mod:`nanguard.supervise.state`)."""
SUPERVISOR_STATES = tuple(state.value for state in State)
CPU_SAMPLE_S = 0.1
"""How long :func:`probe` measures a process's CPU use (psutil needs two readings)."""


@dataclass(frozen=True)
class ProcessState:
    """One process as psutil sees it now.

    Attributes:
        role: what it is to the run (``supervisor``, ``training``, ``guard``).
        pid: its id.
        alive: whether it runs now (None: cannot tell, e.g. another host or no psutil).
        cpu_percent: CPU use over :data:`CPU_SAMPLE_S` (100 = one core), when alive.
        rss_bytes: resident memory, when alive.
        name: the executable's name, when alive.
        note: why ``alive`` is None or False, when it is.
    """

    role: str
    pid: int
    alive: bool | None
    cpu_percent: float | None = None
    rss_bytes: int | None = None
    name: str | None = None
    note: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class SupervisorState:
    """What ``supervisor.json`` says, and whether its processes are alive.

    Attributes:
        path: the file.
        present: the file exists.
        error: why it could not be used (malformed JSON, not an object, bad fields), else None.
        data: its content (``{}`` when absent or malformed).
        processes: the supervisor and its child, probed.
    """

    path: Path
    present: bool
    error: str | None
    data: dict[str, Any]
    processes: tuple[ProcessState, ...] = ()

    @property
    def state(self) -> str | None:
        value = self.data.get("state")
        return value if isinstance(value, str) else None

    def to_dict(self) -> dict[str, Any]:
        return {"path": str(self.path), "present": self.present, "error": self.error, **self.data,
                "processes": [p.to_dict() for p in self.processes]}


def read_supervisor(run_dir: Path, *, probe_processes: bool = True) -> SupervisorState:
    """Read ``RUN_DIR/.nanguard/supervisor.json``; never raises."""
    path = status_path(run_dir)
    if not os.path.lexists(path):  # a FIFO or folder named like it is there, and reported unreadable below
        return SupervisorState(path, False, None, {})
    try:
        data = load_status(run_dir)
    except (OSError, ValueError) as err:
        return SupervisorState(path, True, f"unreadable ({type(err).__name__}: {err})", {})
    problems = []
    state = data.get("state")
    if state not in SUPERVISOR_STATES:
        problems.append(f"unknown state {state!r}")
    for key in ("command", "resume_command", "log"):  # shown as text: a string, or a list of strings
        value = data.get(key)
        if value is not None and not (isinstance(value, str)
                                      or (isinstance(value, list) and all(isinstance(v, str) for v in value))):
            problems.append(f"{key} is not a command line")
            data = {k: v for k, v in data.items() if k != key}
    progress = data.get("last_progress")
    if progress is not None and not isinstance(progress, dict):
        problems.append("last_progress is not an object")
        data = {**data, "last_progress": None}
    processes: list[ProcessState] = []
    started = timestamp(data.get("started_at"))
    for role, key in (("supervisor", "pid"), ("training", "child_pid")):
        pid = data.get(key)
        if pid is None:
            continue
        if not isinstance(pid, int) or isinstance(pid, bool) or pid <= 0:
            problems.append(f"{key} {pid!r} is not a process id")
            continue
        if probe_processes:
            # The child starts after the supervisor; only the supervisor's own start time bounds its pid.
            processes.append(probe(role, pid, started_before=started if role == "supervisor" else None))
    return SupervisorState(path, True, "; ".join(problems) or None, data, tuple(processes))


def probe(role: str, pid: int, *, host: str | None = None, started_before: float | None = None) -> ProcessState:
    """Whether ``pid`` is alive now, with its CPU and memory use.

    Args:
        role: what the process is to the run (kept in the result).
        pid: the process id.
        host: the host the pid belongs to; another host's pid is not looked up.
        started_before: the time (seconds since the epoch) the named process was known to run; a process
            with that pid created later is another one (the pid was reused), so the named one is gone.
    """
    if host is not None and host != socket.gethostname():
        return ProcessState(role, pid, None, note=f"on host {host}, not this one")
    try:
        import psutil
    except ImportError:
        return ProcessState(role, pid, None, note="psutil is not installed (pip install psutil)")
    try:
        process = psutil.Process(pid)
        created = process.create_time()
        # create_time is rounded to clock ticks; one second of slack keeps a fast-starting process its own.
        if started_before is not None and created > started_before + 1.0:
            return ProcessState(role, pid, False, note="exited (its pid now belongs to a newer process)")
        if process.status() == psutil.STATUS_ZOMBIE:
            return ProcessState(role, pid, False, note="exited (zombie, not yet reaped)")
        with process.oneshot():
            name = process.name()
            rss = int(process.memory_info().rss)
        cpu = process.cpu_percent(interval=CPU_SAMPLE_S)
    except psutil.NoSuchProcess:
        return ProcessState(role, pid, False, note="not running")
    except psutil.AccessDenied:
        return ProcessState(role, pid, True, note="running; access denied to its CPU and memory")
    return ProcessState(role, pid, True, cpu_percent=float(cpu), rss_bytes=rss, name=name)


def timestamp(value: Any) -> float | None:
    """Seconds since the epoch from a number or an ISO 8601 string (``supervisor.json`` times); None else."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, str):
        try:
            parsed = datetime.fromisoformat(value)
        except ValueError:
            return None
        return parsed.timestamp()
    return None
