"""io.py owns the two ways a checkpoint meets real classes: atomic writing and trusted loading.

:func:`save_checkpoint` writes a temp file in the target folder, fsyncs it, renames it over the target and
fsyncs the folder, so a crash leaves either the old or the new file under the final name.
:func:`require_loadable` is the one gate before a checkpoint meets real classes, here or in a tool nanguard
hands it to (Ultralytics): :func:`load_checkpoint` unpickles only after it passed (or with ``trust=True``).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from nanguard.atomic import atomic_replace
from nanguard.ckpt.base import CheckpointTree, Format, unlisted_globals, unsafe_globals
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


def _shown(names: tuple[str, ...]) -> str:
    return ", ".join(names[:10]) + (f" and {len(names) - 10} more" if len(names) > 10 else "")


def require_loadable(path: str | Path, trust: bool = False) -> CheckpointTree:
    """The one gate before a checkpoint meets real classes (``torch.load(weights_only=False)``, Ultralytics'
    ``YOLO(path)``, ``resume``, ``pretrained``): read it inertly and refuse what loading could not do safely.

    Refused without ``trust``: a pickle that calls code (``os.system``, ``builtins.eval``...; the file is
    unsafe) and one that references globals outside the load allowlist (importing their modules runs their
    code; the message says loading needs ``--trust``). Nothing is loaded here.

    Returns:
        The inert tree (its globals, its format).

    Raises:
        UnreadableCheckpoint: missing, empty, truncated or corrupt (exit code BAD_INPUT).
        UnsafeCheckpoint: as above (exit code UNSAFE); ``.globals`` lists the offending globals.
    """
    tree = read_checkpoint(path)
    unsafe = unsafe_globals(tree.globals, tree.called)
    unlisted = unlisted_globals(tree.globals)
    if trust:
        if unsafe or unlisted:
            logger.warning("loading %s with trust despite globals: %s", tree.path, ", ".join((*unsafe, *unlisted)))
        return tree
    if unsafe:
        raise UnsafeCheckpoint(
            f"{tree.path}: unsafe, its pickle calls code: {_shown(unsafe)} (only --trust loads it, running that code)",
            unsafe)
    if unlisted:
        raise UnsafeCheckpoint(
            f"{tree.path}: classes outside the load allowlist: {_shown(unlisted)}; loading needs --trust", unlisted)
    return tree


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

    :func:`require_loadable` reads it inertly first; loading goes ahead only when the pickle calls no code
    and every global is on the allowlist (torch, torchvision, numpy, containers, Ultralytics, Lightning,
    transformers…), or ``trust`` is set.

    Args:
        path: any checkpoint :func:`~nanguard.ckpt.read_checkpoint` reads.
        trust: load even when it calls code or names globals outside the allowlist (they are logged).

    Returns:
        What ``torch.load`` returns; for a HF folder, a dict like the inert tree (``model``, ``optimizer``,
        ``trainer_state``…); for a DCP folder, the flat state dict.

    Raises:
        UnsafeCheckpoint: an unsafe pickle, or globals outside the allowlist, and ``trust`` not set;
            ``.globals`` lists them.
        UnreadableCheckpoint: the checkpoint cannot be read.
    """
    tree = require_loadable(path, trust)
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
