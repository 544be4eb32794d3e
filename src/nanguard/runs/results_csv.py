"""results_csv.py owns reading an Ultralytics ``results.csv`` (:func:`read_results`, for ``nanguard status`` and
``report``) and trimming it back to a rolled-back epoch.

results.csv numbers epochs from 1, so a checkpoint of 0-based epoch index E goes with rows ``1 … E+1``.
:func:`trim_results` works on text and :func:`trim_counts` on a file, and neither writes anything:
:func:`~nanguard.runs.ultralytics_disk.apply_rollback` writes the trimmed text (atomically) and
:func:`~nanguard.runs.ultralytics_disk.plan_rollback` reports the counts.
"""

from __future__ import annotations

import csv
from pathlib import Path

from nanguard.errors import JournalError
from nanguard.runs.base import MAX_EPOCHS, as_int

MAX_RESULTS_CSV_BYTES = 64 << 20
"""Largest results.csv read (64 MiB). Ultralytics writes one line of ~300 bytes per epoch, so even a
100,000-epoch run stays far below; a larger file is not a results.csv, and reading it would take memory
without bound."""


def read_results_text(path: Path) -> str:
    """results.csv as text, refused in one line naming the file when it is not one: larger than
    :data:`MAX_RESULTS_CSV_BYTES`, not UTF-8, holding NUL bytes, or a line CSV cannot parse (a field over
    the csv module's limit of 128 KiB). The one reader of results.csv: status, report, plan and rollback.

    Raises:
        JournalError: naming ``path`` and the problem.
    """
    try:
        with path.open("rb") as handle:
            data = handle.read(MAX_RESULTS_CSV_BYTES + 1)
    except OSError as err:
        raise JournalError(f"{path}: cannot read ({err.strerror or err})") from None
    if len(data) > MAX_RESULTS_CSV_BYTES:
        raise JournalError(f"{path}: larger than {MAX_RESULTS_CSV_BYTES >> 20} MiB; not an Ultralytics results.csv")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise JournalError(f"{path}: not a text results.csv (not UTF-8 at byte {err.start})") from None
    if "\0" in text:
        raise JournalError(f"{path}: not a text results.csv (holds NUL bytes)")
    try:
        for _ in csv.reader(text.splitlines()):
            pass
    except csv.Error as err:
        raise JournalError(f"{path}: not a readable results.csv ({err})") from None
    return text


def read_results(path: Path) -> list[dict[str, float | None]]:
    """The rows of an Ultralytics results.csv as ``{column: number}`` (header names stripped, as 8.3.0 padded
    them; ``nan`` kept as NaN; an unreadable cell None, and so an ``epoch`` that is not a whole number from
    0 to :data:`~nanguard.runs.base.MAX_EPOCHS`), in file order; ``[]`` when there is no file."""
    if not path.is_file():
        return []
    reader = csv.reader(read_results_text(path).splitlines())
    header = [name.strip() for name in next(reader, [])]
    rows = []
    for cells in reader:
        if not any(cell.strip() for cell in cells):
            continue
        row = {name: _number(cell) for name, cell in zip(header, cells, strict=False)}
        if "epoch" in row:
            epoch = as_int(row["epoch"])
            row["epoch"] = float(epoch) if epoch is not None and 0 <= epoch <= MAX_EPOCHS else None
        rows.append(row)
    return rows


def trim_results(text: str, target_epoch: int) -> tuple[str, int, int]:
    """results.csv text keeping the header and the rows of epochs ``1 … target_epoch + 1`` (1-based column);
    where an epoch repeats (an earlier resume), only its last row is kept. Returns (text, kept, dropped).

    Lines are kept byte for byte (line endings, 8.3.0's padded columns); a row whose epoch cannot be read is
    kept.
    """
    lines = text.splitlines(keepends=True)
    if not lines:
        return text, 0, 0
    header = [name.strip() for name in next(csv.reader([lines[0]]))]
    if "epoch" not in header:
        return text, len(lines) - 1, 0
    column = header.index("epoch")
    last_of: dict[int, int] = {}
    epochs: list[int | None] = []
    for index, line in enumerate(lines[1:]):
        cells = next(csv.reader([line]), [])
        value = as_int(_number(cells[column])) if len(cells) > column else None
        epochs.append(value)
        if value is not None:
            last_of[value] = index
    keep = [lines[0]]
    dropped = 0
    for index, (line, value) in enumerate(zip(lines[1:], epochs, strict=True)):
        if not line.strip() or value is None or (value <= target_epoch + 1 and last_of[value] == index):
            keep.append(line)
        else:
            dropped += 1
    return "".join(keep), sum(1 for line in keep[1:] if line.strip()), dropped


def trim_counts(path: Path, target_epoch: int) -> tuple[int, int] | None:
    """(rows kept, rows dropped) were ``path`` trimmed to ``target_epoch``; None when there is no such file."""
    if not path.is_file():
        return None
    _, kept, dropped = trim_results(read_results_text(path), target_epoch)
    return kept, dropped


def _number(text: str) -> float | None:
    try:
        return float(text.strip())
    except ValueError:
        return None
