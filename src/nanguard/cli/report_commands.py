"""report_commands.py owns ``nanguard status``, ``nanguard report`` and ``nanguard plan``: reading a run folder
from outside the training process and showing its health, its curves and the options for recovering it.

Each is a thin shell over :mod:`nanguard.report`: :func:`~nanguard.report.runinfo.gather_run` reads the run once,
and the command renders it. ``status`` imports neither torch nor matplotlib; ``report`` imports matplotlib
(inside the command, Agg backend); ``plan`` imports torch only to audit an Ultralytics run's checkpoints.
Nothing here writes to the run folder; ``report`` writes only the HTML file and PNGs it is told to.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console, Group

from nanguard.cli import JsonFlag, RunDir, app
from nanguard.cli.output import PIPE_WIDTH, emit
from nanguard.cli.params import folder_arg, output_file_arg
from nanguard.runs.base import MAX_EPOCHS

EpochsOption = Annotated[
    int | None,
    typer.Option("--epochs", min=1, max=MAX_EPOCHS, metavar="N", show_default=False,
                 help="The run's total epochs, when args.yaml does not say (loops other than Ultralytics)."),
]


@app.command()
def status(
    run_dir: RunDir,
    watch: Annotated[bool, typer.Option("--watch", help="Refresh the dashboard until Ctrl-C.")] = False,
    interval: Annotated[
        float, typer.Option("--interval", min=0.2, metavar="S", help="Seconds between refreshes with --watch.")
    ] = 2.0,
    epochs: EpochsOption = None,
    as_json: JsonFlag = False,
) -> None:
    """Show a run's health: progress, ETA, incidents, checkpoints, rollbacks, LR, processes.

    Epoch and batch progress with an ETA from measured epoch times, incidents per epoch, the last clean checkpoint,
    rollbacks, the LR and probation, and whether the training and supervisor processes are alive.

    Reads RUN_DIR/.nanguard/journal.db (read-only), results.csv, args.yaml and .nanguard/supervisor.json.
    """
    from nanguard.report.runinfo import gather_run
    from nanguard.report.status import status_dict, status_renderables

    if not watch or as_json:
        info = gather_run(run_dir, epochs=epochs)
        if as_json:
            emit(status_dict(info), as_json=True, render=status_renderables)
        else:
            emit(info, as_json=False, render=status_renderables)
        return
    from rich.live import Live

    console = Console(highlight=False)
    if not console.is_terminal:
        console.width = PIPE_WIDTH
    # The first read fails the command with the one-line error; later ones only happen while watching.
    view = Group(*status_renderables(gather_run(run_dir, epochs=epochs)))
    try:
        with Live(view, console=console, auto_refresh=False) as live:
            while True:
                time.sleep(interval)
                live.update(Group(*status_renderables(gather_run(run_dir, epochs=epochs))), refresh=True)
    except KeyboardInterrupt:
        return  # Ctrl-C is how --watch ends: exit 0


@app.command()
def report(
    run_dir: RunDir,
    output: Annotated[
        Path, typer.Option("-o", "--output", metavar="FILE", help="The HTML file to write.", show_default=False,
                           callback=output_file_arg)
    ],
    png_dir: Annotated[
        Path | None,
        typer.Option("--png-dir", metavar="DIR", show_default=False,
                     help="Where to write the PNGs (default: beside the HTML file).", callback=folder_arg),
    ] = None,
    epochs: EpochsOption = None,
) -> None:
    """Write a self-contained HTML report of a run, with its plots also as PNGs.

    The HTML embeds the plots and its CSS and references nothing outside itself.
    Plots: loss with incidents marked and rolled-back spans shaded, gradient norm with the clip threshold, the
    LR, and a timeline of actions. Tables: incidents and checkpoint verdicts. Needs matplotlib.
    """
    from nanguard.report.html import write_report
    from nanguard.report.runinfo import gather_run

    info = gather_run(run_dir, epochs=epochs, probe_processes=False)
    written = write_report(info, output, png_dir=png_dir)
    typer.echo(f"wrote {written.html} ({len(written.pngs)} plots: {', '.join(str(p) for p in written.pngs)})")


@app.command()
def plan(run_dir: RunDir, epochs: EpochsOption = None, as_json: JsonFlag = False) -> None:
    """Weigh the ways out of a bad run in hours lost and ETA to the final epoch.

    (a) finish the epoch, then roll back; (b) roll back now; (c) recover in process. With a timeline of each and
    the assumptions behind the numbers.

    Uses the measured epoch time and the journal; for an Ultralytics run, names the on-disk rollback target as
    nanguard rollback would pick it (changes nothing).
    """
    from nanguard.report.plan import make_plan, plan_renderables
    from nanguard.report.runinfo import gather_run

    result = make_plan(gather_run(run_dir, epochs=epochs, probe_processes=False))
    emit(result.to_dict() if as_json else result, as_json=as_json, render=plan_renderables)
