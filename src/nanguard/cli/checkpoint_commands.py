"""checkpoint_commands.py owns ``nanguard audit`` and ``nanguard inspect``: checkpoint verdicts and their exit codes.

Both call :mod:`nanguard.ckpt` (imported inside the command, since it needs torch) and turn its verdicts into
rows for ``--json`` and one line per checkpoint otherwise. ``audit --record`` stores the verdicts through
:class:`nanguard.journal.Journal`. :data:`AUDIT_PRECEDENCE` decides the exit status when checkpoints disagree.

It reads no checkpoint itself and never loads one with its real classes except through
:func:`nanguard.ckpt.load_checkpoint` (``inspect --load``/``--trust``).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import RenderableType
from rich.text import Text

from nanguard.cli import JsonFlag, app
from nanguard.cli.output import STATUS_STYLES, abbreviate, emit
from nanguard.cli.params import checkpoint_arg, folder_arg
from nanguard.errors import ExitCode, UnreadableCheckpoint
from nanguard.journal import CheckpointRecord, Journal, file_digest

if TYPE_CHECKING:
    from nanguard.ckpt import Inspection, Verdict

AUDIT_PRECEDENCE: tuple[ExitCode, ...] = (ExitCode.BAD_INPUT, ExitCode.UNSAFE, ExitCode.DIRTY, ExitCode.OK)
"""Exit status of ``audit`` when checkpoints disagree: the first that applies wins (unreadable, then unsafe,
then dirty, else clean)."""

_STATUS_CODES = {"unreadable": ExitCode.BAD_INPUT, "unsafe": ExitCode.UNSAFE, "dirty": ExitCode.DIRTY}

CheckpointPaths = Annotated[
    list[Path],
    typer.Argument(help="Checkpoint files or folders; a folder means every checkpoint in it.", show_default=False,
                   callback=checkpoint_arg),
]
RecordDir = Annotated[
    Path | None,
    typer.Option(
        "--record",
        metavar="RUN_DIR",
        help="Store each verdict in RUN_DIR's journal (created when missing) and mark tainted checkpoints.",
        show_default=False,
        callback=folder_arg,
    ),
]


@app.command()
def audit(paths: CheckpointPaths, as_json: JsonFlag = False, record: RecordDir = None) -> None:
    """Audit checkpoints without running code from them: NaN/Inf, scrubbed weights, unsafe pickles.

    One line per checkpoint: status, path, format, epoch, then the findings, the calls that make it unsafe, or
    the error; a note names classes outside the load allowlist (clean or dirty still; loading needs --trust).

    For more than one checkpoint, a summary line follows. With --record, "tainted" marks suspect ones.

    Exit status, worst wins: 2 if any is unreadable, else 3 if any is unsafe, else 1 if any is dirty, else 0.

    A missing path or a folder without checkpoints exits 2 with one error line on stderr.
    """
    from nanguard.ckpt import audit_paths

    _require_paths(paths)
    verdicts = audit_paths(paths)
    rows = [_verdict_dict(verdict) for verdict in verdicts]
    if record is not None:
        journal = Journal(record)
        try:
            for verdict, row in zip(verdicts, rows, strict=True):
                stored = journal.record_checkpoint(_checkpoint_record(verdict, row))
                row.update(sha256=stored["sha256"], tainted=stored["tainted"], taint_reason=stored["taint_reason"])
        finally:
            journal.close()
    emit(rows, as_json=as_json, render=_render_verdicts)
    raise typer.Exit(int(_audit_exit_code([row["status"] for row in rows])))


@app.command()
def inspect(
    path: Annotated[Path, typer.Argument(help="One checkpoint file or folder.", show_default=False,
                                         callback=checkpoint_arg)],
    as_json: JsonFlag = False,
    load: Annotated[
        bool, typer.Option("--load", help="Also load it with its real classes (only if it calls no code and every "
                           "global is allowlisted).")
    ] = False,
    trust: Annotated[
        bool, typer.Option("--trust", help="Load it with its real classes even if it calls code or names globals "
                           "outside the allowlist. "
                           "This runs whatever the file says: only for files you trust. Implies --load.")
    ] = False,
) -> None:
    """Show one checkpoint: format, epoch/step, fitness, top-level keys, tensor count, bytes, dtypes, verdict.

    Exit status as for audit: 0 clean, 1 dirty, 2 unreadable or missing, 3 unsafe; with --load, a checkpoint
    that calls code or names classes outside the allowlist is not loaded ("refused", naming them) and exits 3.
    """
    from nanguard.ckpt import UnsafeCheckpoint, inspect_checkpoint, load_checkpoint

    _require_paths([path])
    inspection = inspect_checkpoint(path)
    data = _inspection_dict(inspection)
    if (load or trust) and data["verdict"]["status"] != "unreadable":
        # load_checkpoint refuses (require_loadable) unless the file calls no code and every global is
        # allowlisted, or --trust was given; when it refuses, nothing from the file has run.
        try:
            loaded = load_checkpoint(path, trust=trust)
            data["loaded"] = {"type": type(loaded).__name__, "trusted": trust}
        except UnsafeCheckpoint as err:
            data["loaded"] = {"refused": str(err).removeprefix(f"{path}: ")}
    emit(data, as_json=as_json, render=_render_inspection)
    statuses = [data["verdict"]["status"], *(["unsafe"] if "refused" in data.get("loaded", {}) else [])]
    raise typer.Exit(int(_audit_exit_code(statuses)))


def _audit_exit_code(statuses: Iterable[str]) -> ExitCode:
    """The worst status's exit code, in :data:`AUDIT_PRECEDENCE` order."""
    codes = {_STATUS_CODES.get(status, ExitCode.OK) for status in statuses}
    return next((code for code in AUDIT_PRECEDENCE if code in codes), ExitCode.OK)


def _require_paths(paths: Iterable[Path]) -> None:
    """Fail with one line (BAD_INPUT) for a path that does not exist, before anything is audited."""
    for path in paths:
        if not path.exists():
            raise UnreadableCheckpoint(f"{path}: no such file or folder")


def _verdict_dict(verdict: Verdict) -> dict[str, Any]:
    return {
        "path": str(verdict.path),
        "status": verdict.status.value,
        "format": None if verdict.format is None else verdict.format.value,
        "epoch": verdict.epoch,
        "step": verdict.step,
        "fitness": verdict.fitness,
        "findings": [
            {
                "location": finding.location,
                "kind": finding.kind.value,
                "count": finding.count,
                "first_index": list(finding.first_index),
                "area": finding.area.value,
                "numel": finding.numel,
            }
            for finding in verdict.findings
        ],
        "unsafe_globals": list(verdict.unsafe_globals),
        "unlisted_globals": list(verdict.unlisted_globals),
        "content": None if verdict.content is None else verdict.content.value,
        "error": verdict.error,
    }


def _checkpoint_record(verdict: Verdict, row: dict[str, Any]) -> CheckpointRecord:
    digest = file_digest(verdict.path)
    sha256, size, mtime = digest if digest is not None else (None, None, None)
    epoch = verdict.epoch
    return CheckpointRecord(
        path=str(verdict.path.resolve()), status=row["status"], sha256=sha256, size=size, format=row["format"],
        epoch=None if epoch is None else float(epoch), step=verdict.step, findings=row["findings"], mtime=mtime,
    )


def _inspection_dict(inspection: Inspection) -> dict[str, Any]:
    return {
        "verdict": _verdict_dict(inspection.verdict),
        "top_keys": list(inspection.top_keys),
        "tensor_count": inspection.tensor_count,
        "tensor_bytes": inspection.tensor_bytes,
        "dtypes": dict(inspection.dtypes),
    }


def _verdict_line(row: dict[str, Any]) -> Text:
    status = row["status"]
    line = Text(f"{status:<10}", style=STATUS_STYLES.get(status, ""))
    line.append(f" {row['path']}")
    if row.get("tainted"):
        line.append("  tainted", style="bold red")
        line.append(f" ({row['taint_reason']})")
    if row["format"] is not None:
        line.append(f"  {row['format']}")
    if row["epoch"] is not None:
        line.append(f"  epoch {row['epoch']}")
    if status == "dirty":
        findings = [f"{f['location']}: {f['kind']} x{f['count']}" for f in row["findings"]]
        line.append("  " + abbreviate(findings))
    elif status == "unsafe":
        line.append("  calls code: " + abbreviate(row["unsafe_globals"]) + f"  (content {row['content']})")
    elif status == "unreadable":
        error = " ".join(str(row["error"]).splitlines())
        line.append(f"  {error.removeprefix(row['path'] + ': ')}")
    unlisted = [g for g in row.get("unlisted_globals", []) if g not in row["unsafe_globals"]]
    if unlisted:  # not a verdict: a note that loading with real classes would import them
        line.append("  classes outside the load allowlist: " + abbreviate(unlisted) + "; loading needs --trust")
    return line


def _render_verdicts(rows: list[dict[str, Any]]) -> Iterable[RenderableType]:
    """One line per checkpoint, then (for more than one) a count per status and of tainted ones."""
    for row in rows:
        yield _verdict_line(row)
    if len(rows) > 1:
        counts = Counter(row["status"] for row in rows)
        summary = f"{len(rows)} checkpoints; " + ", ".join(
            f"{status} {counts[status]}" for status in ("clean", "dirty", "unsafe", "unreadable") if counts[status]
        )
        tainted = sum(1 for row in rows if row.get("tainted"))
        yield Text(summary + (f"; tainted {tainted}" if tainted else ""))


def _render_inspection(data: dict[str, Any]) -> Iterable[RenderableType]:
    verdict = data["verdict"]
    yield _verdict_line(verdict)
    if verdict["status"] == "unreadable":
        return
    fields = {
        "format": verdict["format"],
        "epoch": verdict["epoch"],
        "step": verdict["step"],
        "fitness": verdict["fitness"],
        "top-level keys": ", ".join(data["top_keys"]) or None,
        "tensors": data["tensor_count"],
        "tensor bytes": data["tensor_bytes"],
        "dtypes": ", ".join(f"{name} {count}" for name, count in sorted(data["dtypes"].items())) or None,
    }
    if "loaded" in data and "refused" in data["loaded"]:
        fields["loaded"] = "refused: " + data["loaded"]["refused"]
    elif "loaded" in data:
        how = "with --trust" if data["loaded"]["trusted"] else "every global allowlisted"
        fields["loaded"] = f"yes, with its real classes ({how}): {data['loaded']['type']}"
    for name, value in fields.items():
        yield Text(f"{name + ':':<16}{'-' if value is None else value}")
