"""params.py owns the checks of the CLI's path arguments: every file, folder and output path a command takes is
checked for its kind as the command line is parsed, before the command does anything.

A path that exists must be what the argument expects, after following symlinks: a regular file where a file
is read (``--policy``), a folder where a folder is expected (``RUN_DIR``, ``--run-dir``, ``--record``), a
regular file or a folder for a checkpoint, a regular file (or nothing yet) for an output (``-o``). A FIFO, a
device or a socket is never any of them: reading one blocks or never ends. A refusal is one line naming the
path and what it is, exit 2 (:class:`nanguard.paths.BadPath`, reported by the root group's error handler).
A path that does not exist is left to the command, which knows whether it creates it or what to say.

Each check is a Typer ``callback``: ``typer.Option(..., callback=folder_arg)``. ``scan-log`` needs none: it
opens its files through :func:`nanguard.paths.open_regular_file` itself. It imports no torch.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from nanguard.paths import require_file_or_folder, require_folder, require_regular_file, require_writable_file_path


def _each(check: Callable[[Path], object], *, missing_too: bool = False) -> Callable[[Any], Any]:
    """A callback applying ``check`` to every path of an argument (one path, a list, or None) that exists (every
    one with ``missing_too``)."""

    def callback(value: Any) -> Any:  # Path, list[Path] or None; Typer passes what the parameter holds
        for path in value if isinstance(value, list) else [value]:
            if path is not None and (missing_too or os.path.lexists(path)):
                check(path)
        return value

    return callback


file_arg = _each(require_regular_file)
"""A file that is read: if it exists, a regular file."""
folder_arg = _each(require_folder)
"""A folder: if it exists, a folder."""
checkpoint_arg = _each(require_file_or_folder)
"""A checkpoint: if it exists, a regular file or a folder."""
output_file_arg = _each(require_writable_file_path, missing_too=True)
"""A file that is written: if it exists, a regular file; its parent, if it exists, a folder."""
