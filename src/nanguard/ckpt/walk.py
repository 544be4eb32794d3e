"""walk.py owns naming the values of a checkpoint tree: it yields every numeric leaf with its dotted path.

Pickled ``nn.Module`` records are named by module path (``ema.model.0.conv.weight``), the way
``state_dict()`` would name them; lists of numbers (results histories) are one leaf, and so are numbers
written as text (``'nan'``, ``'0.123'``: polars types a results.csv column holding a ``nan`` as strings). The
walk is iterative and visits each object once (a tensor referenced a million times, or rebuilt a million
times as the same view, is yielded once), so hostile trees cannot overflow the stack, loop or multiply the
work. Each value's path is a chain of parent links, so depth costs linear time; past
:data:`~nanguard.ckpt.pickle_scan.MAX_DEPTH` levels the walk refuses the tree. It judges nothing.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from nanguard.ckpt.pickle_scan import MAX_DEPTH, CheckpointLimit
from nanguard.ckpt.unpickler import InertObject, module_state

Path = tuple[str, ...]

_MODULE_SLOTS = ("_parameters", "_buffers", "_modules")

MAX_TEXT_NUMBER_CHARS = 64
"""Longest string read as a number: a float's text is ~25 characters; a longer one is text, not a metric."""

_LOCATION_CHARS = 60
"""A location in a refusal message is cut to this many characters (a deep one would be kilobytes)."""


@dataclass(frozen=True, slots=True)
class Node:
    """One step of a path: its name, its parent, its depth and the first name of the path (the top key)."""

    parent: Node | None
    name: str
    depth: int
    top: str

    @staticmethod
    def child(parent: Node | None, name: str) -> Node:
        """The node named ``name`` under ``parent`` (None: under the root)."""
        if parent is None:
            return Node(None, name, 1, name)
        return Node(parent, name, parent.depth + 1, parent.top)

    def names(self) -> Path:
        """The names from the top to this node."""
        out: list[str] = []
        node: Node | None = self
        while node is not None:
            out.append(node.name)
            node = node.parent
        return tuple(reversed(out))


@dataclass(frozen=True, slots=True)
class Leaf:
    """A numeric value in the tree: a tensor, a numpy array or scalar, a float, a number written as text, or
    a list of numbers."""

    node: Node | None
    value: Any

    @property
    def path(self) -> Path:
        """The names from the root to this value (built on demand: linear in the depth)."""
        return self.node.names() if self.node is not None else ()

    @property
    def name(self) -> str:
        """The last name of the path (``weight``, ``running_var``); empty for the root."""
        return self.node.name if self.node is not None else ""

    @property
    def top(self) -> str | None:
        """The first name of the path (the top-level key), None for the root."""
        return self.node.top if self.node is not None else None

    @property
    def location(self) -> str:
        """The dotted path (``<root>`` for the root itself)."""
        return ".".join(self.path) or "<root>"


def text_number(text: str) -> float | None:
    """The number a string spells (``'nan'``, ``' -Inf'``, ``'0.123'``), or None when it spells none."""
    if len(text) > MAX_TEXT_NUMBER_CHARS:
        return None
    try:
        return float(text)
    except ValueError:
        return None


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float | np.integer | np.floating) and not isinstance(value, bool | np.bool_)


def is_series(value: Any) -> bool:
    """A non-empty list or tuple of real numbers (or numbers written as text) with at least one float or
    text number (a metric history)."""
    if not isinstance(value, list | tuple) or not value:
        return False
    has_float = False
    for v in value:
        if isinstance(v, float | np.floating):
            has_float = True
        elif isinstance(v, str):
            if text_number(v) is None:
                return False
            has_float = True
        elif not _is_number(v):
            return False
    return has_float


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
        out.extend((str(k), v) for k, v in state.items() if not str(k).startswith("_"))
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


def _view_key(tensor: torch.Tensor) -> tuple[Any, ...] | None:
    """What makes two tensors the same values: one memory, one shape, one stride, one dtype (None: no data)."""
    if tensor.is_meta or tensor.numel() == 0:
        return None
    return (tensor.data_ptr(), tuple(tensor.shape), tensor.stride(), tensor.dtype)


def iter_leaves(root: Any, max_depth: int = MAX_DEPTH) -> Iterator[Leaf]:
    """Every numeric leaf under ``root`` in file order, each object (and each tensor view) yielded once.

    Raises:
        CheckpointLimit: the tree nests deeper than ``max_depth`` levels.
    """
    stack: list[tuple[Node | None, Any]] = [(None, root)]
    seen: set[int] = set()
    views: set[tuple[Any, ...]] = set()
    while stack:
        node, value = stack.pop()
        if isinstance(value, float | np.floating):
            yield Leaf(node, value)
            continue
        if isinstance(value, str):
            if text_number(value) is not None:
                yield Leaf(node, value)
            continue
        if not isinstance(value, torch.Tensor | np.ndarray | dict | list | tuple | InertObject) or id(value) in seen:
            continue
        seen.add(id(value))
        if isinstance(value, torch.Tensor):
            key = _view_key(value)
            if key is not None and key in views:
                continue
            if key is not None:
                views.add(key)
            yield Leaf(node, value)
            continue
        if isinstance(value, np.ndarray) or is_series(value):
            yield Leaf(node, value)
            continue
        depth = node.depth if node is not None else 0
        if depth >= max_depth:
            where = Leaf(node, None).location
            where = where if len(where) <= _LOCATION_CHARS else where[:_LOCATION_CHARS] + "..."
            raise CheckpointLimit(f"nesting deeper than {max_depth} levels at {where}")
        stack.extend((Node.child(node, name), child) for name, child in reversed(_children(value)))


def iter_tensors(root: Any) -> Iterator[tuple[str, torch.Tensor]]:
    """Every tensor under ``root`` with its dotted path."""
    for leaf in iter_leaves(root):
        if isinstance(leaf.value, torch.Tensor):
            yield leaf.location, leaf.value
