"""paths.py owns telling what kind of thing a path names before nanguard reads or writes it, and opening a
regular file without blocking.

A FIFO blocks in ``open()`` until a writer comes, a device such as ``/dev/zero`` never ends, a socket cannot be
read at all: none of them is a log, a policy file, a checkpoint or an output file. :func:`open_regular_file`
opens with ``O_NONBLOCK`` (so a FIFO cannot block the open itself), checks the open descriptor with ``fstat``
(so a path swapped between a check and the open is still caught) and only then hands it back, in blocking
mode. :func:`require_regular_file`, :func:`require_folder` and :func:`require_file_or_folder` check a path's
kind (after following symlinks) for arguments that are read later by code that opens them itself.

Every refusal is a :class:`BadPath` (a :class:`~nanguard.errors.NanguardError`, exit 2) whose message names the
path and what it is, in one line. It imports only the standard library and ``nanguard.errors``.
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path
from typing import Any

from nanguard.errors import NanguardError


class BadPath(NanguardError):
    """A path names the wrong kind of thing (a FIFO, a device, a socket, a folder where a file is expected, a
    file where a folder is expected) or cannot be looked at; the message names the path and the problem."""


_KINDS = ((stat.S_ISREG, "a regular file"), (stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a FIFO (named pipe)"),
          (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"))


def describe_kind(mode: int) -> str:
    """What a ``st_mode`` names, in the words error messages use ("a FIFO (named pipe)", "a folder", ...)."""
    return next((words for is_kind, words in _KINDS if is_kind(mode)), "not a regular file")


def _stat(path: str | os.PathLike[str]) -> os.stat_result:
    try:
        return os.stat(path)  # follows symlinks: a link to a regular file is a regular file
    except OSError as err:
        raise BadPath(f"{os.fspath(path)}: {err.strerror or err}") from None


def require_regular_file(path: str | os.PathLike[str], what: str = "file") -> os.stat_result:
    """Return ``os.stat(path)`` if it is a regular file; else raise :class:`BadPath` naming what it is."""
    info = _stat(path)
    if not stat.S_ISREG(info.st_mode):
        raise BadPath(f"{os.fspath(path)}: is {describe_kind(info.st_mode)}, not a regular {what}")
    return info


def require_folder(path: str | os.PathLike[str], *, must_exist: bool = True) -> None:
    """Raise :class:`BadPath` unless ``path`` is a folder (or, with ``must_exist=False``, does not exist yet)."""
    if not must_exist and not os.path.lexists(path):
        return
    info = _stat(path)
    if not stat.S_ISDIR(info.st_mode):
        raise BadPath(f"{os.fspath(path)}: is {describe_kind(info.st_mode)}, not a folder")


def require_file_or_folder(path: str | os.PathLike[str]) -> None:
    """Raise :class:`BadPath` unless ``path`` is a regular file or a folder (a checkpoint is either)."""
    info = _stat(path)
    if not (stat.S_ISREG(info.st_mode) or stat.S_ISDIR(info.st_mode)):
        raise BadPath(f"{os.fspath(path)}: is {describe_kind(info.st_mode)}, not a regular file or a folder")


def require_writable_file_path(path: str | os.PathLike[str]) -> None:
    """For an output file: raise :class:`BadPath` if ``path`` exists and is no regular file (writing into a FIFO
    blocks; replacing a device or a folder is never what was meant) or its parent is no folder."""
    if os.path.lexists(path):
        require_regular_file(path)
    parent = Path(path).parent
    if os.path.lexists(parent):
        require_folder(parent)


def open_regular_file(path: str | os.PathLike[str], what: str = "file") -> int:
    """Open ``path`` read-only and return the descriptor, if it is a regular file; never blocks on a FIFO.

    Raises:
        BadPath: the path is missing or unreadable (the OS's reason), or names no regular file (what it is).
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except OSError as err:
        raise BadPath(f"{os.fspath(path)}: {err.strerror or err}") from None
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise BadPath(f"{os.fspath(path)}: is {describe_kind(mode)}, not a regular {what}")
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd


def read_regular_file(path: str | os.PathLike[str], limit: int, what: str = "file") -> bytes:
    """The bytes of a regular file of at most ``limit`` bytes; :class:`BadPath` for a larger one (read no
    further than ``limit + 1`` bytes, whatever the file's size says) or for what :func:`open_regular_file`
    refuses."""
    fd = open_regular_file(path, what)
    try:
        parts: list[bytes] = []
        left = limit + 1
        while left > 0:
            part = os.read(fd, min(left, 1 << 20))
            if not part:
                break
            parts.append(part)
            left -= len(part)
    except OSError as err:
        raise BadPath(f"{os.fspath(path)}: {err.strerror or err}") from None
    finally:
        os.close(fd)
    data = b"".join(parts)
    if len(data) > limit:
        raise BadPath(f"{os.fspath(path)}: larger than {limit} bytes, too large for a {what}")
    return data


def read_json_file(path: str | os.PathLike[str], limit: int, what: str = "file") -> Any:
    """The JSON value of a regular file of at most ``limit`` bytes (read as :func:`read_regular_file` does).

    Raises:
        BadPath: what :func:`read_regular_file` refuses.
        ValueError: not UTF-8 JSON, or nested deeper than the interpreter can decode (``[[[[...``, which
            makes ``json`` raise ``RecursionError``).
    """
    raw = read_regular_file(path, limit, what)
    try:
        return json.loads(raw.decode("utf-8"))
    except RecursionError:
        raise ValueError("JSON nested too deeply") from None
