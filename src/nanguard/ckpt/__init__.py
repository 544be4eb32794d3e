"""nanguard.ckpt owns checkpoints on disk: reading them safely, auditing them, writing them atomically, and
keeping a trainer's checkpoints clean (:class:`CheckpointKeeper`: pin clean, put back dirty, quarantine).

    verdict = audit("runs/detect/train/weights/last.pt")
    if verdict.status is Status.DIRTY:
        for finding in verdict.findings:
            print(finding)          # ema.model.0.conv.weight[0, 1, 2, 2]: nan x1 of 432 (ema)

Reading never executes code from the file: :func:`read_checkpoint` unpickles inertly, and
:func:`load_checkpoint` uses real classes only after every global is allowed. The core imports neither
Ultralytics, Lightning nor transformers.
"""

from __future__ import annotations

from nanguard.ckpt.audit import audit, audit_paths, audit_tree, inspect_checkpoint
from nanguard.ckpt.base import (
    Area,
    CheckpointTree,
    Finding,
    Format,
    Inspection,
    Kind,
    Status,
    Verdict,
    is_allowed_global,
)
from nanguard.ckpt.folders import find_checkpoints
from nanguard.ckpt.formats import read_checkpoint
from nanguard.ckpt.io import load_checkpoint, require_loadable, save_checkpoint
from nanguard.ckpt.keeper import CheckpointKeeper, load_guard_state, save_guard_state
from nanguard.ckpt.unpickler import InertObject
from nanguard.ckpt.walk import iter_tensors
from nanguard.errors import NoCheckpointsFound, UnreadableCheckpoint, UnsafeCheckpoint

__all__ = [
    "Area",
    "CheckpointKeeper",
    "CheckpointTree",
    "Finding",
    "Format",
    "InertObject",
    "Inspection",
    "Kind",
    "NoCheckpointsFound",
    "Status",
    "UnreadableCheckpoint",
    "UnsafeCheckpoint",
    "Verdict",
    "audit",
    "audit_paths",
    "audit_tree",
    "find_checkpoints",
    "inspect_checkpoint",
    "is_allowed_global",
    "iter_tensors",
    "load_checkpoint",
    "load_guard_state",
    "read_checkpoint",
    "require_loadable",
    "save_checkpoint",
    "save_guard_state",
]
