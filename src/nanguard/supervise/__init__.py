"""nanguard.supervise owns ``nanguard run``: the same check → act → record loop as the guard, from outside a
training command nanguard cannot change.

    config = SupervisorConfig(command=("yolo", "train", "data=coco8.yaml", "project=runs", "name=a",
                                       "exist_ok=True", "save_period=1"), run_dir=Path("runs/a"))
    outcome = Supervisor(config, sink=sys.stdout.buffer).run()   # blocks until the training is over
    outcome.exit_code                                            # 0 finished, 4 budget spent, 130/143 signal

It starts the command in a process group of its own, tees its output to ``<run>/.nanguard/supervisor/
train.log``, reads it with :mod:`nanguard.logscan`, and on a trigger (NaN in N consecutive progress lines, a
failed exit, no output for T minutes) ends the group, rolls the run back on disk and restarts with the resume
command, within a restart budget. The package is split by role:

- :mod:`~nanguard.supervise.config`: :class:`SupervisorConfig`, placeholders, the errors;
- :mod:`~nanguard.supervise.process`: the child process, its group, and the watchdog;
- :mod:`~nanguard.supervise.watchdog`: the watchdog script (standard library only);
- :mod:`~nanguard.supervise.state`: the states, ``supervisor.json`` and the ``supervisor.pid`` lock;
- :mod:`~nanguard.supervise.restart`: audit, rollback and the restart's command;
- :mod:`~nanguard.supervise.supervisor`: the loop.

It changes checkpoints only through :mod:`nanguard.runs` (Ultralytics) and parses no log itself.
"""

from __future__ import annotations

from nanguard.supervise.config import (
    PLACEHOLDERS,
    RestartBudgetSpent,
    SupervisorConfig,
    SupervisorInputError,
)
from nanguard.supervise.restart import Restart, newest_clean_checkpoint, prepare_restart
from nanguard.supervise.state import LOG_FILE, PID_FILE, STATUS_FILE, TRANSITIONS, State, read_status
from nanguard.supervise.supervisor import SIGNAL_EXIT_BASE, NanStreak, Outcome, Supervisor

__all__ = [
    "LOG_FILE",
    "PID_FILE",
    "PLACEHOLDERS",
    "SIGNAL_EXIT_BASE",
    "STATUS_FILE",
    "TRANSITIONS",
    "NanStreak",
    "Outcome",
    "Restart",
    "RestartBudgetSpent",
    "State",
    "Supervisor",
    "SupervisorConfig",
    "SupervisorInputError",
    "newest_clean_checkpoint",
    "prepare_restart",
    "read_status",
]
