"""nanguard.runs owns operations on a framework's training run folder on disk, outside any training process.

    plan = plan_rollback("runs/detect/train", to="latest-clean", lr_scale=0.1)
    print(plan.resume_command)          # yolo train resume model=runs/detect/train/weights/last.pt
    result = apply_rollback(plan)       # backs up, rewrites last.pt, trims results.csv, records it
    undo_last("runs/detect/train")      # puts the backed-up files back, byte for byte

Only Ultralytics runs are supported. The package is split by role: :mod:`~nanguard.runs.ultralytics_disk`
plans and applies a rollback, :mod:`~nanguard.runs.candidates` audits each checkpoint for it,
:mod:`~nanguard.runs.backups` takes backups, undoes them and recovers killed commands,
:mod:`~nanguard.runs.intent` keeps the intent record that makes them all-or-nothing,
:mod:`~nanguard.runs.lock` holds the locks,
:mod:`~nanguard.runs.results_csv` trims results.csv, and :mod:`~nanguard.runs.base` holds the shared names
and :class:`RollbackRefused`.
"""

from __future__ import annotations

from nanguard.runs.backups import UndoResult, undo_last
from nanguard.runs.base import RollbackRefused
from nanguard.runs.candidates import Candidate
from nanguard.runs.lock import RunLocked, run_lock
from nanguard.runs.ultralytics_disk import (
    RollbackPlan,
    RollbackResult,
    apply_rollback,
    check_apply,
    plan_rollback,
    recover,
)

__all__ = [
    "Candidate",
    "RollbackPlan",
    "RollbackRefused",
    "RollbackResult",
    "RunLocked",
    "UndoResult",
    "apply_rollback",
    "check_apply",
    "plan_rollback",
    "recover",
    "run_lock",
    "undo_last",
]
