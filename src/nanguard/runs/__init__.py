"""nanguard.runs owns operations on a framework's training run folder on disk, outside any training process.

    plan = plan_rollback("runs/detect/train", to="latest-clean", lr_scale=0.1)
    print(plan.resume_command)          # yolo train resume model=runs/detect/train/weights/last.pt
    result = apply_rollback(plan)       # backs up, rewrites last.pt, trims results.csv, records it
    undo_last("runs/detect/train")      # puts the backed-up files back, byte for byte

Only Ultralytics runs are supported (:mod:`nanguard.runs.ultralytics_disk`).
"""

from __future__ import annotations

from nanguard.runs.ultralytics_disk import (
    Candidate,
    RollbackPlan,
    RollbackRefused,
    RollbackResult,
    RunLocked,
    UndoResult,
    apply_rollback,
    plan_rollback,
    run_lock,
    undo_last,
)

__all__ = [
    "Candidate",
    "RollbackPlan",
    "RollbackRefused",
    "RollbackResult",
    "RunLocked",
    "UndoResult",
    "apply_rollback",
    "plan_rollback",
    "run_lock",
    "undo_last",
]
