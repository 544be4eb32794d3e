"""audit.py owns judging a checkpoint: findings per value, the verdict, and the inspect summary.

Every floating value gets NaN/+Inf/-Inf counts with the first index; model and EMA tensors are also
checked for the marks of save-time scrubbing (all-zero conv/linear weights, zero BatchNorm
``running_var``, float16 values at ±65504, a mostly-zero model); optimizer second moments must not be
negative and a GradScaler scale must be positive. Reading is :mod:`nanguard.ckpt.formats`' job; this
module never unpickles with real classes.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from nanguard.ckpt.base import (
    FP16_MAX,
    INF_SENTINEL_KEYS,
    SCRUBBED_MIN_TENSORS,
    SCRUBBED_ZERO_FRACTION,
    SECOND_MOMENT_KEYS,
    TOP_KEY_AREAS,
    Area,
    CheckpointTree,
    Finding,
    Inspection,
    Kind,
    Status,
    Verdict,
    unlisted_globals,
    unsafe_globals,
)
from nanguard.ckpt.folders import find_checkpoints
from nanguard.ckpt.formats import read_checkpoint, run_position
from nanguard.ckpt.walk import Leaf, iter_leaves
from nanguard.errors import NoCheckpointsFound, UnreadableCheckpoint


def area_of(path: tuple[str, ...], flat_state_dict: bool) -> Area:
    """The part of the training state at ``path``: from the top-level key (or its first dotted part)."""
    if not path:
        return Area.MODEL if flat_state_dict else Area.OTHER
    top = path[0]
    area = TOP_KEY_AREAS.get(top) or TOP_KEY_AREAS.get(top.split(".", 1)[0])
    if area is not None:
        return area
    return Area.MODEL if flat_state_dict else Area.OTHER


def _first_index(mask: torch.Tensor) -> tuple[int, ...]:
    flat = int(torch.argmax(mask.reshape(-1).to(torch.uint8)).item())
    return tuple(int(i) for i in np.unravel_index(flat, tuple(mask.shape))) if mask.dim() else ()


def _tensor_findings(leaf: Leaf, tensor: torch.Tensor, area: Area, sentinel: bool) -> tuple[list[Finding], bool]:
    """Findings for one tensor, and whether it is entirely zero."""
    if tensor.is_complex():
        tensor = torch.view_as_real(tensor)
    if not tensor.is_floating_point() or tensor.is_meta or tensor.numel() == 0:
        return [], False
    try:
        low, high = torch.aminmax(tensor)
    except (RuntimeError, NotImplementedError):  # dtypes without a kernel (float8): widen
        tensor = tensor.float()
        low, high = torch.aminmax(tensor)
    # One pass and one host read per tensor: NaN propagates into min/max, so finite extremes mean every
    # element is finite, and both extremes at zero mean the tensor is all zeros.
    low_v, high_v = float(low.item()), float(high.item())
    numel, where, out = tensor.numel(), leaf.location, []
    finite = math.isfinite(low_v) and math.isfinite(high_v)
    if not finite:
        masks = ((Kind.NAN, torch.isnan(tensor)), (Kind.POS_INF, torch.isposinf(tensor)),
                 (Kind.NEG_INF, torch.isneginf(tensor)))
        for kind, mask in masks:
            if sentinel and kind is not Kind.NAN:
                continue
            count = int(mask.sum().item())
            if count:
                out.append(Finding(where, kind, count, _first_index(mask), area, numel))
    if tensor.dtype == torch.float16 and (not finite or high_v >= FP16_MAX or low_v <= -FP16_MAX):
        mask = tensor.abs() == FP16_MAX
        count = int(mask.sum().item())
        if count:
            out.append(Finding(where, Kind.FP16_SATURATED, count, _first_index(mask), area, numel))
    all_zero = low_v == 0.0 and high_v == 0.0
    name = leaf.path[-1] if leaf.path else ""
    if all_zero and area in (Area.MODEL, Area.EMA, Area.OTHER):
        if name == "weight" and tensor.dim() >= 2:
            out.append(Finding(where, Kind.ZERO_WEIGHT, numel, (), area, numel))
        elif name == "running_var":
            out.append(Finding(where, Kind.ZERO_RUNNING_VAR, numel, (), area, numel))
    if area is Area.OPTIMIZER and name in SECOND_MOMENT_KEYS and low_v < 0:
        mask = tensor < 0
        out.append(Finding(where, Kind.NEGATIVE_SECOND_MOMENT, int(mask.sum().item()), _first_index(mask), area, numel))
    if area is Area.SCALER and name == "scale" and numel == 1 and finite and high_v <= 0:
        out.append(Finding(where, Kind.BAD_SCALE, 1, (), area, 1))
    return out, all_zero


def _scalar_findings(leaf: Leaf, values: list[float], area: Area, sentinel: bool) -> list[Finding]:
    counts: dict[Kind, list[int]] = {}
    for i, v in enumerate(values):
        if math.isnan(v):
            kind = Kind.NAN
        elif math.isinf(v) and not sentinel:
            kind = Kind.POS_INF if v > 0 else Kind.NEG_INF
        else:
            continue
        counts.setdefault(kind, []).append(i)
    scalar = not isinstance(leaf.value, list | tuple)
    out = [
        Finding(leaf.location, kind, len(idx), () if scalar else (idx[0],), area, len(values))
        for kind, idx in counts.items()
    ]
    name = leaf.path[-1] if leaf.path else ""
    if area is Area.SCALER and name == "scale" and scalar and math.isfinite(values[0]) and values[0] <= 0:
        out.append(Finding(leaf.location, Kind.BAD_SCALE, 1, (), area, 1))
    return out


def find_problems(tree: CheckpointTree) -> list[Finding]:
    """Every finding in ``tree``, in tree order, with the scrubbed summaries last."""
    root = tree.root
    flat = isinstance(root, dict) and bool(root) and all(isinstance(v, torch.Tensor) for v in root.values())
    findings: list[Finding] = []
    floating: dict[str, list[int]] = {}  # top-level model/EMA key -> [floating tensors, all-zero ones]
    for leaf in iter_leaves(root):
        area = area_of(leaf.path, flat)
        sentinel = bool(leaf.path) and leaf.path[-1] in INF_SENTINEL_KEYS
        value = leaf.value
        if isinstance(value, np.ndarray):
            if value.dtype.kind not in "fc":
                continue
            value = torch.from_numpy(np.ascontiguousarray(value))
        if isinstance(value, torch.Tensor):
            found, zero = _tensor_findings(leaf, value, area, sentinel and value.numel() <= 1)
            findings.extend(found)
            if area in (Area.MODEL, Area.EMA) and value.is_floating_point() and value.numel():
                top = "" if flat else leaf.path[0]
                counter = floating.setdefault(top, [0, 0])
                counter[0] += 1
                counter[1] += int(zero)
        else:
            values = [float(v) for v in (value if isinstance(value, list | tuple) else [value])]
            findings.extend(_scalar_findings(leaf, values, area, sentinel))
    for top, (total, zeros) in floating.items():
        if total >= SCRUBBED_MIN_TENSORS and zeros > SCRUBBED_ZERO_FRACTION * total:
            area = area_of((top,), flat) if top else Area.MODEL
            findings.append(Finding(top or "<root>", Kind.SCRUBBED, zeros, (), area, total))
    return findings


def audit_tree(tree: CheckpointTree) -> Verdict:
    """The verdict on a checkpoint already read."""
    epoch, step, fitness = run_position(tree)
    findings = find_problems(tree)
    # Safety and content are separate answers: unsafe only when the pickle calls code; the findings (the
    # content verdict, Verdict.content) are computed for every readable file, unsafe or not.
    unsafe = unsafe_globals(tree.globals, tree.called)
    status = Status.UNSAFE if unsafe else Status.DIRTY if findings else Status.CLEAN
    return Verdict(tree.path, status, findings, tree.globals, unsafe, tree.format, epoch, step, fitness,
                   unlisted_globals=unlisted_globals(tree.globals))


def audit(path: str | Path) -> Verdict:
    """Audit one checkpoint file or folder without executing code from it.

    Returns:
        The verdict. An unreadable checkpoint gives status ``unreadable`` with ``error`` set, not an exception.
    """
    try:
        tree = read_checkpoint(path)
    except UnreadableCheckpoint as exc:
        return Verdict(Path(path), Status.UNREADABLE, error=str(exc))
    return audit_tree(tree)


def audit_paths(paths: Iterable[str | Path]) -> list[Verdict]:
    """Audit each path; a folder that is not itself a HF/DCP checkpoint means every checkpoint under it.

    Raises:
        NoCheckpointsFound: a folder holds no checkpoint (exit code BAD_INPUT).
    """
    verdicts: list[Verdict] = []
    for raw in paths:
        path = Path(raw)
        targets = find_checkpoints(path) if path.is_dir() else [path]
        if not targets:
            raise NoCheckpointsFound(f"{path}: folder holds no checkpoint (.pt, .pth, .ckpt, .bin, .safetensors)")
        verdicts.extend(audit(target) for target in targets)
    return verdicts


def _top_keys(root: Any) -> list[str]:
    return [str(k) for k in root] if isinstance(root, dict) else []


def inspect_checkpoint(path: str | Path) -> Inspection:
    """Format, epoch/step, fitness, top-level keys, tensor count, bytes and dtypes, and the verdict."""
    try:
        tree = read_checkpoint(path)
    except UnreadableCheckpoint as exc:
        return Inspection(Verdict(Path(path), Status.UNREADABLE, error=str(exc)))
    inspection = Inspection(audit_tree(tree), _top_keys(tree.root))
    for leaf in iter_leaves(tree.root):
        if isinstance(leaf.value, torch.Tensor):
            inspection.tensor_count += 1
            inspection.tensor_bytes += leaf.value.numel() * leaf.value.element_size()
            name = str(leaf.value.dtype).removeprefix("torch.")
            inspection.dtypes[name] = inspection.dtypes.get(name, 0) + 1
    return inspection
