"""formats.py owns :func:`read_checkpoint` and what a tree says about its producer.

It dispatches a path to the right inert reader (torch zip, legacy, safetensors, pickle, HF folder, DCP
folder), turns every failure into :class:`~nanguard.errors.UnreadableCheckpoint` with a one-line reason,
recognises the producer (Ultralytics, Lightning, HF, DCP, plain torch) and reads the epoch, step and
fitness each one records. It does not audit values: :mod:`nanguard.ckpt.audit` does.
"""

from __future__ import annotations

import math
import pickle
import stat
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from nanguard.ckpt.base import CheckpointTree, Format
from nanguard.ckpt.folders import is_dcp_folder, is_hf_folder, read_dcp_folder, read_file_tree, read_hf_folder
from nanguard.ckpt.pickle_scan import CheckpointLimit
from nanguard.ckpt.stfile import SafetensorsError
from nanguard.ckpt.unpickler import InertObject, recording_calls
from nanguard.errors import UnreadableCheckpoint
from nanguard.paths import describe_kind


def read_checkpoint(path: str | Path) -> CheckpointTree:
    """Read a checkpoint file or folder without executing code or importing the classes it names.

    Args:
        path: a ``torch.save`` file (zip or legacy), a ``.safetensors`` file, a Lightning ``.ckpt``, a HF
            Trainer checkpoint folder or a ``torch.distributed.checkpoint`` folder.

    Returns:
        The tree, its format, every global its pickles reference (and those they call), and the files read.

    Raises:
        UnreadableCheckpoint: missing, empty, truncated, corrupt or unknown; the message says which.
    """
    with recording_calls() as called:
        tree = _read_tree(Path(path))
    tree.called = _sorted(list(called))
    return tree


def _read_tree(path: Path) -> CheckpointTree:
    try:
        if not path.exists():
            raise UnreadableCheckpoint(f"{path}: no such file or folder")
        if path.is_dir():
            if is_dcp_folder(path):
                root, globals_, files = read_dcp_folder(path)
                return CheckpointTree(path, Format.DCP, root, _sorted(globals_), tuple(files), "folder")
            if is_hf_folder(path):
                root, globals_, files = read_hf_folder(path)
                return CheckpointTree(path, Format.HUGGINGFACE, root, _sorted(globals_), tuple(files), "folder")
            raise UnreadableCheckpoint(f"{path}: folder is neither a HF Trainer nor a DCP checkpoint")
        info = path.stat()
        if not stat.S_ISREG(info.st_mode):  # a FIFO would block the first read, /dev/zero never end
            raise UnreadableCheckpoint(f"{path}: is {describe_kind(info.st_mode)}, not a regular file")
        if info.st_size == 0:
            raise UnreadableCheckpoint(f"{path}: empty file")
        root, globals_, container = read_file_tree(path)
        fmt = Format.SAFETENSORS if container == "safetensors" else detect_format(root)
        return CheckpointTree(path, fmt, root, _sorted(globals_), (path,), container)
    except UnreadableCheckpoint:
        raise
    except CheckpointLimit as exc:
        raise UnreadableCheckpoint(f"{path}: refused ({exc})") from None
    except zipfile.BadZipFile as exc:
        raise UnreadableCheckpoint(f"{path}: truncated or corrupt zip container ({exc})") from None
    except (pickle.UnpicklingError, SafetensorsError, EOFError) as exc:
        raise UnreadableCheckpoint(f"{path}: corrupt checkpoint ({exc or type(exc).__name__})") from None
    except OSError as exc:
        raise UnreadableCheckpoint(f"{path}: cannot read ({exc.strerror or exc})") from None
    except Exception as exc:  # any failure of hostile bytes is "unreadable", never a traceback
        raise UnreadableCheckpoint(f"{path}: corrupt checkpoint ({describe_error(exc)})") from None


def describe_error(exc: BaseException) -> str:
    """``Type: message`` of an unexpected failure, one line of at most 200 characters of message."""
    text = " ".join(str(exc).split())[:200]
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _sorted(globals_: list[str]) -> tuple[str, ...]:
    return tuple(sorted(set(globals_)))


def detect_format(root: Any) -> Format:
    """The producer of a single-file checkpoint, from its top-level keys."""
    if not isinstance(root, dict):
        return Format.TORCH
    keys = {str(k) for k in root}
    if "pytorch-lightning_version" in keys or {"state_dict", "loops"} <= keys or {"state_dict", "global_step"} <= keys:
        return Format.LIGHTNING
    if "train_args" in keys or {"ema", "updates"} <= keys or {"model", "date", "version"} <= keys:
        return Format.ULTRALYTICS
    return Format.TORCH


def as_float(value: Any) -> float | None:
    """``value`` as a float when it is a real number (python, numpy, or one-element tensor), else None."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float | np.integer | np.floating):
        try:
            return float(value)
        except OverflowError:  # an int beyond the float range: no position a run could have recorded
            return None
    if isinstance(value, torch.Tensor) and value.numel() == 1 and not value.is_meta and not value.is_complex():
        return float(value.reshape(()).item())
    return None


def as_int(value: Any) -> int | None:
    """``value`` as an int when it is an integer (python, numpy or a whole float), else None."""
    number = as_float(value)
    if number is None or not math.isfinite(number) or number != int(number):
        return None
    return int(number)


def _get(root: Any, *keys: str) -> Any:
    for key in keys:
        if isinstance(root, dict) and key in root:
            root = root[key]
        elif isinstance(root, InertObject) and isinstance(root.inert_state, dict) and key in root.inert_state:
            root = root.inert_state[key]
        else:
            return None
    return root


def run_position(tree: CheckpointTree) -> tuple[int | float | None, int | None, float | None]:
    """The epoch, step and fitness the checkpoint records, by format (None where it records none).

    Ultralytics: ``epoch`` (``-1`` once stripped), ``updates``, ``best_fitness`` or ``train_metrics.fitness``.
    Lightning: ``epoch``, ``global_step``, the ``ModelCheckpoint`` best score. HF: ``trainer_state.json``
    ``epoch`` (fractional), ``global_step``, ``best_metric``. Plain dicts: ``epoch`` and ``step``/``global_step``.
    """
    root = tree.root
    if tree.format is Format.HUGGINGFACE:
        state = _get(root, "trainer_state")
        return as_float(_get(state, "epoch")), as_int(_get(state, "global_step")), as_float(_get(state, "best_metric"))
    epoch_value = as_float(_get(root, "epoch"))
    whole = as_int(epoch_value)
    epoch: int | float | None = whole if whole is not None else epoch_value
    if tree.format is Format.ULTRALYTICS:
        fitness = as_float(_get(root, "best_fitness"))
        if fitness is None:
            fitness = as_float(_get(root, "train_metrics", "fitness"))
        return epoch, as_int(_get(root, "updates")), fitness
    if tree.format is Format.LIGHTNING:
        fitness = None
        callbacks = _get(root, "callbacks")
        if isinstance(callbacks, dict):
            for name, state in callbacks.items():
                if str(name).startswith("ModelCheckpoint") and fitness is None:
                    fitness = as_float(_get(state, "best_model_score"))
        return epoch, as_int(_get(root, "global_step")), fitness
    steps = (as_int(_get(root, key)) for key in ("global_step", "step", "iteration"))
    step = next((s for s in steps if s is not None), None)
    return epoch, step, None
