"""atomic.py owns replacing files atomically: the one way nanguard writes a file that must never be seen
half-written (checkpoints, snapshots, rolled-back ``last.pt``, backups put back).

A temp file in the target's folder is written, fsynced and renamed over the target, then the folder is
fsynced: a crash at any moment leaves either the old file or the new one under the final name. It imports
no torch, so the CLI's commands can use it without loading it.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path


def _fsync_dir(folder: Path) -> None:
    # The rename is durable only once the directory entry is; Windows cannot open a directory for fsync.
    if os.name == "nt":
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_replace(path: str | Path) -> Iterator[Path]:
    """Write a file atomically: yields a temp path in ``path``'s folder to write; on success the temp file
    is fsynced, renamed over ``path`` and the folder fsynced, so a crash at any moment leaves either the old
    file or the new one under the final name; on failure the temp file is removed and ``path`` untouched.
    This is the one place nanguard replaces a file."""
    path = Path(path)
    folder = path.parent if str(path.parent) else Path(".")
    fd, tmp_name = tempfile.mkstemp(dir=folder, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        # mkstemp creates 0600; keep the mode of the file being replaced, else the usual 0644.
        os.chmod(tmp, path.stat().st_mode & 0o777 if path.exists() else 0o644)
        yield tmp
        with tmp.open("rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    _fsync_dir(folder)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Replace ``path`` with ``data`` atomically (see :func:`atomic_replace`)."""
    with atomic_replace(path) as tmp:
        tmp.write_bytes(data)


def atomic_link(source: str | Path, path: str | Path) -> None:
    """Make ``path`` a hard link to ``source`` atomically: link under a temp name in ``path``'s folder, rename
    it over ``path``, fsync the folder. Both names then share one file, which is safe only for files that are
    always replaced by rename (as :func:`atomic_replace` does), never rewritten in place. Raises ``OSError``
    where hard links are not possible (another file system), so the caller can copy instead."""
    path = Path(path)
    folder = path.parent if str(path.parent) else Path(".")
    tmp = folder / f".{path.name}.{secrets.token_hex(6)}.link"
    os.link(source, tmp)
    try:
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    _fsync_dir(folder)


def atomic_copy(source: str | Path, path: str | Path) -> None:
    """Copy ``source`` over ``path`` (bytes, mode and times) atomically (see :func:`atomic_replace`)."""
    with atomic_replace(path) as tmp:
        shutil.copy2(source, tmp)


def remove_durably(path: str | Path) -> None:
    """Remove ``path`` when it is there and fsync its folder, so the removal survives a crash."""
    path = Path(path)
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
    _fsync_dir(path.parent if str(path.parent) else Path("."))
