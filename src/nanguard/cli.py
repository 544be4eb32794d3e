"""cli.py owns the ``nanguard`` command: the Typer app, its options, error-to-exit-code mapping and printing.

It computes nothing itself. Each command is a few lines: call one library function, hand the result to
:func:`_emit`, the one place output reaches stdout (JSON when ``--json`` is given, Rich renderables
otherwise). Every :class:`~nanguard.errors.NanguardError`, and every ``OSError`` that names a file, becomes
one line on stderr and the error's :class:`~nanguard.errors.ExitCode` in :meth:`_RootGroup.invoke`, the one
error handler; ``--debug`` adds the traceback.

``nanguard --help`` and the journal commands never import torch: this module imports only the journal and
errors modules at load time, and a command that needs torch (audit, run, ...) imports it inside its body.

Adding a command: reuse the shared ``Annotated`` aliases below (``RunDir``, ``JsonFlag``), call the library,
and pass the result with a ``_render_*`` function to :func:`_emit`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import traceback
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, NoReturn

import typer
from rich import box
from rich.console import Console, RenderableType
from rich.table import Table
from rich.text import Text
from typer.core import TyperGroup

from nanguard import __version__
from nanguard.errors import ExitCode, NanguardError, UnreadableCheckpoint
from nanguard.journal import CheckpointRecord, Journal, file_digest, read_incidents

if TYPE_CHECKING:
    from nanguard.ckpt import Inspection, Verdict
    from nanguard.errors import TrainingStopped
    from nanguard.integrations.ultralytics import UltralyticsGuard
    from nanguard.runs import RollbackPlan

EXIT_CODE_MEANINGS: dict[ExitCode, str] = {
    ExitCode.OK: "success; for audit, every checkpoint is clean",
    ExitCode.DIRTY: "a checkpoint holds non-finite or scrubbed values",
    ExitCode.BAD_INPUT: "a missing or unreadable file or journal, a bad policy file, a bad option",
    ExitCode.UNSAFE: "a checkpoint would run code (globals outside the allowlist)",
    ExitCode.STOPPED: "the guard stopped training: the policy's escalation limits were reached",
    ExitCode.LOCKED: "another nanguard process holds the run's lock (.nanguard/lock); nothing was changed",
}
"""What each exit status means, for ``--help`` and docs/cli.md (a test keeps all three in step)."""

PIPE_WIDTH = 1000
"""Console width when stdout is not a terminal: piped output never folds, so one incident is one line."""

LIST_CELL_ITEMS = 3
"""How many tensor names or sample ids a table cell shows before it abbreviates (``--json`` has all)."""


AUDIT_PRECEDENCE: tuple[ExitCode, ...] = (ExitCode.BAD_INPUT, ExitCode.UNSAFE, ExitCode.DIRTY, ExitCode.OK)
"""Exit status of ``audit`` when checkpoints disagree: the first that applies wins (unreadable, then unsafe,
then dirty, else clean)."""


def _exit_code_epilog() -> str:
    lines = [f"{int(code)}  {code.name}: {EXIT_CODE_MEANINGS[code]}" for code in ExitCode]
    return "Exit codes:\n\n" + "\n".join(lines)


class _RootGroup(TyperGroup):
    """The root command group. Its :meth:`invoke` is the single place errors become exit codes."""

    # ctx is a click Context; recent Typer vendors click, so no public type names it across Typer versions.
    def invoke(self, ctx: Any) -> Any:
        try:
            return super().invoke(ctx)
        except NanguardError as err:
            _fail(err, err.exit_code, str(err), debug=bool(ctx.params.get("debug")))
        except OSError as err:
            # An OSError that names a file is a bad path the library did not wrap; any other (a broken
            # pipe, a full disk) is not the user's input, so Typer's own handling gets it.
            if err.filename is None:
                raise
            message = f"{err.filename}: {err.strerror or err}"
            _fail(err, ExitCode.BAD_INPUT, message, debug=bool(ctx.params.get("debug")))


def _fail(err: BaseException, code: ExitCode, message: str, *, debug: bool) -> NoReturn:
    """Print ``message`` as one line on stderr (after the traceback with ``--debug``) and exit with ``code``."""
    if debug:
        traceback.print_exception(err)
    one_line = " ".join(message.splitlines()) or type(err).__name__
    typer.echo(f"nanguard: error: {one_line}", err=True)
    raise typer.Exit(int(code)) from None


app = typer.Typer(
    name="nanguard",
    cls=_RootGroup,
    epilog=_exit_code_epilog(),
    no_args_is_help=True,
    add_completion=False,
    rich_markup_mode="rich",
    pretty_exceptions_show_locals=False,
)

# Shared arguments and options: every command that takes one uses these aliases, so help text and
# flag names stay the same across commands.
RunDir = Annotated[
    Path,
    typer.Argument(help="A training run's folder, the one that holds .nanguard/journal.db.", show_default=False),
]
JsonFlag = Annotated[
    bool,
    typer.Option(
        "--json",
        help='Print JSON instead of a table. Non-finite numbers are written as the strings "nan", "inf", "-inf".',
    ),
]


def _print_version(value: bool) -> None:
    if value:
        typer.echo(f"nanguard {__version__}")
        raise typer.Exit(int(ExitCode.OK))


@app.callback()
def _root(
    version: Annotated[
        bool,
        typer.Option("--version", help="Print the nanguard version and exit.", callback=_print_version, is_eager=True),
    ] = False,
    debug: Annotated[bool, typer.Option("--debug", help="Show the traceback when a command fails.")] = False,
) -> None:
    """Keep long PyTorch training runs healthy: read a run's journal of NaN/Inf and spike incidents."""


@app.command()
def incidents(run_dir: RunDir, as_json: JsonFlag = False) -> None:
    """List a run's incidents: what went wrong, at which step, in which tensors, and what the guard did."""
    _emit(read_incidents(run_dir), as_json=as_json, render=_render_incidents)


CheckpointPaths = Annotated[
    list[Path],
    typer.Argument(help="Checkpoint files or folders; a folder means every checkpoint in it.", show_default=False),
]
RecordDir = Annotated[
    Path | None,
    typer.Option(
        "--record",
        metavar="RUN_DIR",
        help="Store each verdict in RUN_DIR's journal (created when missing) and mark tainted checkpoints.",
        show_default=False,
    ),
]


@app.command()
def audit(paths: CheckpointPaths, as_json: JsonFlag = False, record: RecordDir = None) -> None:
    """Audit checkpoints without running code from them: NaN/Inf, scrubbed weights, unsafe pickles.

    One line per checkpoint: status, path, format, epoch, then the findings, unsafe globals or error.

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
    _emit(rows, as_json=as_json, render=_render_verdicts)
    raise typer.Exit(int(_audit_exit_code([row["status"] for row in rows])))


@app.command()
def inspect(
    path: Annotated[Path, typer.Argument(help="One checkpoint file or folder.", show_default=False)],
    as_json: JsonFlag = False,
    load: Annotated[
        bool, typer.Option("--load", help="Also load it with its real classes (only if every global is allowlisted).")
    ] = False,
    trust: Annotated[
        bool, typer.Option("--trust", help="Load it with its real classes even with globals outside the allowlist. "
                           "This runs whatever the file says: only for files you trust. Implies --load.")
    ] = False,
) -> None:
    """Show one checkpoint: format, epoch/step, fitness, top-level keys, tensor count, bytes, dtypes, verdict.

    Exit status as for audit: 0 clean, 1 dirty, 2 unreadable or missing, 3 unsafe (with --load, an unsafe
    checkpoint is not loaded: one line naming its globals, exit 3).
    """
    from nanguard.ckpt import UnsafeCheckpoint, inspect_checkpoint, load_checkpoint

    _require_paths([path])
    inspection = inspect_checkpoint(path)
    data = _inspection_dict(inspection)
    if (load or trust) and data["verdict"]["status"] != "unreadable":
        # The safe reading above listed every global; load_checkpoint refuses unless all are allowlisted
        # or --trust was given, and then nothing from the file has run.
        try:
            loaded = load_checkpoint(path, trust=trust)
            data["loaded"] = {"type": type(loaded).__name__, "trusted": trust}
        except UnsafeCheckpoint as err:
            data["loaded"] = {"refused": f"{err}; pass --trust to load it anyway"}
    _emit(data, as_json=as_json, render=_render_inspection)
    raise typer.Exit(int(_audit_exit_code([data["verdict"]["status"]])))


YoloRunDir = Annotated[
    Path,
    typer.Argument(help="An Ultralytics run folder, the one that holds weights/ and results.csv.",
                   show_default=False),
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
        bool, typer.Option("--trust", help="When the target must be rewritten (--lr-scale, moved run), load it "
                           "even with globals outside the allowlist. Only for files you trust.")
    ] = False,
    as_json: JsonFlag = False,
) -> None:
    """Roll an Ultralytics run back on disk to a resumable clean checkpoint, then print the resume command.

    Locks the run, audits every checkpoint, and backs up last.pt, best.pt and results.csv into .nanguard/backups/.

    Then writes the target as weights/last.pt, drops the results.csv rows after its epoch, scales lr0 if asked, and records it in the journal. Undo with: nanguard undo RUN_DIR.

    Exit status: 0 done (or planned, with --dry-run); 2 no weights folder, no resumable clean checkpoint, or a target that cannot be resumed (stripped, final epoch); 1 a dirty or tainted target and 3 an unsafe one (without --force); 5 the run is locked.
    """  # noqa: E501
    from nanguard.runs import apply_rollback, plan_rollback

    plan = plan_rollback(run_dir, to=to, lr_scale=lr_scale, force=force, trust=trust)
    if dry_run:
        _emit({**plan.to_dict(), "dry_run": True}, as_json=as_json, render=lambda data: _render_rollback(data, plan))
        return
    result = apply_rollback(plan)
    _emit({**result.to_dict(), "dry_run": False}, as_json=as_json,
          render=lambda data: _render_rollback(data, plan))


@app.command()
def undo(run_dir: YoloRunDir, as_json: JsonFlag = False) -> None:
    """Undo the last rollback: restore last.pt, best.pt and results.csv from the newest backup, byte for byte.

    Exit status: 0 restored; 2 no backup left to undo (or a damaged one); 5 the run is locked.
    """
    from nanguard.runs import undo_last

    _emit(undo_last(run_dir).to_dict(), as_json=as_json, render=_render_undo)


YOLO_SPECIAL_COMMANDS = frozenset({"checks", "version", "settings", "cfg", "login", "logout", "copy-cfg", "solutions",
                                   "help"})
"""Ultralytics' ``yolo`` commands that are not a mode: ``nanguard yolo`` refuses them (they train nothing)."""


class YoloArgumentError(NanguardError):
    """``nanguard yolo`` was given arguments Ultralytics' ``yolo`` would reject, or a mode it does not guard."""


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True},
             options_metavar="[--policy FILE] [TASK] MODE key=value ...", no_args_is_help=True)
def yolo(
    ctx: typer.Context,
    policy: Annotated[
        Path | None,
        typer.Option("--policy", metavar="FILE", help="The guard's policy (nanguard.toml, or pyproject.toml with "
                     "\\[tool.nanguard]). Default: the one in the current folder, else the defaults. Ultralytics' "
                     "clip at 10.0 is kept when the policy leaves max_grad_norm unset.", show_default=False),
    ] = None,
) -> None:
    """Run an Ultralytics training, guarded: [TASK] MODE key=value ..., exactly the arguments of `yolo`.

    Example: nanguard yolo detect train data=coco8.yaml model=yolo11n.yaml epochs=3 imgsz=64

    The arguments are parsed by Ultralytics' own parser; only the train mode is accepted (the guard has nothing to watch in val, predict, export, track or benchmark: run those with yolo itself).

    At the end it prints the guard's summary and where the journal is (<save_dir>/.nanguard/journal.db).

    Exit status: 0 training finished; 2 an unknown key, a bad value, a mode other than train, a bad policy file; 4 the guard stopped training (its report is printed).
    """  # noqa: E501
    from nanguard.errors import TrainingStopped
    from nanguard.integrations.ultralytics import ULTRALYTICS_CLIP_NORM, guard
    from nanguard.policy import Policy

    resolved = Policy.from_file(policy) if policy is not None else Policy.discover(Path.cwd())
    if resolved.max_grad_norm is None:
        resolved = dataclasses.replace(resolved, max_grad_norm=ULTRALYTICS_CLIP_NORM)
    model, overrides = _yolo_model(list(ctx.args))
    guarded = guard(model, policy=resolved)
    try:
        model.train(**overrides)
    except TrainingStopped as err:
        _emit(_yolo_summary(guarded, stopped=err), as_json=False, render=_render_yolo)
        raise
    _emit(_yolo_summary(guarded, stopped=None), as_json=False, render=_render_yolo)


def _yolo_model(args: list[str]) -> tuple[Any, dict[str, Any]]:
    """Parse ``yolo``'s arguments as Ultralytics' ``entrypoint`` does (its own helpers; its warnings for a
    missing model or data) and build the model; returns it with the keyword arguments for ``model.train``.

    Raises :class:`YoloArgumentError` (one line) where ``yolo`` would raise, and for any mode but train.
    """
    import contextlib
    import logging

    from ultralytics.cfg import (
        DEFAULT_CFG,
        DEFAULT_CFG_DICT,
        MODES,
        TASK2DATA,
        TASK2MODEL,
        TASKS,
        check_cfg,
        check_dict_alignment,
        merge_equals_args,
        parse_key_value_pair,
    )
    from ultralytics.utils import LOGGER, YAML, checks

    @contextlib.contextmanager
    def no_help_message() -> Iterator[None]:
        # check_dict_alignment logs yolo's whole help text before it raises: keep the error to one line
        level = LOGGER.level
        LOGGER.setLevel(max(level, logging.WARNING))
        try:
            yield
        finally:
            LOGGER.setLevel(level)

    full_args_dict = {**DEFAULT_CFG_DICT, **dict.fromkeys((*TASKS, *MODES))}
    overrides: dict[str, Any] = {}
    try:
        with no_help_message():
            for arg in merge_equals_args(args):
                if arg.startswith("--"):
                    LOGGER.warning(f"argument '{arg}' does not require leading dashes '--', updating to '{arg[2:]}'.")
                    arg = arg[2:]
                if arg.endswith(","):
                    LOGGER.warning(f"argument '{arg}' does not require trailing comma ',', updating to '{arg[:-1]}'.")
                    arg = arg[:-1]
                if "=" in arg:
                    try:
                        key, value = parse_key_value_pair(arg)
                    except (NameError, SyntaxError, ValueError, AssertionError) as err:
                        check_dict_alignment(full_args_dict, {arg: ""}, err)
                        raise SyntaxError(str(err) or f"'{arg}' is not a valid key=value pair") from err
                    if key == "cfg" and value is not None:  # custom.yaml replaces the defaults
                        loaded = YAML.load(checks.check_yaml(value))
                        overrides = {**{k: v for k, v in loaded.items() if k != "cfg"}, **overrides}
                    else:
                        overrides[key] = value
                elif arg in TASKS:
                    overrides["task"] = arg
                elif arg in MODES:
                    overrides["mode"] = arg
                elif arg.lower() in YOLO_SPECIAL_COMMANDS:
                    raise YoloArgumentError(f"'{arg}' is a yolo command, not a training: run 'yolo {arg}' itself")
                elif arg in DEFAULT_CFG_DICT and isinstance(DEFAULT_CFG_DICT[arg], bool):
                    overrides[arg] = True  # as yolo: a bare boolean argument is True ('yolo train resume')
                elif arg in DEFAULT_CFG_DICT:
                    raise SyntaxError(f"'{arg}' is a valid YOLO argument but is missing an '=' sign to set its "
                                      f"value, i.e. try '{arg}={DEFAULT_CFG_DICT[arg]}'")
                else:
                    check_dict_alignment(full_args_dict, {arg: ""})
            check_dict_alignment(full_args_dict, overrides)
            check_cfg(dict(overrides))  # bad types and values now, in one line, not in a traceback from train
    except (SyntaxError, TypeError, ValueError) as err:
        raise YoloArgumentError(str(err).strip() or type(err).__name__) from err

    mode = overrides.get("mode") or DEFAULT_CFG.mode or "predict"
    if "mode" not in overrides:
        LOGGER.warning(f"'mode' argument is missing. Valid modes are {list(MODES)}. Using default 'mode={mode}'.")
    if mode != "train":
        raise YoloArgumentError(f"nanguard yolo guards training only, not mode={mode}: run 'yolo {mode} ...' itself")
    task = overrides.pop("task", None)
    if task is not None:
        if task not in TASKS:
            raise YoloArgumentError(f"Invalid 'task={task}'. Valid tasks are {list(TASKS)}.")
        overrides.setdefault("model", TASK2MODEL[task])
    model_name = overrides.pop("model", DEFAULT_CFG.model)
    if model_name is None:
        model_name = "yolo26n.pt"
        LOGGER.warning(f"'model' argument is missing. Using default 'model={model_name}'.")
    overrides["model"] = model_name
    stem = Path(str(model_name)).stem.lower()
    if any(k in stem for k in ("fastsam", "sam_", "sam2_", "sam2.1_", "sam3", "mobile_sam", "yolo_nas")):
        raise YoloArgumentError(f"model={model_name} cannot be trained (Ultralytics has no train mode for it)")
    try:
        if "rtdetr" in stem:  # as yolo: guess the architecture from the name
            from ultralytics import RTDETR

            model: Any = RTDETR(model_name)
        else:
            from ultralytics import YOLO

            model = YOLO(model_name, task=task)
    except FileNotFoundError as err:
        raise YoloArgumentError(f"model={model_name}: {err}") from err
    if task is not None and task != model.task:
        LOGGER.warning(f"conflicting 'task={task}' passed with 'task={model.task}' model. "
                       f"Ignoring 'task={task}' and updating to 'task={model.task}' to match model.")
    if overrides.get("data") is None and not overrides.get("resume"):
        overrides["data"] = DEFAULT_CFG.data or TASK2DATA.get(model.task or DEFAULT_CFG.task, DEFAULT_CFG.data)
        LOGGER.warning(f"'data' argument is missing. Using default 'data={overrides['data']}'.")
    return model, overrides


def main() -> None:
    """Entry point of the ``nanguard`` console script and of ``python -m nanguard``."""
    app()


# ---- output ---------------------------------------------------------------------------------------------


def _emit(data: Any, *, as_json: bool, render: Callable[[Any], Iterable[RenderableType]]) -> None:
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


def _render_incidents(rows: list[dict[str, Any]]) -> Iterable[RenderableType]:
    """A table of incidents, one row each, then a one-line count per kind and per action."""
    if not rows:
        yield Text("no incidents")
        return
    # Narrow columns first: on an 80-column terminal the two list columns fold, the rest stays readable.
    table = Table(box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False, collapse_padding=True, header_style="bold")
    for header in ("id", "step", "epoch", "batch", "rank"):
        table.add_column(header, justify="right", overflow="fold")
    table.add_column("kind", overflow="fold")
    table.add_column("action", overflow="fold")
    table.add_column("loss", justify="right", overflow="fold")
    table.add_column("grad norm", justify="right", overflow="fold")
    table.add_column("non-finite tensors", overflow="fold", min_width=10)
    table.add_column("samples", overflow="fold", min_width=7)
    for row in rows:
        table.add_row(
            _int_cell(row["id"]),
            _int_cell(row["step"]),
            _int_cell(row["epoch"]),
            _int_cell(row["batch_index"]),
            _int_cell(row["rank"]),
            Text(row["kind"]),
            Text(row["action"]),
            _float_cell(row["loss"]),
            _float_cell(row["grad_norm"]),
            _list_cell(row["tensors"]),
            _list_cell(row["sample_ids"]),
        )
    yield table
    yield Text(_incident_summary(rows))


def _incident_summary(rows: list[dict[str, Any]]) -> str:
    kinds = Counter(row["kind"] for row in rows)
    actions = Counter(row["action"] for row in rows)
    noun = "incident" if len(rows) == 1 else "incidents"
    return f"{len(rows)} {noun}; kinds: {_counts(kinds)}; actions: {_counts(actions)}"


def _counts(counter: Counter[str]) -> str:
    return ", ".join(f"{name} {count}" for name, count in counter.most_common())


def _missing() -> Text:
    return Text("-", style="dim")


def _int_cell(value: int | None) -> Text:
    return _missing() if value is None else Text(str(value))


def _float_cell(value: float | None) -> Text:
    if value is None:
        return _missing()
    # Format spec "g" writes non-finite values as "nan", "inf", "-inf", the same words --json uses.
    return Text(f"{value:.6g}", style="" if math.isfinite(value) else "bold red")


def _list_cell(items: Sequence[Any] | None) -> Text:
    if not items:
        return _missing()
    shown = ", ".join(str(item) for item in items[:LIST_CELL_ITEMS])
    hidden = len(items) - LIST_CELL_ITEMS
    return Text(f"{shown}, … +{hidden} more" if hidden > 0 else shown)


# ---- checkpoints ----------------------------------------------------------------------------------------

_STATUS_CODES = {"unreadable": ExitCode.BAD_INPUT, "unsafe": ExitCode.UNSAFE, "dirty": ExitCode.DIRTY}
_STATUS_STYLES = {"clean": "green", "dirty": "bold red", "unsafe": "bold magenta", "unreadable": "bold yellow"}


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
    line = Text(f"{status:<10}", style=_STATUS_STYLES.get(status, ""))
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
        line.append("  " + _abbreviate(findings))
    elif status == "unsafe":
        line.append("  globals: " + _abbreviate(row["unsafe_globals"]))
    elif status == "unreadable":
        error = " ".join(str(row["error"]).splitlines())
        line.append(f"  {error.removeprefix(row['path'] + ': ')}")
    return line


def _abbreviate(items: Sequence[str]) -> str:
    hidden = len(items) - LIST_CELL_ITEMS
    shown = "; ".join(items[:LIST_CELL_ITEMS])
    return f"{shown}; … +{hidden} more" if hidden > 0 else shown


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


# ---- rollback -------------------------------------------------------------------------------------------


def _render_rollback(data: dict[str, Any], plan: RollbackPlan) -> Iterable[RenderableType]:
    """The plan (or what was done), every checkpoint's verdict, and the exact resume commands."""
    done = not data["dry_run"]
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
        line = Text(f"  {status:<10}", style=_STATUS_STYLES.get(status, ""))
        line.append(f" {candidate.path.name:<12} epoch {'-' if candidate.epoch is None else candidate.epoch:<3} ")
        line.append("usable" if candidate.usable else (candidate.problem or candidate.concern or ""))
        yield line
    yield Text("resume with:" if done else "after the rollback, resume with:")
    yield Text(f"  {data['resume_command']}")
    yield Text(f"  {data['python_command']}")
    if done:
        yield Text(f"undo with: nanguard undo {data['run_dir']}")


def _render_undo(data: dict[str, Any]) -> Iterable[RenderableType]:
    yield Text(f"restored {data['backup_dir']}", style="bold")
    for name in data["restored"]:
        yield Text(f"  restored {name}")
    for name in data["removed"]:
        yield Text(f"  removed  {name} (it did not exist before the rollback)")


# ---- yolo -----------------------------------------------------------------------------------------------


def _yolo_summary(guarded: UltralyticsGuard, *, stopped: TrainingStopped | None) -> dict[str, Any]:
    """What ``nanguard yolo`` prints at the end: steps by action, incidents, checkpoint verdicts, the journal."""
    from nanguard.journal import journal_path

    trainer = guarded.trainer
    save_dir = None if trainer is None else Path(trainer.save_dir)
    actions = Counter("pending" if r.action is None else r.action.value for r in guarded.results)
    statuses = Counter(v.status.value for v in guarded.verdicts)
    return {
        "save_dir": None if save_dir is None else str(save_dir),
        "journal": None if save_dir is None else str(journal_path(save_dir)),
        "steps": len(guarded.results),
        "actions": dict(actions),
        "incidents": 0 if guarded.guard is None else len(guarded.guard.incidents),
        "checkpoints": dict(statuses),
        "stopped": None if stopped is None else str(stopped),
        "report": [] if stopped is None else list(stopped.report),
    }


def _render_yolo(data: dict[str, Any]) -> Iterable[RenderableType]:
    if data["stopped"] is not None:
        yield Text("nanguard stopped the training", style="bold red")
        for line in data["report"]:
            yield Text(f"  {line}")
    else:
        yield Text("guarded training finished", style="bold")
    if data["save_dir"] is None:
        yield Text("  the guard was not attached: training stopped before its optimizer existed")
        return
    steps = f"{data['steps']}" + (" (" + _counts(Counter(data["actions"])) + ")" if data["actions"] else "")
    audited = sum(data["checkpoints"].values())
    checkpoints = f"{audited} audited" + ("; " + _counts(Counter(data["checkpoints"])) if audited else "")
    fields = {"run": data["save_dir"], "steps": steps, "incidents": str(data["incidents"]),
              "checkpoints": checkpoints, "journal": data["journal"]}
    for name, value in fields.items():
        yield Text(f"  {name + ':':<14}{value}")
    yield Text(f"see the incidents with: nanguard incidents {data['save_dir']}")
