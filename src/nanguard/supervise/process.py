"""process.py owns the supervised command's processes: starting the child in a session of its own, reading its
merged output, seeing it exit without reaping it, signalling its process group, reaping it, and the watchdog.

Two rules keep the supervisor from ever signalling a process it did not start:

- it signals only the child's process group (``setsid`` makes its id the child's pid), and only while the
  child is unreaped. Exit is seen with ``waitid(..., WNOWAIT)``, which leaves the child a zombie: while it
  is one, Linux cannot give its pid (the group id) to another process. Stragglers of the group are then
  killed, and only after that is the child reaped (:meth:`Child.reap`).
- the watchdog (:mod:`~nanguard.supervise.watchdog`) learns the group id over a pipe and clears it once the
  child is reaped.

If the supervisor dies, ``PR_SET_PDEATHSIG`` (set in the child between fork and exec, Linux only) kills the
child, and the watchdog kills the rest of its group. Deciding when to stop or restart is
:mod:`~nanguard.supervise.supervisor`'s job, not this module's.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import select
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import IO

_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
WATCHDOG_SCRIPT = Path(__file__).with_name("watchdog.py")
READ_BYTES = 65536


def _libc() -> ctypes.CDLL | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(None, use_errno=True)
    except OSError:
        return None


class Child:
    """One run of the training command: its pid (also its process-group id) and the read end of its output.

    Attributes:
        pid: the child's pid, equal to its process-group id.
        returncode: set by :meth:`reap`; negative ``-N`` when signal N ended it (as :mod:`subprocess` does).
    """

    def __init__(self, popen: subprocess.Popen[bytes]) -> None:
        assert popen.stdout is not None
        self._popen = popen
        self._out: IO[bytes] = popen.stdout
        self.pid = popen.pid
        self.started = time.monotonic()
        self.returncode: int | None = None
        self._exited = False
        self._eof = False

    @classmethod
    def spawn(cls, command: Sequence[str], *, env: Mapping[str, str]) -> Child:
        """Start ``command`` in a new session, stdin from /dev/null, stdout and stderr into one pipe.

        Raises:
            OSError: the program cannot be run (not found, not executable).
        """
        parent = os.getpid()
        libc = _libc()  # loaded before fork: the child between fork and exec should only make a system call

        def in_child() -> None:
            if libc is not None:
                libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
                if os.getppid() != parent:  # the supervisor died before prctl took effect
                    os.kill(os.getpid(), signal.SIGKILL)

        popen = subprocess.Popen(
            list(command), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            env=dict(env), start_new_session=True, preexec_fn=in_child,
        )
        return cls(popen)

    @property
    def pgid(self) -> int:
        return self.pid

    @property
    def alive(self) -> bool:
        """Not yet reaped (it may have exited; then it is a zombie that still holds its group id)."""
        return self.returncode is None

    def read(self, timeout: float) -> bytes | None:
        """Output that arrives within ``timeout`` seconds: bytes, ``b""`` once every writer closed the pipe, or
        ``None`` when nothing came."""
        if self._eof:
            time.sleep(timeout)
            return None
        ready, _, _ = select.select([self._out], [], [], timeout)
        if not ready:
            return None
        data = os.read(self._out.fileno(), READ_BYTES)
        if not data:
            self._eof = True
        return data

    @property
    def eof(self) -> bool:
        return self._eof

    def has_exited(self) -> bool:
        """Whether the child has exited, without reaping it (``WNOWAIT``: its group id stays reserved)."""
        if not self._exited and self.returncode is None:
            info = os.waitid(os.P_PID, self.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
            self._exited = info is not None and info.si_pid == self.pid
        return self._exited or self.returncode is not None

    def signal_group(self, sig: int) -> bool:
        """Send ``sig`` to the child's process group; only while the child is unreaped. True when sent."""
        if self.returncode is not None:
            return False
        try:
            os.killpg(self.pgid, sig)
        except (ProcessLookupError, PermissionError):
            return False
        return True

    def reap(self, on_output: Callable[[bytes], None], *, drain_seconds: float = 1.0) -> int:
        """After the child exited: SIGKILL what is left of its group, pass on the output still in the pipe
        (until end-of-file or ``drain_seconds``), reap the child and return its return code."""
        assert self.has_exited(), "reap() before the child exited"
        # Stragglers (data-loader workers, a shell's children) would hold the pipe open and run on.
        self.signal_group(signal.SIGKILL)
        deadline = time.monotonic() + drain_seconds
        while not self._eof and time.monotonic() < deadline:
            data = self.read(0.05)
            if data:
                on_output(data)
        self.returncode = self._popen.wait()
        with contextlib.suppress(OSError):
            self._out.close()
        return self.returncode


class Watchdog:
    """The small process that kills the child's group if the supervisor dies (see the module docstring)."""

    def __init__(self) -> None:
        self._popen = subprocess.Popen(
            [sys.executable, "-I", str(WATCHDOG_SCRIPT)], stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL, start_new_session=True,
        )

    @property
    def pid(self) -> int:
        return self._popen.pid

    def arm(self, pgid: int) -> None:
        """Guard ``pgid`` from now on."""
        self._send(pgid)

    def disarm(self) -> None:
        """Stop guarding: the child was reaped, its group id may be reused."""
        self._send(0)

    def close(self) -> None:
        """Disarm and let the watchdog exit (it reads end-of-file with nothing to kill)."""
        with contextlib.suppress(OSError):
            self.disarm()
        with contextlib.suppress(OSError):
            assert self._popen.stdin is not None
            self._popen.stdin.close()
        try:
            self._popen.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self._popen.kill()  # our own process, started above
            self._popen.wait()

    def _send(self, pgid: int) -> None:
        assert self._popen.stdin is not None
        self._popen.stdin.write(f"{pgid}\n".encode())
        self._popen.stdin.flush()
