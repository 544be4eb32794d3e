"""supervise_command.py owns ``nanguard run``: a training command supervised from outside.

A thin shell over :mod:`nanguard.supervise`: it splits the arguments at ``--`` (everything after it is the
training command, untouched by option parsing), builds a :class:`~nanguard.supervise.SupervisorConfig` from
the policy and the options, runs the :class:`~nanguard.supervise.Supervisor`, and turns its outcome into the
exit status. The command's own output goes to stdout as it comes; the supervisor's messages go to stderr.
"""

from __future__ import annotations

import contextlib
import logging
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any

import typer
from typer.core import TyperCommand

from nanguard.cli import app
from nanguard.cli.params import file_arg, folder_arg

_COMMAND_KEY = "nanguard.run.command"


class _SupervisedCommand(TyperCommand):
    """Takes the words after the first ``--`` away before click parses the options: they are the training
    command's, and options like ``--epochs`` there must not be read as ``nanguard run``'s."""

    # ctx is a click Context; Typer vendors click, so no public type names it across versions.
    def parse_args(self, ctx: Any, args: list[str]) -> list[str]:
        if "--" in args:
            cut = args.index("--")
            ctx.meta[_COMMAND_KEY] = args[cut + 1 :]
            args = args[:cut]
        return list(super().parse_args(ctx, args))


@app.command(
    name="run", cls=_SupervisedCommand, options_metavar="[OPTIONS] -- CMD [ARGS]...",
    context_settings={"allow_extra_args": True, "ignore_unknown_options": True},
)
def run(
    ctx: typer.Context,
    run_dir: Annotated[
        Path | None,
        typer.Option("--run-dir", metavar="DIR", help="The run folder; .nanguard/ (log, supervisor.json, "
                     "supervisor.pid, journal) goes there. For Ultralytics: the folder with weights/ (pass "
                     "project=/name=/exist_ok=True to match it). Default: the current folder.", show_default=False,
                     callback=folder_arg),
    ] = None,
    resume_cmd: Annotated[
        str | None,
        typer.Option("--resume-cmd", metavar="CMD", help="What a restart runs, quoted as one string; "
                     "{run_dir}, {last} (DIR/weights/last.pt) and {checkpoint} are filled in. Default: "
                     "'yolo train resume model={last}' after an Ultralytics rollback, else CMD again.",
                     show_default=False),
    ] = None,
    checkpoint_dir: Annotated[
        Path | None,
        typer.Option("--checkpoint-dir", metavar="DIR", help="Another framework's checkpoint folder: its newest "
                     "clean checkpoint becomes {checkpoint} (nothing in it is changed).", show_default=False,
                     callback=folder_arg),
    ] = None,
    policy: Annotated[
        Path | None,
        typer.Option("--policy", metavar="FILE", help="Policy file (nanguard.toml, or pyproject.toml with "
                     "\\[tool.nanguard]) for the supervise_* values. Default: the one in the current folder.",
                     show_default=False, callback=file_arg),
    ] = None,
    nan_lines: Annotated[
        int | None, typer.Option("--nan-lines", metavar="N", help="Stop after N consecutive progress lines "
                                 "with a non-finite loss (policy: supervise_nan_lines, 3).", show_default=False),
    ] = None,
    stall_minutes: Annotated[
        float | None, typer.Option("--stall-minutes", metavar="T", help="Stop after T minutes without output; "
                                   "fractions allowed (policy: supervise_stall_minutes, 30).", show_default=False),
    ] = None,
    grace: Annotated[
        float | None, typer.Option("--grace", metavar="SECONDS", help="Between SIGTERM and SIGKILL (policy: "
                                   "supervise_grace_seconds, 30).", show_default=False),
    ] = None,
    max_restarts: Annotated[
        int | None, typer.Option("--max-restarts", metavar="N", help="Restart budget (policy: "
                                 "supervise_max_restarts, 3).", show_default=False),
    ] = None,
    backoff: Annotated[
        float | None, typer.Option("--backoff", metavar="SECONDS", help="Wait before the first restart, doubled "
                                   "for each further one (policy: supervise_backoff_seconds, 5).",
                                   show_default=False),
    ] = None,
    lr_scale: Annotated[
        float | None, typer.Option("--lr-scale", metavar="F", help="Multiply lr0 in the rolled-back Ultralytics "
                                   "last.pt by F (policy: supervise_lr_scale).", show_default=False),
    ] = None,
) -> None:
    """Run a training command and keep it healthy from outside: nanguard run [OPTIONS] -- CMD [ARGS]...

    Example: nanguard run --run-dir runs/detect/a -- yolo train data=coco8.yaml project=runs/detect name=a exist_ok=True save_period=1

    Starts CMD in a process group of its own, tees its output to DIR/.nanguard/supervisor/train.log and stdout, and scans it. On NaN in N consecutive progress lines, a failed exit, or no output for T minutes, it ends the group (SIGTERM, grace, SIGKILL), rolls the run back on disk to its newest clean checkpoint, and restarts with the resume command, with exponential back-off, up to the restart budget. State: DIR/.nanguard/supervisor.json; journal actions supervisor_*.

    Exit status: 0 the command finished (exit 0); 2 no command after --, a bad option or policy file, a program that cannot be found; 4 the restart budget was spent; 5 another nanguard run supervises DIR (or a rollback holds its lock); 130 / 143 stopped by SIGINT / SIGTERM (forwarded to the command first).
    """  # noqa: E501
    from nanguard.supervise import RestartBudgetSpent, State, Supervisor, SupervisorConfig, SupervisorInputError

    command = ctx.meta.get(_COMMAND_KEY)
    if command is None:
        extra = f" (got {' '.join(ctx.args)!r})" if ctx.args else ""
        raise SupervisorInputError(f"put the training command after --{extra}: nanguard run [OPTIONS] -- CMD "
                                   "[ARGS]...")
    values: dict[str, Any] = dict(
        command=tuple(command), run_dir=(run_dir or Path.cwd()).absolute(),
        run_dir_given=run_dir is not None, resume_command=resume_cmd,
        checkpoint_dir=None if checkpoint_dir is None else checkpoint_dir.absolute(),
        nan_lines=nan_lines, stall_seconds=None if stall_minutes is None else stall_minutes * 60.0,
        grace_seconds=grace, max_restarts=max_restarts, backoff_seconds=backoff, lr_scale=lr_scale,
        extra={"policy_file": None if policy is None else str(policy)},
    )
    # Policy imports torch (seconds, hundreds of MB for a process that may live for days); the supervisor needs
    # it only to roll back. Without a policy file the defaults are SupervisorConfig's own, equal to Policy's.
    if policy is not None or any((Path.cwd() / name).is_file() for name in ("nanguard.toml", "pyproject.toml")):
        from nanguard.policy import Policy

        resolved = Policy.from_file(policy) if policy is not None else Policy.discover(Path.cwd())
        config = SupervisorConfig.from_policy(resolved, **values)
    else:
        config = SupervisorConfig(**{key: value for key, value in values.items() if value is not None})
    with _messages_to_stderr():
        outcome = Supervisor(config, sink=sys.stdout.buffer).run()
    if outcome.state is State.FAILED:
        raise RestartBudgetSpent(outcome.message)
    if outcome.exit_code != 0:
        raise typer.Exit(outcome.exit_code)


@contextlib.contextmanager
def _messages_to_stderr() -> Iterator[None]:
    """The supervisor's messages, one per line on stderr prefixed ``nanguard run:``, while the command runs."""
    logger = logging.getLogger("nanguard.supervise")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("nanguard run: %(message)s"))
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
