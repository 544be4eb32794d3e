"""output.py owns how the CLI prints: :func:`emit`, JSON encoding, and the table cells several commands share.

:func:`emit` is the one place a command's result reaches stdout: JSON when ``--json`` is given, else the Rich
renderables a command's ``_render_*`` function yields. The cell and list helpers here keep tables and lines
alike across commands (the same "-" for a missing value, the same abbreviation of long lists).

It renders no command's result itself (each command module has its own renderer) and prints nothing to
stderr: errors are the root group's job, in ``nanguard.cli``. It imports neither torch nor the library.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import typer
from rich.console import Console, RenderableType
from rich.text import Text

PIPE_WIDTH = 1000
"""Console width when stdout is not a terminal: piped output never folds, so one incident is one line."""

LIST_CELL_ITEMS = 3
"""How many tensor names or sample ids a table cell shows before it abbreviates (``--json`` has all)."""

STATUS_STYLES = {"clean": "green", "dirty": "bold red", "unsafe": "bold magenta", "unreadable": "bold yellow"}


def emit(data: Any, *, as_json: bool, render: Callable[[Any], Iterable[RenderableType]]) -> None:
    """Print a command's result: ``data`` as JSON when ``as_json``, else what ``render(data)`` yields."""
    if as_json:
        # allow_nan=False: a NaN that slipped past _json_safe fails here instead of writing invalid JSON.
        typer.echo(json.dumps(_json_safe(data), indent=2, allow_nan=False))
        return
    console = Console(highlight=False)
    if not console.is_terminal:
        console.width = PIPE_WIDTH  # Rich would assume 80 columns and fold every row of a wide table
    for renderable in render(data):
        console.print(renderable)


def _json_safe(value: Any) -> Any:
    """``value`` with every non-finite float replaced by ``"nan"``, ``"inf"`` or ``"-inf"``.

    JSON has no NaN or Infinity; Python's ``json`` would write the non-standard tokens ``NaN``/``Infinity``.
    """
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # str() of a non-finite float is exactly "nan", "inf" or "-inf"
    if isinstance(value, dict):
        return {key: _json_safe(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(item) for item in value]
    return value


def format_counts(counter: Counter[str]) -> str:
    return ", ".join(f"{name} {count}" for name, count in counter.most_common())


def _missing() -> Text:
    return Text("-", style="dim")


def int_cell(value: int | None) -> Text:
    return _missing() if value is None else Text(str(value))


def float_cell(value: float | None) -> Text:
    if value is None:
        return _missing()
    # Format spec "g" writes non-finite values as "nan", "inf", "-inf", the same words --json uses.
    return Text(f"{value:.6g}", style="" if math.isfinite(value) else "bold red")


def list_cell(items: Sequence[Any] | None) -> Text:
    if not items:
        return _missing()
    shown = ", ".join(str(item) for item in items[:LIST_CELL_ITEMS])
    hidden = len(items) - LIST_CELL_ITEMS
    return Text(f"{shown}, … +{hidden} more" if hidden > 0 else shown)


def abbreviate(items: Sequence[str]) -> str:
    hidden = len(items) - LIST_CELL_ITEMS
    shown = "; ".join(items[:LIST_CELL_ITEMS])
    return f"{shown}; … +{hidden} more" if hidden > 0 else shown
