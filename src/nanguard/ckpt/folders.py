"""folders.py owns checkpoints that are folders: Hugging Face Trainer ``checkpoint-N`` folders and
``torch.distributed.checkpoint`` (DCP) folders, plus finding every checkpoint under a folder.

Each piece of a folder is read with the same inert readers as a single file, and the pieces are joined
into one tree (``model``, ``optimizer``, ``scheduler``, ``rng_state``, ``trainer_state`` for HF; flat
fully-qualified names for DCP). It does not judge content.
"""

from __future__ import annotations

import json
import pickle
import stat
from collections.abc import Callable
from pathlib import Path
from typing import Any

from nanguard.ckpt.base import CHECKPOINT_SUFFIXES
from nanguard.ckpt.pickle_scan import inert_load_bounded
from nanguard.ckpt.stfile import read_safetensors
from nanguard.ckpt.torchfile import ZIP_MAGIC, MappedFile, read_legacy, read_pickle_file, read_zip, sniff
from nanguard.ckpt.unpickler import InertObject, module_state

DCP_METADATA = ".metadata"
HF_STATE = "trainer_state.json"
_HF_WEIGHT_PREFIXES = ("model", "pytorch_model", "adapter_model", "diffusion_pytorch_model")


def is_dcp_folder(path: Path) -> bool:
    """Whether ``path`` is a ``torch.distributed.checkpoint`` folder."""
    return path.is_dir() and (path / DCP_METADATA).is_file()


def is_hf_folder(path: Path) -> bool:
    """Whether ``path`` is a Hugging Face Trainer checkpoint or ``save_pretrained`` folder."""
    if not path.is_dir():
        return False
    if (path / HF_STATE).is_file():
        return True
    return any(is_hf_weights(p) for p in path.iterdir() if p.is_file())


def is_hf_weights(path: Path) -> bool:
    """Whether ``path`` is a HF weights file (``model*.safetensors``, ``pytorch_model*.bin``…)."""
    return path.suffix in (".safetensors", ".bin") and path.name.startswith(_HF_WEIGHT_PREFIXES)


def read_file_tree(path: Path) -> tuple[Any, list[str], str]:
    """Read one checkpoint file inertly, whatever its container.

    Returns:
        The tree, its globals and the container name.

    Raises:
        pickle.UnpicklingError: the content is not a checkpoint (callers turn it into UnreadableCheckpoint).
    """
    container = sniff(path)
    mapped = MappedFile(path)
    readers: dict[str, Callable[[MappedFile], tuple[Any, list[str]]]] = {
        "zip": read_zip,
        "legacy": read_legacy,
        "pickle": read_pickle_file,
    }
    if container == "safetensors":
        tensors, _ = read_safetensors(mapped)
        return tensors, [], container
    if container not in readers:
        raise pickle.UnpicklingError("not a torch, safetensors or pickle file")
    root, globals_ = readers[container](mapped)
    return root, globals_, container


def read_hf_folder(path: Path) -> tuple[dict[str, Any], list[str], list[Path]]:
    """Read a HF Trainer checkpoint folder: weights (all shards) under ``model``, every other ``.pt``/``.pth``/
    ``.bin`` under its stem (``optimizer``, ``scheduler``, ``rng_state``, ``training_args``), and
    ``trainer_state.json`` under ``trainer_state``."""
    root: dict[str, Any] = {}
    model: dict[str, Any] = {}
    globals_: list[str] = []
    files: list[Path] = []
    for file in sorted(p for p in path.iterdir() if p.is_file()):
        if file.name == HF_STATE:
            # json.loads accepts the NaN/Infinity tokens that json.dumps writes for non-finite floats.
            root["trainer_state"] = json.loads(file.read_text(encoding="utf-8"))
        elif file.suffix in (".safetensors", ".bin", ".pt", ".pth"):
            tree, names, _ = read_file_tree(file)
            globals_.extend(names)
            if is_hf_weights(file) and isinstance(tree, dict):
                model.update(tree)
            else:
                root[file.stem] = tree
        else:
            continue
        files.append(file)
    if model:
        root = {"model": model, **root}
    return root, globals_, files


_MISSING = object()


def _field(record: Any, name: str, default: Any = _MISSING) -> Any:
    state = module_state(record) if isinstance(record, InertObject) else None
    if state is not None and name not in state and default is not _MISSING:
        return default
    if state is None or name not in state:
        raise pickle.UnpicklingError(f"DCP metadata record lacks {name!r}")
    return state[name]


def read_dcp_folder(path: Path) -> tuple[dict[str, Any], list[str], list[Path]]:
    """Read a DCP folder (``torch_save`` serialization): ``.metadata`` maps each fully-qualified name to a byte
    range of a ``.distcp`` file holding a ``torch.save`` stream (tensors) or pickled bytes (other objects).
    A name saved in several chunks gets one entry per chunk, ``name@offsets``."""
    metadata, globals_ = read_pickle_file(MappedFile(path / DCP_METADATA))
    storage_data = _field(metadata, "storage_data")
    if not isinstance(storage_data, dict):
        raise pickle.UnpicklingError("DCP metadata has no storage map")
    entries: list[tuple[str, tuple[int, ...], Any]] = []
    for index, info in storage_data.items():
        fqn, offset = str(_field(index, "fqn")), tuple(_field(index, "offset", None) or ())
        entries.append((fqn, offset, info))
    chunks: dict[str, int] = {}
    for fqn, _, _ in entries:
        chunks[fqn] = chunks.get(fqn, 0) + 1
    root: dict[str, Any] = {}
    files: dict[Path, MappedFile] = {}
    for fqn, offset, info in entries:
        relative = str(_field(info, "relative_path"))
        start, length = int(_field(info, "offset")), int(_field(info, "length"))
        file = (path / relative).resolve()
        if file.parent != path.resolve() or not file.is_file():
            raise pickle.UnpicklingError(f"DCP item {fqn!r} points to a missing file {relative!r}")
        mapped = files.setdefault(file, MappedFile(file))
        if start < 0 or length < 0 or start + length > mapped.size:
            raise pickle.UnpicklingError(f"DCP item {fqn!r} lies outside {relative!r}")
        with file.open("rb") as f:
            f.seek(start)
            head = f.read(4)
        if head == ZIP_MAGIC:
            value, names = read_zip(mapped, start, length)
        else:
            with file.open("rb") as f:
                f.seek(start)
                value, names, _ = inert_load_bounded(f.read(length))
        globals_.extend(names)
        key = fqn if chunks[fqn] == 1 and not any(offset) else f"{fqn}@{','.join(map(str, offset))}"
        root[key] = value
    return root, globals_, [path / DCP_METADATA, *files]


def find_checkpoints(folder: Path) -> list[Path]:
    """Every checkpoint under ``folder``: files with a checkpoint suffix, and HF/DCP folders as units (their
    inner files are not listed again). Sorted by path.

    Symlinks are followed, but each real folder and each real file is visited once (by device and inode), so
    ``a -> .`` cannot loop and a link to a file already listed is not listed again. Dangling links, special
    files (FIFOs, devices) and folders that cannot be listed are skipped: they hold no checkpoint to audit.
    """
    seen: set[tuple[int, int]] = set()
    found: list[Path] = []
    pending = [folder]
    while pending:
        current = pending.pop()
        try:
            info = current.stat()
        except OSError:
            continue
        if (info.st_dev, info.st_ino) in seen:
            continue
        seen.add((info.st_dev, info.st_ino))
        if current is not folder and not stat.S_ISDIR(info.st_mode):
            if stat.S_ISREG(info.st_mode) and current.suffix in CHECKPOINT_SUFFIXES:
                found.append(current)
            continue
        try:
            if is_dcp_folder(current) or is_hf_folder(current):
                found.append(current)
                continue
            entries = sorted(current.iterdir())
        except OSError:
            continue
        pending.extend(reversed(entries))
    return sorted(found)
