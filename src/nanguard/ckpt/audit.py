"""audit.py owns judging a checkpoint: findings per value, the verdict, and the inspect summary.

Every floating value gets NaN/+Inf/-Inf counts with the first index; model and EMA tensors are also
checked for the marks of save-time scrubbing (all-zero conv/linear weights, zero BatchNorm
``running_var``, float16 values at ±65504, a mostly-zero model); optimizer second moments must not be
negative and a GradScaler scale must be positive. Reading is :mod:`nanguard.ckpt.formats`' job; this
module never unpickles with real classes.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, TypeVar

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
from nanguard.ckpt.formats import describe_error, read_checkpoint, run_position
from nanguard.ckpt.pickle_scan import SCAN_FACTOR, SCAN_SLACK_BYTES, CheckpointLimit
from nanguard.ckpt.walk import Leaf, iter_leaves, text_number
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
    name = leaf.name
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
    name = leaf.name
    if area is Area.SCALER and name == "scale" and scalar and math.isfinite(values[0]) and values[0] <= 0:
        out.append(Finding(leaf.location, Kind.BAD_SCALE, 1, (), area, 1))
    return out


TEXT_NUMBER_AREAS = frozenset({Area.METRICS, Area.HISTORY})
"""Where a number written as text (``'nan'``) is judged: metrics and histories, which polars and loggers write
as text. Elsewhere a string is a name (a class called ``'nan'`` in ``train_args`` is not a finding)."""


def _scalar_values(value: Any, area: Area) -> list[float]:
    """The float of each element of a scalar or series leaf; ints (finite by nature, possibly too big for a
    float) are clamped into the float range, text counts only in :data:`TEXT_NUMBER_AREAS`."""
    out: list[float] = []
    for v in value if isinstance(value, list | tuple) else [value]:
        if isinstance(v, str):
            number = text_number(v) if area in TEXT_NUMBER_AREAS else None
            out.append(0.0 if number is None else number)
        elif isinstance(v, float | np.floating):
            out.append(float(v))
        else:
            try:
                out.append(float(v))
            except OverflowError:
                out.append(sys.float_info.max if v > 0 else -sys.float_info.max)
    return out


def _span_bytes(tensor: torch.Tensor) -> tuple[int, int]:
    """The byte range of memory a tensor's view covers."""
    extent = sum((n - 1) * s for n, s in zip(tensor.shape, tensor.stride(), strict=True)) + 1
    start = tensor.data_ptr()
    return start, start + extent * tensor.element_size()


def check_scan_budget(leaves: list[Leaf]) -> None:
    """Refuse tensors that would scan far more bytes than the memory they view (stride-0 or repeated views).

    Raises:
        CheckpointLimit: past :data:`~nanguard.ckpt.pickle_scan.SCAN_FACTOR` times the bytes held plus
            :data:`~nanguard.ckpt.pickle_scan.SCAN_SLACK_BYTES`.
    """
    scanned, spans = 0, []
    for leaf in leaves:
        value = leaf.value
        if isinstance(value, torch.Tensor) and not value.is_meta and value.numel():
            scanned += value.numel() * value.element_size()
            spans.append(_span_bytes(value))
    if scanned <= SCAN_SLACK_BYTES:
        return
    held, reach = 0, -1
    for start, end in sorted(spans):
        if end > reach:
            held += end - max(start, reach)
            reach = end
    if scanned > SCAN_FACTOR * held + SCAN_SLACK_BYTES:
        raise CheckpointLimit(
            f"tensor views would scan {scanned} bytes of elements, over {SCAN_FACTOR}x the {held} bytes their "
            f"storages hold plus {SCAN_SLACK_BYTES >> 20} MiB"
        )


def find_problems(tree: CheckpointTree) -> list[Finding]:
    """Every finding in ``tree``, in tree order, with the scrubbed summaries last.

    Raises:
        CheckpointLimit: the tree is deeper than the walk accepts, or its tensors would scan far more than
            the file holds.
    """
    root = tree.root
    flat = isinstance(root, dict) and bool(root) and all(isinstance(v, torch.Tensor) for v in root.values())
    findings: list[Finding] = []
    floating: dict[str, list[int]] = {}  # top-level model/EMA key -> [floating tensors, all-zero ones]
    leaves = list(iter_leaves(root))
    check_scan_budget(leaves)
    for leaf in leaves:
        top = leaf.top
        area = area_of(() if top is None else (top,), flat)
        sentinel = leaf.name in INF_SENTINEL_KEYS
        value = leaf.value
        if isinstance(value, np.ndarray):
            if value.dtype.kind not in "fc":
                continue
            value = torch.from_numpy(np.ascontiguousarray(value))
        if isinstance(value, torch.Tensor):
            found, zero = _tensor_findings(leaf, value, area, sentinel and value.numel() <= 1)
            findings.extend(found)
            if area in (Area.MODEL, Area.EMA) and value.is_floating_point() and value.numel():
                key = "" if flat or top is None else top
                counter = floating.setdefault(key, [0, 0])
                counter[0] += 1
                counter[1] += int(zero)
        else:
            findings.extend(_scalar_findings(leaf, _scalar_values(value, area), area, sentinel))
    for top_key, (total, zeros) in floating.items():
        if total >= SCRUBBED_MIN_TENSORS and zeros > SCRUBBED_ZERO_FRACTION * total:
            area = area_of((top_key,), flat) if top_key else Area.MODEL
            findings.append(Finding(top_key or "<root>", Kind.SCRUBBED, zeros, (), area, total))
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


_Result = TypeVar("_Result")


def unreadable_verdict(path: str | Path, exc: Exception) -> Verdict:
    """The ``unreadable`` verdict for any failure of reading or judging ``path``, one line naming the file."""
    if isinstance(exc, UnreadableCheckpoint):
        error = str(exc)
    elif isinstance(exc, CheckpointLimit):
        error = f"{path}: refused ({exc})"
    else:
        error = f"{path}: cannot be audited ({describe_error(exc)})"
    return Verdict(Path(path), Status.UNREADABLE, error=error)


def guarded(path: str | Path, judge: Callable[[CheckpointTree], _Result],
            unreadable: Callable[[Verdict], _Result]) -> _Result:
    """Read ``path`` and ``judge`` the tree; any exception of either becomes ``unreadable(verdict)``.

    This is the one place where the promise "no input raises anything but a verdict" is kept: hostile bytes
    can fail deep inside the C unpickler, torch or numpy with any exception type (MemoryError and
    RecursionError included), and every one of them names the file in one line.
    """
    try:
        return judge(read_checkpoint(path))
    except Exception as exc:
        return unreadable(unreadable_verdict(path, exc))


def audit(path: str | Path) -> Verdict:
    """Audit one checkpoint file or folder without executing code from it.

    Returns:
        The verdict. An unreadable checkpoint, or one the reader refuses (see docs/checkpoints.md, "Limits"),
        gives status ``unreadable`` with ``error`` set, never an exception.
    """
    return guarded(path, audit_tree, lambda verdict: verdict)


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
    return guarded(path, _inspect_tree, Inspection)


def _inspect_tree(tree: CheckpointTree) -> Inspection:
    inspection = Inspection(audit_tree(tree), _top_keys(tree.root))
    for leaf in iter_leaves(tree.root):
        if isinstance(leaf.value, torch.Tensor):
            inspection.tensor_count += 1
            inspection.tensor_bytes += leaf.value.numel() * leaf.value.element_size()
            name = str(leaf.value.dtype).removeprefix("torch.")
            inspection.dtypes[name] = inspection.dtypes.get(name, 0) + 1
    return inspection
