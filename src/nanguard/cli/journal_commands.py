"""journal_commands.py owns ``nanguard incidents``: reading a run's journal and rendering its incidents.

It reads through :func:`nanguard.journal.read_incidents` only and never writes the journal. It imports no
torch, at load time or when a command runs: ``nanguard incidents`` must work where torch is not installed.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from typing import Any

from rich import box
from rich.console import RenderableType
from rich.table import Table
from rich.text import Text

from nanguard.cli import JsonFlag, RunDir, app
from nanguard.cli.output import emit, float_cell, format_counts, int_cell, list_cell
from nanguard.journal import read_incidents


@app.command()
def incidents(run_dir: RunDir, as_json: JsonFlag = False) -> None:
    """List a run's incidents: what went wrong, at which step, in which tensors, and what the guard did."""
    emit(read_incidents(run_dir), as_json=as_json, render=_render_incidents)


def _render_incidents(rows: list[dict[str, Any]]) -> Iterable[RenderableType]:
    """A table of incidents, one row each, then a one-line count per kind and per action. The micro-batch and
    attempt columns appear when some row has one; a row whose step was rolled back and run again (``replay``)
    is dim."""
    if not rows:
        yield Text("no incidents")
        return
    micro = any(row.get("micro_batch") is not None for row in rows)
    attempts = any(row.get("attempt") for row in rows)
    # Narrow columns first: on an 80-column terminal the two list columns fold, the rest stays readable.
    table = Table(box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False, collapse_padding=True, header_style="bold")
    headers = ["id", "step", "epoch", "batch"] + ["micro"] * micro + ["attempt"] * attempts + ["rank"]
    for header in headers:
        table.add_column(header, justify="right", overflow="fold")
    table.add_column("kind", overflow="fold")
    table.add_column("action", overflow="fold")
    table.add_column("loss", justify="right", overflow="fold")
    table.add_column("grad norm", justify="right", overflow="fold")
    table.add_column("non-finite tensors", overflow="fold", min_width=10)
    table.add_column("samples", overflow="fold", min_width=7)
    for row in rows:
        cells = [int_cell(row["id"]), int_cell(row["step"]), int_cell(row["epoch"]), int_cell(row["batch_index"])]
        cells += [int_cell(row.get("micro_batch"))] * micro + [int_cell(row.get("attempt"))] * attempts
        cells += [
            int_cell(row["rank"]),
            Text(row["kind"]),
            Text(row["action"]),
            float_cell(row["loss"]),
            float_cell(row["grad_norm"]),
            list_cell(row["tensors"]),
            list_cell(row["sample_ids"]),
        ]
        table.add_row(*cells, style="dim" if row.get("replay") else None)
    yield table
    yield Text(_incident_summary(rows))


def _incident_summary(rows: list[dict[str, Any]]) -> str:
    kinds = Counter(row["kind"] for row in rows)
    actions = Counter(row["action"] for row in rows)
    noun = "incident" if len(rows) == 1 else "incidents"
    summary = f"{len(rows)} {noun}; kinds: {format_counts(kinds)}; actions: {format_counts(actions)}"
    replayed = sum(1 for row in rows if row.get("replay"))
    if replayed:
        summary += f"; {replayed} on steps a rollback undid and ran again (dim)"
    return summary
