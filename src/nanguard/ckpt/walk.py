"""walk.py owns naming the values of a checkpoint tree: it yields every numeric leaf with its dotted path.

Pickled ``nn.Module`` records are named by module path (``ema.model.0.conv.weight``), the way
``state_dict()`` would name them; lists of numbers (results histories) are one leaf. The walk is
iterative and visits each container once, so deep or cyclic trees from hostile files cannot overflow the
stack or loop. It judges nothing.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from nanguard.ckpt.unpickler import InertObject, module_state

Path = tuple[str, ...]

_MODULE_SLOTS = ("_parameters", "_buffers", "_modules")


@dataclass(frozen=True, slots=True)
class Leaf:
    """A numeric value in the tree: a tensor, a numpy array or scalar, a float, or a list of numbers."""

    path: Path
    value: Any

    @property
    def location(self) -> str:
        """The dotted path (``<root>`` for the root itself)."""
        return ".".join(self.path) or "<root>"


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float | np.integer | np.floating) and not isinstance(value, bool | np.bool_)


def is_series(value: Any) -> bool:
    """A non-empty list or tuple of real numbers with at least one float (a metric history)."""
    return (
        isinstance(value, list | tuple)
        and len(value) > 0
        and all(_is_number(v) for v in value)
        and any(isinstance(v, float | np.floating) for v in value)
    )


def _children(value: Any) -> list[tuple[str, Any]]:
    if isinstance(value, dict):
        return [(str(k), v) for k, v in value.items()]
    if isinstance(value, list | tuple):
        return [(str(i), v) for i, v in enumerate(value)]
    if isinstance(value, InertObject):
        return _record_children(value)
    return []


def _record_children(record: InertObject) -> list[tuple[str, Any]]:
    state = module_state(record)
    out: list[tuple[str, Any]] = []
    if state is not None and any(slot in state for slot in _MODULE_SLOTS):
        # An nn.Module: parameters, buffers and submodules are named without their slot, like state_dict().
        for slot in _MODULE_SLOTS:
            members = state.get(slot)
            if isinstance(members, dict):
                out.extend((str(k), v) for k, v in members.items() if v is not None)
        out.extend((k, v) for k, v in state.items() if not k.startswith("_"))
        return out
    if state is not None:
        out.extend((str(k), v) for k, v in state.items())
    elif record.inert_state is not None:
        out.append(("state", record.inert_state))
    out.extend((str(i), v) for i, v in enumerate(record.inert_args))
    out.extend((str(k), v) for k, v in record.inert_kwargs.items())
    for i, item in enumerate(record.inert_items):
        if isinstance(item, tuple) and len(item) == 2:
            out.append((str(item[0]), item[1]))
        else:
            out.append((str(i), item))
    return out


def iter_leaves(root: Any) -> Iterator[Leaf]:
    """Every numeric leaf under ``root`` in file order, each container visited once."""
    stack: list[tuple[Path, Any]] = [((), root)]
    seen: set[int] = set()
    while stack:
        path, value = stack.pop()
        if isinstance(value, torch.Tensor | np.ndarray | float | np.floating) or is_series(value):
            yield Leaf(path, value)
            continue
        if not isinstance(value, dict | list | tuple | InertObject):
            continue
        if id(value) in seen:
            continue
        seen.add(id(value))
        stack.extend(((*path, name), child) for name, child in reversed(_children(value)))


def iter_tensors(root: Any) -> Iterator[tuple[str, torch.Tensor]]:
    """Every tensor under ``root`` with its dotted path."""
    for leaf in iter_leaves(root):
        if isinstance(leaf.value, torch.Tensor):
            yield leaf.location, leaf.value
