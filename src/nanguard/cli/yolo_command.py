"""yolo_command.py owns ``nanguard yolo``: an Ultralytics training run under the guard, and its summary.

It parses ``yolo``'s own arguments with Ultralytics' helpers (:func:`_yolo_model`), builds the model, attaches
:func:`nanguard.integrations.ultralytics.guard` with the resolved policy, trains, and prints what the guard
did. Ultralytics and torch are imported inside the command only. Only the train mode is accepted: the other
modes and ``yolo``'s special commands are refused with :class:`YoloArgumentError`.

The guarding itself (hooks, checkpoint audits, the journal) is the integration's; this module renders.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import RenderableType
from rich.text import Text

from nanguard.cli import app
from nanguard.cli.output import emit, format_counts
from nanguard.cli.params import file_arg
from nanguard.errors import NanguardError

if TYPE_CHECKING:
    from nanguard.errors import TrainingStopped
    from nanguard.integrations.ultralytics import UltralyticsGuard

YOLO_SPECIAL_COMMANDS = frozenset({"checks", "version", "settings", "cfg", "login", "logout", "copy-cfg", "solutions",
                                   "help"})
"""Ultralytics' ``yolo`` commands that are not a mode: ``nanguard yolo`` refuses them (they train nothing)."""


class YoloArgumentError(NanguardError):
    """``nanguard yolo`` was given arguments Ultralytics' ``yolo`` would reject, or a mode it does not guard."""


class UltralyticsFailed(NanguardError):
    """Ultralytics raised while building the model or training (a missing dataset, a checkpoint that is no
    Ultralytics model, a crash mid-training): its message in one line, exit code ``BAD_INPUT``; ``--debug``
    shows the traceback. Ultralytics has already printed its own log above it."""


def ultralytics_failure(err: Exception, during: str) -> UltralyticsFailed:
    """The one-line error for an exception Ultralytics raised ``during`` a phase ("setup", "training")."""
    text = " ".join(str(err).split()) or type(err).__name__
    return UltralyticsFailed(f"Ultralytics failed during {during}: {type(err).__name__}: {text[:400]}")


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True},
             options_metavar="[--policy FILE] [TASK] MODE key=value ...", no_args_is_help=True)
def yolo(
    ctx: typer.Context,
    policy: Annotated[
        Path | None,
        typer.Option("--policy", metavar="FILE", help="The guard's policy (nanguard.toml, or pyproject.toml with "
                     "\\[tool.nanguard]). Default: the one in the current folder, else the defaults. Ultralytics' "
                     "clip at 10.0 is kept when the policy leaves max_grad_norm unset.", show_default=False,
                     callback=file_arg),
    ] = None,
    trust: Annotated[
        bool,
        typer.Option("--trust", help="Hand Ultralytics checkpoints that name classes outside the load allowlist, or "
                     "that call code (it runs). Only for files you trust."),
    ] = False,
) -> None:
    """Run an Ultralytics training, guarded: [TASK] MODE key=value ..., exactly the arguments of `yolo`.

    Example: nanguard yolo detect train data=coco8.yaml model=yolo11n.yaml epochs=3 imgsz=64

    The arguments are parsed by Ultralytics' own parser; only the train mode is accepted (the guard has nothing to watch in val, predict, export, track or benchmark: run those with yolo itself).

    At the end it prints the guard's summary and where the journal is (<save_dir>/.nanguard/journal.db).

    Every checkpoint Ultralytics would unpickle (model=, pretrained=, distill_model=, resume= a path or the last.pt a bare resume finds) is audited first, like inspect --load: one that calls code, or names classes outside the load allowlist (without --trust), is refused before anything loads.

    Exit status: 0 training finished; 2 an unknown key, a bad value, a mode other than train, a bad policy file, an unreadable or remote checkpoint, or Ultralytics itself failed (a missing dataset, a crash; its message in one line); 3 an unsafe checkpoint, or one with classes outside the allowlist without --trust; 4 the guard stopped training (its report is printed).
    """  # noqa: E501
    from nanguard.errors import TrainingStopped
    from nanguard.integrations.ultralytics import ULTRALYTICS_CLIP_NORM, guard
    from nanguard.policy import Policy

    resolved = Policy.from_file(policy) if policy is not None else Policy.discover(Path.cwd())
    if resolved.max_grad_norm is None:
        resolved = dataclasses.replace(resolved, max_grad_norm=ULTRALYTICS_CLIP_NORM)
    try:
        model, overrides = _yolo_model(list(ctx.args), trust=trust)
    except NanguardError:
        raise
    except Exception as err:  # Ultralytics' own refusal (a checkpoint that is no YOLO model...): one line
        raise ultralytics_failure(err, "setup") from err
    guarded = guard(model, policy=resolved)
    try:
        model.train(**overrides)
    except TrainingStopped as err:
        emit(_yolo_summary(guarded, stopped=err), as_json=False, render=_render_yolo)
        raise
    except NanguardError:
        raise
    except Exception as err:  # a missing dataset, a crash mid-training: the journal keeps what happened
        raise ultralytics_failure(err, "training" if guarded.results else "setup") from err
    emit(_yolo_summary(guarded, stopped=None), as_json=False, render=_render_yolo)


def _yolo_model(args: list[str], *, trust: bool = False) -> tuple[Any, dict[str, Any]]:
    """Parse ``yolo``'s arguments as Ultralytics' ``entrypoint`` does (its own helpers; its warnings for a
    missing model or data), audit every checkpoint it would load, and build the model; returns it with the
    keyword arguments for ``model.train``.

    Raises :class:`YoloArgumentError` (one line) where ``yolo`` would raise, and for any mode but train;
    :class:`~nanguard.errors.UnsafeCheckpoint` / :class:`~nanguard.errors.UnreadableCheckpoint` from
    :func:`nanguard.ckpt.require_loadable` before Ultralytics sees a file.
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
    from nanguard.ckpt import require_loadable
    from nanguard.integrations.ultralytics import checkpoints_to_load

    for path in checkpoints_to_load(overrides):  # before YOLO(...) or train unpickles any of them
        require_loadable(path, trust)
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
    steps = f"{data['steps']}" + (" (" + format_counts(Counter(data["actions"])) + ")" if data["actions"] else "")
    audited = sum(data["checkpoints"].values())
    checkpoints = f"{audited} audited" + ("; " + format_counts(Counter(data["checkpoints"])) if audited else "")
    fields = {"run": data["save_dir"], "steps": steps, "incidents": str(data["incidents"]),
              "checkpoints": checkpoints, "journal": data["journal"]}
    for name, value in fields.items():
        yield Text(f"  {name + ':':<14}{value}")
    yield Text(f"see the incidents with: nanguard incidents {data['save_dir']}")
