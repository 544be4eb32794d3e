"""run_commands.py owns ``nanguard rollback`` and ``nanguard undo``: rewinding an Ultralytics run on disk.

Both are thin shells over :mod:`nanguard.runs` (imported inside the command, since it needs torch), which
plans, locks, backs up and writes; this module only renders the plan or its result and the resume commands.
It changes no file itself.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import RenderableType
from rich.text import Text

from nanguard.cli import JsonFlag, app
from nanguard.cli.output import STATUS_STYLES, emit
from nanguard.cli.params import folder_arg

if TYPE_CHECKING:
    from nanguard.runs import RollbackPlan

YoloRunDir = Annotated[
    Path,
    typer.Argument(help="An Ultralytics run folder, the one that holds weights/ and results.csv.",
                   show_default=False, callback=folder_arg),
]


@app.command()
def rollback(
    run_dir: YoloRunDir,
    to: Annotated[
        str,
        typer.Option("--to", metavar="TARGET", help="latest-clean (newest resumable clean checkpoint), best, "
                     "'epoch N' or epochN (0-based, weights/epochN.pt), or a checkpoint path."),
    ] = "latest-clean",
    lr_scale: Annotated[
        float | None,
        typer.Option("--lr-scale", metavar="F", help="Multiply train_args.lr0 in the written last.pt by F.",
                     show_default=False),
    ] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Print the plan; change nothing.")] = False,
    force: Annotated[
        bool, typer.Option("--force", help="Accept a dirty, unsafe or tainted target (never a stripped one).")
    ] = False,
    trust: Annotated[
        bool, typer.Option("--trust", help="Accept a target that names classes outside the load allowlist, or "
                           "calls code (a resume runs it), and load it so when it must be rewritten. Only for files "
                           "you trust.")
    ] = False,
    as_json: JsonFlag = False,
) -> None:
    """Roll an Ultralytics run back on disk to a resumable clean checkpoint, then print the resume command.

    Locks the run (refused while nanguard run supervises it or a Guard writes snapshots into it), audits every checkpoint, and backs up last.pt, best.pt and results.csv into .nanguard/backups/. All or nothing: a killed rollback is reverted by the next rollback, undo or nanguard run, which says so in one line.

    Then writes the target as weights/last.pt, drops the results.csv rows after its epoch, scales lr0 if asked, and records it in the journal. Undo with: nanguard undo RUN_DIR.

    Exit status: 0 done (or planned, with --dry-run); 2 no weights folder, no resumable clean checkpoint, a target that cannot be resumed (stripped, final epoch), or an unusable journal; 1 a dirty or tainted target (without --force); 3 an unsafe target (even with --force) or one naming classes outside the allowlist (without --trust); 5 the run is locked. --dry-run makes every check of the real command and fails with the same exit code and message.
    """  # noqa: E501
    from nanguard.runs import apply_rollback, check_apply, plan_rollback, recover
    from nanguard.runs.intent import read_intent

    if dry_run:
        # The real command's checks in the real command's order, without its writes: it fails where that would.
        pending = read_intent(run_dir) if run_dir.is_dir() else None
        plan = plan_rollback(run_dir, to=to, lr_scale=lr_scale, force=force, trust=trust)
        check_apply(run_dir)
        recovered = None if pending is None else (f"{run_dir}: a killed {pending['action'].removeprefix('disk_')} "
                                                  "is pending; the real command finishes it first, then plans again")
        emit({**plan.to_dict(), "dry_run": True, "recovered": recovered}, as_json=as_json,
              render=lambda data: _render_rollback(data, plan))
        return
    recovered = recover(run_dir)  # what a killed rollback or undo left; None (and nothing created) otherwise
    plan = plan_rollback(run_dir, to=to, lr_scale=lr_scale, force=force, trust=trust)
    result = apply_rollback(plan)
    emit({**result.to_dict(), "dry_run": False, "recovered": recovered}, as_json=as_json,
          render=lambda data: _render_rollback(data, plan))


@app.command()
def undo(run_dir: YoloRunDir, as_json: JsonFlag = False) -> None:
    """Undo the last rollback: restore last.pt, best.pt and results.csv from the newest backup, byte for byte.

    All or nothing: a killed undo is completed by the next rollback, undo or nanguard run. A folder without .nanguard/ is refused and nothing is created.

    Exit status: 0 restored; 2 no backup left to undo (or a damaged one); 5 the run is locked.
    """  # noqa: E501
    from nanguard.runs import undo_last

    emit(undo_last(run_dir).to_dict(), as_json=as_json, render=_render_undo)


def _render_rollback(data: dict[str, Any], plan: RollbackPlan) -> Iterable[RenderableType]:
    """The plan (or what was done), every checkpoint's verdict, and the exact resume commands."""
    done = not data["dry_run"]
    if data.get("recovered"):
        yield Text(data["recovered"], style="yellow")
    yield Text(("rolled back " if done else "rollback plan for ") + data["run_dir"]
               + ("" if done else "  (dry run: nothing changed)"), style="bold")
    target = f"{data['target']}  epoch index {data['target_epoch']}"
    if data["epochs"] is not None:
        target += f" of {data['epochs']}"
    target += (f"; training resumes at epoch index {data['resume_epoch']} "
               f"(Ultralytics prints \"from epoch {data['resume_epoch'] + 1}\")")
    edits = []
    if data["lr_scale"] is not None:
        edits.append(f"lr0 {data['lr0_before']:.6g} -> {data['lr0_after']:.6g} (x{data['lr_scale']:g})")
    if data["save_dir_before"] is not None:
        edits.append(f"save_dir {data['save_dir_before']} -> {data['run_dir']}")
    last = "a copy of the target" if not edits else "the target with " + "; ".join(edits)
    if data["results_rows_kept"] is None:
        results = "none"
    else:
        results = f"keeps {data['results_rows_kept']} rows, drops {data['results_rows_dropped']}"
    fields = {
        "target": target,
        "last.pt": last,
        "best.pt": ("replaced by the new last.pt: " if data["replace_best"] else "kept: ") + data["best_reason"],
        "results.csv": results,
        "backup": data.get("backup_dir") or (", ".join(data["backed_up"]) or "nothing")
        + " -> .nanguard/backups/<time>/",
    }
    if data["forced"]:
        fields["forced"] = "; ".join(data["forced"])
    for name, value in fields.items():
        yield Text(f"  {name + ':':<14}{value}")
    yield Text("checkpoints:")
    for candidate in plan.candidates:
        status = candidate.status
        line = Text(f"  {status:<10}", style=STATUS_STYLES.get(status, ""))
        line.append(f" {candidate.path.name:<12} epoch {'-' if candidate.epoch is None else candidate.epoch:<3} ")
        line.append("usable" if candidate.usable else (candidate.problem or candidate.concern or ""))
        yield line
    yield Text("resume with:" if done else "after the rollback, resume with:")
    yield Text(f"  {data['resume_command']}")
    yield Text(f"  {data['python_command']}")
    if done:
        yield Text(f"undo with: nanguard undo {data['run_dir']}")


def _render_undo(data: dict[str, Any]) -> Iterable[RenderableType]:
    if data.get("recovered"):
        yield Text(data["recovered"], style="yellow")
    yield Text(f"restored {data['backup_dir']}", style="bold")
    for name in data["restored"]:
        yield Text(f"  restored {name}")
    for name in data["removed"]:
        yield Text(f"  removed  {name} (it did not exist before the rollback)")
