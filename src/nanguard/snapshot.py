"""snapshot.py owns capturing and restoring training state in memory.

A :class:`Snapshot` holds deep copies of the ``state_dict`` of every registered component (model,
optimizer, EMA, GradScaler, scheduler) at one step. The guard takes one only after a scan found the
state clean, so restoring it always goes back to verified-clean values. Copies reuse the previous
snapshot's tensors when shapes match (``copy_`` into them), so steady-state captures allocate nothing.

What is left out on purpose, for now: RNG streams and the data position. Restoring a snapshot puts the
weights and optimizer back; it does not replay the batches since (exact replay with data skipping
builds on this module).
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import Tensor


class Stateful(Protocol):
    def state_dict(self) -> Any: ...

    def load_state_dict(self, state: Any, /) -> Any: ...


def copy_state(value: Any, reuse: Any = None) -> Any:
    """A deep copy of a state tree. Tensors are copied into ``reuse``'s tensor at the same place when it
    has the same shape, dtype and device; otherwise they are cloned."""
    if isinstance(value, Tensor):
        if (
            isinstance(reuse, Tensor)
            and reuse.shape == value.shape
            and reuse.dtype == value.dtype
            and reuse.device == value.device
        ):
            return reuse.copy_(value.detach())
        return value.detach().clone()
    if isinstance(value, Mapping):
        old = reuse if isinstance(reuse, Mapping) else {}
        out: Any = type(value)((k, copy_state(v, old.get(k))) for k, v in value.items())  # type: ignore[call-arg]
        if hasattr(value, "_metadata"):  # module state_dicts carry per-module versions used on load
            out._metadata = copy.deepcopy(value._metadata)
        return out
    if isinstance(value, list | tuple):
        old_seq = reuse if isinstance(reuse, list | tuple) and len(reuse) == len(value) else [None] * len(value)
        items = [copy_state(v, o) for v, o in zip(value, old_seq, strict=True)]
        return items if isinstance(value, list) else tuple(items)
    return copy.deepcopy(value)


@dataclass
class Snapshot:
    """Copies of each component's state at ``step``."""

    step: int
    states: dict[str, Any] = field(default_factory=dict)

    @classmethod
    @torch.no_grad()
    def capture(cls, step: int, components: Mapping[str, Stateful], reuse: Snapshot | None = None) -> Snapshot:
        old = reuse.states if reuse is not None else {}
        states = {name: copy_state(comp.state_dict(), old.get(name)) for name, comp in components.items()}
        return cls(step=step, states=states)

    @torch.no_grad()
    def restore(self, components: Mapping[str, Stateful]) -> None:
        """Load every component's copy back. The snapshot stays usable for a later restore: components
        that keep what they are given (optimizers do) get a fresh copy."""
        for name, comp in components.items():
            comp.load_state_dict(copy_state(self.states[name]))
