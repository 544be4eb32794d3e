"""io.py owns the two ways a checkpoint meets real classes: atomic writing and trusted loading.

:func:`save_checkpoint` writes a temp file in the target folder, fsyncs it, renames it over the target and
fsyncs the folder, so a crash leaves either the old or the new file under the final name.
:func:`load_checkpoint` unpickles with real classes only after the inert reader has listed every global
and all of them are on the allowlist (or the caller passed ``trust=True``).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from nanguard.atomic import atomic_replace
from nanguard.ckpt.base import Format, is_allowed_global
from nanguard.ckpt.folders import HF_STATE, is_hf_weights
from nanguard.ckpt.formats import read_checkpoint
from nanguard.errors import UnreadableCheckpoint, UnsafeCheckpoint

logger = logging.getLogger(__name__)


def save_checkpoint(obj: Any, path: str | Path) -> Path:
    """Write ``obj`` to ``path`` atomically with ``torch.save`` (``safetensors`` for a ``.safetensors`` path).

    Args:
        obj: what to save; for ``.safetensors``, a dict of tensors.
        path: the final file name; its folder must exist.

    Returns:
        The path written.
    """
    path = Path(path)
    with atomic_replace(path) as tmp:
        if path.suffix == ".safetensors":
            from safetensors.torch import save_file  # optional dependency, only for this suffix

            save_file(obj, str(tmp))
        else:
            with tmp.open("wb") as handle:
                torch.save(obj, handle)
    logger.debug("saved checkpoint %s", path)
    return path


def _check_globals(path: Path, globals_: tuple[str, ...], trust: bool) -> None:
    unsafe = tuple(g for g in globals_ if not is_allowed_global(g))
    if unsafe and not trust:
        shown = ", ".join(unsafe[:10]) + (f" and {len(unsafe) - 10} more" if len(unsafe) > 10 else "")
        raise UnsafeCheckpoint(f"{path}: references globals outside the allowlist: {shown}", unsafe)
    if unsafe:
        logger.warning("loading %s with trust despite globals outside the allowlist: %s", path, ", ".join(unsafe))


def _torch_load(path: Path) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # corrupt bytes must surface as a clean error
        raise UnreadableCheckpoint(f"{path}: torch.load failed ({type(exc).__name__}: {str(exc)[:200]})") from None


def _load_file(path: Path) -> Any:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    return _torch_load(path)


def load_checkpoint(path: str | Path, trust: bool = False) -> Any:
    """Load a checkpoint with its real classes, after checking its globals.

    The inert reader lists every global first; loading goes ahead only when all are on the allowlist
    (torch, numpy, containers, Ultralytics, Lightning, transformers…) or ``trust`` is set.

    Args:
        path: any checkpoint :func:`~nanguard.ckpt.read_checkpoint` reads.
        trust: load even with globals outside the allowlist (they are logged).

    Returns:
        What ``torch.load`` returns; for a HF folder, a dict like the inert tree (``model``, ``optimizer``,
        ``trainer_state``…); for a DCP folder, the flat state dict.

    Raises:
        UnsafeCheckpoint: globals outside the allowlist and ``trust`` not set; ``.globals`` lists them.
        UnreadableCheckpoint: the checkpoint cannot be read.
    """
    tree = read_checkpoint(path)
    _check_globals(tree.path, tree.globals, trust)
    if tree.format is Format.SAFETENSORS:
        return _load_file(tree.path)
    if tree.format is Format.DCP:
        from torch.distributed.checkpoint.state_dict_loader import _load_state_dict_from_keys

        return _load_state_dict_from_keys(checkpoint_id=str(tree.path))
    if tree.format is Format.HUGGINGFACE:
        import json

        out: dict[str, Any] = {}
        model: dict[str, Any] = {}
        for file in tree.files:
            if file.name == HF_STATE:
                out["trainer_state"] = json.loads(file.read_text(encoding="utf-8"))
            elif is_hf_weights(file):
                model.update(_load_file(file))
            else:
                out[file.stem] = _load_file(file)
        return {"model": model, **out} if model else out
    return _torch_load(tree.path)
