"""nanguard keeps long PyTorch training runs healthy.

``import nanguard`` is cheap: the public names below are loaded on first use, so the CLI can answer
``--help`` and read journals without importing torch.

    guard = nanguard.Guard(model, optimizer, run_dir="out")
    ...
    loss.backward()
    guard.step(loss)          # instead of optimizer.step(); optimizer.zero_grad()
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_EXPORTS = {
    "Guard": "nanguard.guard",
    "StepResult": "nanguard.guard",
    "EMA": "nanguard.ema",
    "Batch": "nanguard.data",
    "SkipList": "nanguard.data",
    "Policy": "nanguard.policy",
    "Action": "nanguard.policy",
    "Journal": "nanguard.journal",
    "read_incidents": "nanguard.journal",
    "read_actions": "nanguard.journal",
    "NanguardError": "nanguard.errors",
    "PolicyError": "nanguard.errors",
    "TrainingStopped": "nanguard.errors",
    "ExitCode": "nanguard.errors",
}

__all__ = [
    "EMA",
    "Action",
    "Batch",
    "ExitCode",
    "Guard",
    "Journal",
    "NanguardError",
    "Policy",
    "PolicyError",
    "SkipList",
    "StepResult",
    "TrainingStopped",
    "__version__",
    "read_actions",
    "read_incidents",
]

if TYPE_CHECKING:
    from nanguard.data import Batch, SkipList
    from nanguard.ema import EMA
    from nanguard.errors import ExitCode, NanguardError, PolicyError, TrainingStopped
    from nanguard.guard import Guard, StepResult
    from nanguard.journal import Journal, read_actions, read_incidents
    from nanguard.policy import Action, Policy


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'nanguard' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value
