"""watchdog.py ends the supervised command's process group when the supervisor dies without ending it.

The supervisor starts this file as its own small process (``python -I watchdog.py``, in a session of its own
so a Ctrl-C on the terminal does not reach it) and keeps the only write end of its stdin. It writes one line
per event: the process-group id of the child it just started, or ``0`` once that child is reaped. When stdin
reaches end-of-file (the supervisor exited, or was killed with SIGKILL) while a group is announced, the
watchdog sends SIGKILL to that group until no member is left (at most a few seconds), then exits.

The child itself also dies with the supervisor (``PR_SET_PDEATHSIG``); this process covers what that cannot:
grandchildren (data-loader workers, a shell's children) in the child's group. It imports only the standard
library and nothing from nanguard, so it starts in tens of milliseconds and cannot fail on an import.
"""

from __future__ import annotations

import os
import signal
import sys
import time

KILL_SECONDS = 5.0
"""How long the watchdog keeps sending SIGKILL to the group before it gives up (a member stuck in the kernel)."""


def main() -> None:
    # SIGINT/SIGTERM meant for the supervisor's group must not take the watchdog down before it did its job.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    pgid = 0
    for line in sys.stdin:
        try:
            pgid = int(line)
        except ValueError:
            continue
    if pgid > 0:
        kill_group(pgid)


def kill_group(pgid: int) -> None:
    """SIGKILL the group ``pgid`` until it has no member left, for at most :data:`KILL_SECONDS`.

    Repeated because a member may fork while the first signal is delivered. The group id is the supervised
    child's pid; Linux does not hand that pid to a new process while any process still carries it as its
    group id, so every signal here reaches only members of the child's group.
    """
    deadline = time.monotonic() + KILL_SECONDS
    while time.monotonic() < deadline:
        try:
            os.killpg(pgid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            return
        time.sleep(0.05)


if __name__ == "__main__":
    main()
