"""log_commands.py owns ``nanguard scan-log``: scanning training logs for NaN/Inf incidents, once or following.

It calls :func:`nanguard.logscan.scan_file` (or :func:`nanguard.logscan.follow` with ``-f``) and renders the
:class:`~nanguard.logscan.ScanResult` of each file. Like ``grep``, it exits 1 when it found incidents and 0
when it found none; a missing, unreadable or binary file, a FIFO or device or a bad ``--pattern`` is a
one-line error, exit 2. It imports no torch.
"""

from __future__ import annotations

from collections.abc import Generator, Iterable
from enum import Enum
from pathlib import Path
from typing import Annotated, Any

import typer
from rich import box
from rich.console import Console, RenderableType
from rich.table import Table
from rich.text import Text

from nanguard.cli import JsonFlag, app
from nanguard.cli.output import PIPE_WIDTH, emit, int_cell
from nanguard.errors import ExitCode
from nanguard.logscan import LogEvent, LogScanner, ScanResult, check_readable, follow, scan_file


class LogFormat(str, Enum):
    """``--format`` values (``nanguard.logscan.FORMATS``)."""

    auto = "auto"
    ultralytics = "ultralytics"
    results_csv = "results-csv"
    generic = "generic"
    jsonl = "jsonl"


@app.command("scan-log")
def scan_log(
    files: Annotated[list[Path], typer.Argument(help="Log files: console logs, results.csv, JSON lines.",
                                                show_default=False)],
    fmt: Annotated[LogFormat, typer.Option("--format", help="Read every file as this format.")] = LogFormat.auto,
    pattern: Annotated[str | None, typer.Option(
        "--pattern", help="A regular expression; matching lines count as incidents (named groups epoch, batch, "
                          "step place them).")] = None,
    as_json: JsonFlag = False,
    follow_files: Annotated[bool, typer.Option(
        "-f", "--follow", help="Keep reading as the files grow; print each new incident. Ctrl-C ends it.")] = False,
    idle_exit: Annotated[float | None, typer.Option(
        "--idle-exit", metavar="SECONDS", help="With -f: stop after SECONDS without new output.")] = None,
) -> None:
    """Scan training logs for NaN/Inf: incidents per epoch (0-based, as the journal), the first NaN batch,
    totals and the last progress. Exit 1 when incidents were found, 0 when none (like grep)."""
    for path in files:  # every file is checked before any output, so a bad one fails with nothing printed
        check_readable(path)
    if follow_files:
        results = _follow(files, fmt.value, pattern, idle_exit)
    else:
        results = [scan_file(path, fmt.value, pattern) for path in files]
    emit([result.to_dict() for result in results], as_json=as_json, render=_render_scans)
    if any(result.found for result in results):
        raise typer.Exit(int(ExitCode.DIRTY))


def _follow(files: list[Path], fmt: str, pattern: str | None, idle_exit: float | None) -> list[ScanResult]:
    """Follow the files, printing each new incident as one line; the final results when it ends."""
    console = Console(highlight=False, soft_wrap=True)
    if not console.is_terminal:
        console.width = PIPE_WIDTH
    scanners: dict[int, LogScanner] = {}  # by id, in the order follow() first yields them
    announced: set[tuple[str, int | None]] = set()
    stream: Generator[tuple[LogScanner, list[LogEvent]], None, None] = follow(
        files, fmt=fmt, pattern=pattern, idle_exit_s=idle_exit)
    try:
        for scanner, events in stream:
            scanners.setdefault(id(scanner), scanner)
            for event in events:
                line = _live_line(scanner, event, announced)
                if line is not None:
                    console.print(line)
    except KeyboardInterrupt:
        pass  # Ctrl-C: stop following, report what was found
    finally:
        stream.close()
    for scanner in scanners.values():
        scanner.finish()
    return [scanner.result() for scanner in scanners.values()]


def _live_line(scanner: LogScanner, event: LogEvent, announced: set[tuple[str, int | None]]) -> Text | None:
    """One line for a new incident. Progress frames: only an epoch's first non-finite frame (every later
    redraw of that epoch shows the same running-mean NaN)."""
    if not event.is_incident:
        return None
    source = scanner.result().source
    if event.kind == "progress":
        key = (source, event.epoch)
        if key in announced:
            return None
        announced.add(key)
    where = f"epoch {event.epoch}" if event.epoch is not None else "epoch ?"
    if event.batch is not None:
        where += f" batch {event.batch}"
    if event.step is not None:
        where += f" step {event.step}"
    label = (event.detail or event.kind) if event.kind in ("recovery", "match") else "non-finite"
    line = Text(f"{source}: {where}: ", style="bold")
    line.append(label, style="bold red")
    line.append(f": {event.text}")
    return line


def _render_scans(results: list[dict[str, Any]]) -> Iterable[RenderableType]:
    """Per file: a table of incidents per epoch, then the totals and the last progress."""
    for result in results:
        yield Text(f"{result['source']} ({result['format']})", style="bold")
        rows = result["incidents"]
        if rows:
            yield _epoch_table(rows, result["format"])
        totals = result["totals"]
        if result["found"]:
            affected = ", ".join(str(epoch) for epoch in result["epochs_affected"]) or "-"
            yield Text(
                f"{totals['incidents']} incidents in epochs {affected}: {totals['nonfinite_frames']} non-finite "
                f"frames, {totals['nonfinite_lines']} non-finite lines, {totals['recovery_lines']} recovery "
                f"lines, {totals['pattern_lines']} pattern matches"
            )
        else:
            yield Text("no incidents", style="green")
        for item in result["recoveries"][:5]:
            yield Text(f"  {item['kind']} ({item['detail']}), epoch {item['epoch']}: {item['text']}")
        position = result["position"]
        if position is not None:
            yield Text(f"last progress: {_position(position)}")


def _epoch_table(rows: list[dict[str, Any]], fmt: str) -> Table:
    table = Table(box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False, collapse_padding=True, header_style="bold",
                  caption="epoch and batch are 0-based, as in the journal; 'printed' is how the log numbers the "
                          "epoch", caption_justify="left")
    table.add_column("epoch", justify="right")
    table.add_column("printed", justify="right")
    table.add_column("first batch", justify="right")
    table.add_column("first step", justify="right")
    table.add_column("nan frames", justify="right")
    table.add_column("nan lines", justify="right")
    table.add_column("recovery", justify="right")
    table.add_column("matches", justify="right")
    table.add_column("non-finite values", overflow="fold")
    for row in rows:
        epoch = row["epoch"]
        printed = str(epoch + 1) if epoch is not None and fmt in ("ultralytics", "results-csv") else "-"
        table.add_row(
            int_cell(epoch), Text(printed), int_cell(row["first_batch"]), int_cell(row["first_step"]),
            Text(str(row["nonfinite_frames"])), Text(str(row["nonfinite_lines"])),
            Text(str(row["recovery_lines"])), Text(str(row["pattern_lines"])),
            Text(", ".join(row["nonfinite_losses"]) or "-"),
        )
    return table


def _position(position: dict[str, Any]) -> str:
    parts = []
    if position.get("epoch") is not None:
        total = position.get("epochs")
        parts.append(f"epoch {position['epoch']}" + (f" of {total}" if total else ""))
    if position.get("batch") is not None:
        total = position.get("batches")
        parts.append(f"batch {position['batch']}" + (f" of {total}" if total else ""))
    if position.get("step") is not None:
        parts.append(f"step {position['step']}")
    return ", ".join(parts) or "-"
