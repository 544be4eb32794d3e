"""atomic.py owns replacing files and folders atomically: the one way nanguard writes a file that must never be
seen half-written (checkpoints, snapshots, rolled-back ``last.pt``, backups put back, pinned checkpoint folders).

A temp file in the target's folder is written, fsynced and renamed over the target, then the folder is
fsynced: a crash at any moment leaves either the old file or the new one under the final name. It imports
no torch, so the CLI's commands can use it without loading it.
"""

from __future__ import annotations

import contextlib
import errno
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


def _parent(path: Path) -> Path:
    return path.parent if str(path.parent) else Path(".")


def rename_over(source: str | Path, path: str | Path) -> None:
    """Rename ``source`` onto ``path`` (same file system), replacing what is there, and fsync both folders.

    A file, or a folder onto a missing name, is one atomic rename. A folder onto an existing folder (which no
    rename replaces on POSIX) takes two: the old folder is renamed aside (``.NAME.<hex>.old`` beside it), the new
    one into place, then the old one is removed. A crash between the two renames leaves the old folder aside
    and nothing under ``path``, never a mix of the two.

    Raises:
        OSError: the rename failed (``EXDEV`` across file systems: see :func:`move_over`); ``path`` is as before.
    """
    source, path = Path(source), Path(path)
    folder = _parent(path)
    if source.is_dir() and not source.is_symlink() and path.is_dir() and not path.is_symlink():
        aside = folder / f".{path.name}.{secrets.token_hex(6)}.old"
        os.rename(path, aside)
        try:
            os.rename(source, path)
        except BaseException:
            os.rename(aside, path)
            raise
        _fsync_dir(folder)
        shutil.rmtree(aside, ignore_errors=True)
    else:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)  # a file replaces a folder: the folder goes first
        os.replace(source, path)
    _fsync_dir(folder)
    if _parent(source).resolve() != folder.resolve():
        _fsync_dir(_parent(source))


def move_over(source: str | Path, path: str | Path) -> None:
    """Move ``source`` (file or folder) to ``path``, replacing what is there: :func:`rename_over`, or across
    file systems an atomic copy to ``path`` (:func:`atomic_copy_tree`) and then the removal of ``source``."""
    source, path = Path(source), Path(path)
    try:
        rename_over(source, path)
    except OSError as err:
        if err.errno != errno.EXDEV:
            raise
        atomic_copy_tree(source, path)
        if source.is_dir() and not source.is_symlink():
            shutil.rmtree(source)
            _fsync_dir(_parent(source))
        else:
            remove_durably(source)


def _fsync_tree(root: Path) -> None:
    for folder, _, files in os.walk(root):
        for name in files:
            if os.path.islink(os.path.join(folder, name)):
                continue
            fd = os.open(os.path.join(folder, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(Path(folder))


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:  # another file system, or one without hard links
        shutil.copy2(src, dst)


def atomic_copy_tree(source: str | Path, path: str | Path, *, link: bool = False) -> None:
    """Copy the file or folder ``source`` over ``path`` atomically: a file as :func:`atomic_copy` (or
    :func:`atomic_link`), a folder into a temp folder beside ``path`` (every file and folder fsynced), then
    :func:`rename_over`. A crash leaves the old ``path`` (or nothing, between the two renames of a folder
    over a folder) and at most a ``.NAME.*.tmp`` folder beside it, never a half-copied ``path``.

    Args:
        link: hard-link the files instead of copying them (a copy where links are impossible). Safe only when
            every file under ``source`` is always replaced by rename, never rewritten in place: nanguard's own
            pinned copies, never a file a trainer writes.
    """
    source, path = Path(source), Path(path)
    if not source.is_dir():
        if link:
            try:
                atomic_link(source, path)
                return
            except OSError:
                pass
        atomic_copy(source, path)
        return
    folder = _parent(path)
    tmp = Path(tempfile.mkdtemp(dir=folder, prefix=f".{path.name}.", suffix=".tmp"))
    try:
        os.rmdir(tmp)  # copytree creates it, with the source folder's mode
        shutil.copytree(source, tmp, symlinks=True, copy_function=_link_or_copy if link else shutil.copy2)
        _fsync_tree(tmp)
        rename_over(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
