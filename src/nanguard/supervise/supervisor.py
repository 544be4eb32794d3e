"""supervisor.py owns the supervision loop: start the command, tee and scan its output, stop it on a trigger,
roll back, back off, restart, and record each step in the status file and the journal.

One attempt::

    starting ─► running ──(exit 0)──────────────────────────────► stopping ─► finished   exit 0
                   │ NaN in N progress lines / exit ≠ 0 / stall
                   ▼
                stopping (SIGTERM to the group, grace, SIGKILL; reap)
                   ├─ budget spent ───────────────────────────────────────► failed     exit 4
                   └─► rolling_back ─► waiting (back-off) ─► starting (next attempt)
    SIGINT/SIGTERM at any point: forwarded to the group, then ─────────────► stopped    exit 130/143

The process mechanics are :mod:`~nanguard.supervise.process`'s, the rollback :mod:`~nanguard.supervise.restart`'s,
the states and files :mod:`~nanguard.supervise.state`'s; log lines are understood by :mod:`nanguard.logscan`
(no parser here). Messages go to the ``nanguard.supervise`` logger; the command's own output goes to the log
file and to ``sink``.
"""

from __future__ import annotations

import codecs
import datetime as dt
import logging
import os
import shlex
import signal
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from types import FrameType
from typing import IO, TYPE_CHECKING, Any

from nanguard.errors import ExitCode
from nanguard.journal import Journal
from nanguard.runs.backups import recover_pending
from nanguard.runs.lock import HeldLock, run_lock
from nanguard.supervise.config import SupervisorConfig
from nanguard.supervise.process import Child, Watchdog
from nanguard.supervise.restart import prepare_restart
from nanguard.supervise.state import LOG_FILE, State, StatusFile, pid_lock

if TYPE_CHECKING:
    from nanguard.logscan import LogEvent, LogScanner

log = logging.getLogger("nanguard.supervise")

SIGNAL_EXIT_BASE = 128
"""The supervisor stopped by signal N exits ``128 + N`` (130 for SIGINT, 143 for SIGTERM), as a shell would."""


@dataclass(frozen=True)
class Outcome:
    """How the supervision ended: the final state, the exit status, and a one-line account."""

    state: State
    exit_code: int
    message: str
    restarts: int
    attempts: int


@dataclass(frozen=True)
class _Ending:
    """Why an attempt is ending. ``trigger`` is ``nan``, ``stall``, ``exit`` (non-zero), ``signal``, or ``None``
    (the command exited 0 by itself)."""

    trigger: str | None
    text: str
    returncode: int | None = None
    signum: int | None = None


class NanStreak:
    """Counts consecutive progress lines whose losses are non-finite; a finite progress line resets it.

    Generic logs have no progress lines: there each ``nonfinite`` event counts as one line. Ultralytics prints
    running epoch means, so once a loss turns ``nan`` every later line of that epoch shows it too.
    """

    def __init__(self, needed: int) -> None:
        self.needed = needed
        self.count = 0

    def observe(self, event: LogEvent) -> bool:
        """Count ``event``; True when the streak reached ``needed``."""
        if event.kind == "progress":
            self.count = self.count + 1 if event.nonfinite else 0
        elif event.kind == "nonfinite" and event.nonfinite:
            self.count += 1
        return self.count >= self.needed


class Supervisor:
    """Runs one ``nanguard run``: see the module docstring. Call :meth:`run` once, from the main thread
    (signal handlers can only be installed there; elsewhere SIGINT/SIGTERM are not forwarded)."""

    def __init__(self, config: SupervisorConfig, *, sink: IO[bytes] | None = None,
                 env: Mapping[str, str] | None = None) -> None:
        self.config = config
        self._sink = sink
        # Unbuffered: a Python child writing into a pipe would otherwise hold its lines in a 8 KiB buffer, and
        # the NaN and stall triggers would see them late.
        self._env = {**(os.environ if env is None else env), "PYTHONUNBUFFERED": "1"}
        self._signal: int | None = None
        self._hurry = False
        self._log_file: IO[bytes] | None = None
        self._journal: Journal | None = None
        self._child: Child | None = None  # the current attempt's process, reaped or not
        self._run_id = 0
        self._run_lock: HeldLock | None = None
        self.status: StatusFile | None = None

    # ---- the loop -----------------------------------------------------------------------------------------

    def run(self) -> Outcome:
        """Supervise until the command finishes, the budget is spent, or a signal comes.

        Raises:
            RunLocked: another ``nanguard run`` supervises this folder, or a rollback or undo holds the run lock
                (exit 5).
            JournalError: the journal cannot be opened.
            RollbackRefused, UnsafeCheckpoint: a planned rollback could not be applied (state ``failed``).
        """
        cfg = self.config
        # Both locks are held until the supervision ends: supervisor.pid (one nanguard run per folder) and the
        # run lock (no rollback or undo from another shell while the training is alive or between restarts).
        # The supervisor's own rollbacks run under the run lock it holds (prepare_restart(held=...)).
        with pid_lock(cfg.state_dir), run_lock(cfg.run_dir, f"nanguard run (pid {os.getpid()})") as lock:
            self._run_lock = lock
            recovered = recover_pending(cfg.run_dir)  # what a killed rollback or undo left, before training
            if recovered is not None:
                log.warning("%s", recovered)
            self._journal = Journal(cfg.run_dir)
            try:
                self._run_id = self._journal.start_run(policy={"supervisor": cfg.to_dict()}, rank=0)
                outcome = self._supervise()
            except BaseException as err:
                if self.status is not None and self.status.state not in (State.FINISHED, State.FAILED, State.STOPPED):
                    self.status.abort(str(err) or type(err).__name__)
                self._journal.end_run(self._run_id, State.FAILED.value)
                raise
            finally:
                self._journal.close()
        return outcome

    def _supervise(self) -> Outcome:
        cfg = self.config
        template = None if cfg.resume_command is None else shlex.split(cfg.resume_command)
        self.status = StatusFile(cfg.state_dir, {
            "command": list(cfg.command), "resume_command": template, "max_restarts": cfg.max_restarts})
        (cfg.state_dir / LOG_FILE).parent.mkdir(parents=True, exist_ok=True)
        self._record("supervisor_start", f"supervising {shlex.join(cfg.command)}",
                     {**cfg.to_dict(), "pid": os.getpid()})
        watchdog = Watchdog()
        previous = self._install_signal_handlers()
        restarts, attempt, command = 0, 1, list(cfg.command)
        try:
            while True:
                ending = self._attempt(command, attempt, restarts, watchdog)
                if ending.trigger is None:  # exited 0 by itself: finished, even if a signal came meanwhile
                    return self._finish(State.FINISHED, int(ExitCode.OK),
                                        f"the command finished (exit 0) after {restarts} restart(s)", restarts, attempt)
                if self._signal is not None:
                    name = signal.Signals(self._signal).name
                    return self._finish(State.STOPPED, SIGNAL_EXIT_BASE + self._signal,
                                        f"stopped by {name}; the command was ended", restarts, attempt)
                if restarts >= cfg.max_restarts:
                    return self._finish(State.FAILED, int(ExitCode.STOPPED),
                                        f"restart budget spent ({cfg.max_restarts} restart(s)); last trigger: "
                                        f"{ending.text}; the run folder is as the last attempt left it",
                                        restarts, attempt)
                self._move(State.ROLLING_BACK)
                try:
                    restart = prepare_restart(cfg, held=self._run_lock)
                except BaseException as err:
                    self._finish(State.FAILED, getattr(err, "exit_code", 1), f"rollback failed: {err}",
                                 restarts, attempt)
                    raise
                delay = cfg.backoff_for(restarts + 1)
                self._move(State.WAITING, resume_command=restart.command)
                log.info("restarting in %.3g s: %s", delay, shlex.join(restart.command))
                if not self._sleep(delay):
                    name = signal.Signals(self._signal or signal.SIGTERM).name
                    return self._finish(State.STOPPED, SIGNAL_EXIT_BASE + (self._signal or signal.SIGTERM),
                                        f"stopped by {name} while waiting to restart", restarts, attempt)
                restarts += 1
                attempt += 1
                command = restart.command
                self._record("supervisor_restart", f"restart {restarts} of {cfg.max_restarts}: "
                             f"{shlex.join(command)}", {**restart.detail, "attempt": attempt, "restart": restarts,
                                                        "delay_seconds": delay})
                self._move(State.STARTING, attempt=attempt, restarts=restarts, child_pid=None)
        finally:
            child = self._child
            if child is not None and child.alive:  # an exception mid-attempt: end what we started
                child.signal_group(signal.SIGKILL)
                while not child.has_exited():
                    time.sleep(0.01)
                child.reap(self._tee, drain_seconds=0.2)
            watchdog.close()
            self._restore_signal_handlers(previous)

    def _attempt(self, command: list[str], attempt: int, restarts: int, watchdog: Watchdog) -> _Ending:
        """Start ``command``, watch it until a trigger, an exit or a signal, end and reap it; returns why it
        ended."""
        cfg = self.config
        assert self.status is not None
        self._log_file = (cfg.state_dir / LOG_FILE).open("ab")
        try:
            when = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
            self._log_line(f"=== nanguard run: attempt {attempt} (restart {restarts} of {cfg.max_restarts}) "
                           f"started {when}: {shlex.join(command)} ===")
            try:
                child = self._child = Child.spawn(command, env=self._env)
            except OSError as err:
                # A resume command that cannot run counts as a failed attempt (exit 127, as a shell says).
                self._move(State.STOPPING, child_pid=None)
                ending = _Ending("exit", f"{command[0]}: cannot be run ({err.strerror or err})", 127)
                self._trigger(ending, attempt, None)
                return ending
            watchdog.arm(child.pgid)
            log.info("attempt %d: started pid %d: %s", attempt, child.pid, shlex.join(command))
            self._move(State.RUNNING, child_pid=child.pid)
            ending = self._watch(child)
            if ending.trigger is not None:
                self._trigger(ending, attempt, child.pid)
            self._move(State.STOPPING)
            started = time.monotonic()
            how = self._stop(child, ending)
            watchdog.disarm()
            returncode = child.returncode
            self._log_line(f"=== nanguard run: attempt {attempt} ended: {how}, exit status {returncode} ===")
            self._record("supervisor_stop", f"attempt {attempt}: pid {child.pid} {how}, exit status {returncode}",
                         {"attempt": attempt, "pid": child.pid, "how": how, "returncode": returncode,
                          "trigger": ending.trigger, "seconds": round(time.monotonic() - started, 3)})
            return ending
        finally:
            self._log_file.close()
            self._log_file = None

    def _watch(self, child: Child) -> _Ending:
        """Tee and scan the child's output until a trigger fires, it exits, or a signal comes."""
        from nanguard.logscan import LogScanner

        cfg = self.config
        scanner = LogScanner(fmt="auto", pattern=None, source=str(cfg.state_dir / LOG_FILE))
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")  # a chunk may split a character
        streak = NanStreak(cfg.nan_lines)
        last_output = time.monotonic()
        while True:
            if self._signal is not None:
                name = signal.Signals(self._signal).name
                return _Ending("signal", f"{name} to the supervisor", signum=self._signal)
            data = child.read(0.1)
            if data:
                last_output = time.monotonic()
                self._tee(data)
                ending = self._scan(scanner, scanner.feed(decoder.decode(data)), streak)
                if ending is not None:
                    return ending
            if child.has_exited():
                code = _exit_status(child.pid)
                if code == 0:
                    return _Ending(None, "exit status 0", 0)
                return _Ending("exit", f"the command failed (exit status {code})", code)
            quiet = time.monotonic() - last_output
            if quiet >= cfg.stall_seconds:
                return _Ending("stall", f"no output for {quiet / 60:.3g} minutes (--stall-minutes "
                               f"{cfg.stall_seconds / 60:g})")

    def _scan(self, scanner: LogScanner, events: list[LogEvent], streak: NanStreak) -> _Ending | None:
        assert self.status is not None
        for event in events:
            if event.kind == "progress":
                self.status.update(throttle=True, last_progress={
                    "epoch": event.epoch, "batch": event.batch, "batches": event.batches, "epochs": event.epochs})
            if streak.observe(event):
                where = _where(event)
                return _Ending("nan", f"{streak.count} consecutive progress line(s) with a non-finite loss"
                               + (f" ({where})" if where else ""))
        return None

    def _stop(self, child: Child, ending: _Ending) -> str:
        """End the child's group (unless it already exited) and reap it; returns ``exited``, ``terminated``
        (within the grace period) or ``killed`` (SIGKILL after it)."""
        how = "exited"
        if ending.trigger not in (None, "exit") and not child.has_exited():
            first = ending.signum if ending.signum is not None else signal.SIGTERM
            log.info("stopping pid %d (%s): %s to its process group, SIGKILL after %g s", child.pid, ending.text,
                     signal.Signals(first).name, self.config.grace_seconds)
            child.signal_group(first)
            how = "terminated"
            deadline = time.monotonic() + self.config.grace_seconds
            while not child.has_exited() and time.monotonic() < deadline and not self._hurry:
                self._pump(child)
            if not child.has_exited():
                how = "killed"
                log.info("pid %d still running: SIGKILL to its process group", child.pid)
                child.signal_group(signal.SIGKILL)
                while not child.has_exited():
                    self._pump(child)
        child.reap(self._tee)
        return how

    # ---- helpers ------------------------------------------------------------------------------------------

    def _pump(self, child: Child) -> None:
        # Keep reading while the child shuts down: with a full pipe it would block writing and never exit.
        data = child.read(0.05)
        if data:
            self._tee(data)

    def _tee(self, data: bytes) -> None:
        if self._log_file is not None:
            self._log_file.write(data)
            self._log_file.flush()
        if self._sink is not None:
            try:
                self._sink.write(data)
                self._sink.flush()
            except (OSError, ValueError):
                self._sink = None  # stdout went away (a closed pipe): keep supervising, the log has it all

    def _log_line(self, text: str) -> None:
        self._tee(f"\n{text}\n".encode())

    def _trigger(self, ending: _Ending, attempt: int, pid: int | None) -> None:
        assert self.status is not None
        text = f"{ending.trigger}: {ending.text}"
        log.warning("attempt %d: %s", attempt, text)
        self.status.update(last_trigger=text)
        self._record("supervisor_trigger", text, {
            "attempt": attempt, "pid": pid, "trigger": ending.trigger, "text": ending.text,
            "returncode": ending.returncode, "progress": self.status.data["last_progress"]})

    def _finish(self, state: State, code: int, message: str, restarts: int, attempts: int) -> Outcome:
        self._move(state, child_pid=None)
        self._record("supervisor_exit", message, {"state": state.value, "exit_code": code, "restarts": restarts,
                                                  "attempts": attempts})
        assert self._journal is not None
        self._journal.end_run(self._run_id, state.value)
        if state is not State.FAILED:  # a failed run's message is the CLI's one error line
            log.info("%s", message)
        return Outcome(state, code, message, restarts, attempts)

    def _move(self, state: State, **fields: Any) -> None:
        assert self.status is not None
        self.status.move(state, **fields)

    def _record(self, action: str, reason: str, detail: dict[str, Any]) -> None:
        assert self._journal is not None
        # step -1: the supervisor sees no optimizer step; the epoch and batch are in detail["progress"].
        self._journal.record_action(self._run_id, step=-1, action=action, reason=reason, detail=detail)

    def _sleep(self, seconds: float) -> bool:
        """Wait ``seconds``; False when a signal came first."""
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            if self._signal is not None:
                return False
            time.sleep(min(0.05, max(0.0, deadline - time.monotonic())))
        return self._signal is None

    def _install_signal_handlers(self) -> dict[int, Any]:
        if threading.current_thread() is not threading.main_thread():
            return {}
        return {sig: signal.signal(sig, self._on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}

    def _restore_signal_handlers(self, previous: dict[int, Any]) -> None:
        for sig, handler in previous.items():
            signal.signal(sig, handler)

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        # Only flags: the loop notices within 0.1 s. A second signal skips the rest of the grace period.
        if self._signal is None:
            self._signal = signum
            log.info("%s received: ending the command", signal.Signals(signum).name)
        else:
            self._hurry = True


def _exit_status(pid: int) -> int:
    """The exit status of the exited, unreaped child ``pid`` (``-N`` when signal N ended it)."""
    info = os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
    if info is None:
        return -1
    return -info.si_status if info.si_code in (os.CLD_KILLED, os.CLD_DUMPED) else info.si_status


def _where(event: LogEvent) -> str:
    parts = []
    if event.epoch is not None:
        parts.append(f"epoch {event.epoch + 1}" + (f"/{event.epochs}" if event.epochs else ""))
    if event.batch is not None:
        parts.append(f"batch {event.batch + 1}" + (f"/{event.batches}" if event.batches else ""))
    return ", ".join(parts)
