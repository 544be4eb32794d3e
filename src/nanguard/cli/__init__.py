"""The ``nanguard`` command: the Typer app, its root options, the shared options and the one error handler.

This package computes nothing itself. Each command is a few lines in its own module: call one library
function, hand the result to :func:`~nanguard.cli.output.emit`, the one place output reaches stdout (JSON
when ``--json`` is given, Rich renderables otherwise). Every :class:`~nanguard.errors.NanguardError`, and every
``OSError`` that names a file, becomes one line on stderr and the error's :class:`~nanguard.errors.ExitCode` in
:meth:`_RootGroup.invoke`, the one error handler; ``--debug`` adds the traceback.

This module owns the ``app``, ``--version``/``--debug``, :data:`EXIT_CODE_MEANINGS`, the shared ``Annotated``
aliases (``RunDir``, ``JsonFlag``) and :func:`main`. The commands live in:

- ``journal_commands.py``: ``incidents``;
- ``log_commands.py``: ``scan-log``;
- ``checkpoint_commands.py``: ``audit``, ``inspect``;
- ``run_commands.py``: ``rollback``, ``undo``;
- ``yolo_command.py``: ``yolo``;
- ``report_commands.py``: ``status``, ``report``, ``plan``;
- ``supervise_command.py``: ``run`` (a training command supervised from outside);
- ``output.py``: printing (:func:`~nanguard.cli.output.emit`) and the table cells commands share.

``nanguard --help`` and the journal commands never import torch: the package imports only the journal and
errors modules at load time, and a command that needs torch (audit, rollback, ...) imports it inside its body.

Adding a command: put it in a module that takes ``app`` from here, reuse the shared aliases, call the
library, pass the result with a ``_render_*`` function to ``emit``, and import the module at the bottom of
this file (the order of those imports is the order of ``--help``).
"""

from __future__ import annotations

import traceback
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer
from typer.core import TyperGroup

from nanguard import __version__
from nanguard.cli.params import folder_arg
from nanguard.errors import ExitCode, NanguardError

EXIT_CODE_MEANINGS: dict[ExitCode, str] = {
    ExitCode.OK: "success; for audit, every checkpoint is clean",
    ExitCode.DIRTY: ("non-finite values found: a checkpoint holds non-finite or scrubbed values (audit), "
                     "a log shows NaN/Inf (scan-log)"),
    ExitCode.BAD_INPUT: "a missing or unreadable file or journal, a bad policy file, a bad option",
    ExitCode.UNSAFE: ("unsafe: a checkpoint's pickle calls code, or loading it needs classes outside the allowlist "
                      "(without --trust)"),
    ExitCode.STOPPED: "stopped: the guard reached the policy's escalation limits; for run, the restart budget is spent",
    ExitCode.LOCKED: "another nanguard process holds the run's lock (.nanguard/lock); nothing was changed",
}
"""What each exit status means, for ``--help`` and docs/cli.md (a test keeps all three in step)."""


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


app: typer.Typer = typer.Typer(
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
    typer.Argument(help="A training run's folder, the one that holds .nanguard/journal.db.", show_default=False,
                   callback=folder_arg),
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


def main() -> None:
    """Entry point of the ``nanguard`` console script and of ``python -m nanguard``."""
    app()


# Importing a command module registers its commands on ``app``; this comes last because those modules
# import ``app`` and the aliases above. The order here is the order of ``nanguard --help``, so isort
# must not sort it.
# isort: off
from nanguard.cli.journal_commands import incidents  # noqa: E402
from nanguard.cli.log_commands import scan_log  # noqa: E402
from nanguard.cli.checkpoint_commands import (  # noqa: E402
    AUDIT_PRECEDENCE,
    CheckpointPaths,
    RecordDir,
    audit,
    inspect,
)
from nanguard.cli.run_commands import YoloRunDir, rollback, undo  # noqa: E402
from nanguard.cli.yolo_command import YOLO_SPECIAL_COMMANDS, YoloArgumentError, yolo  # noqa: E402
from nanguard.cli.supervise_command import run  # noqa: E402
from nanguard.cli.report_commands import plan, report, status  # noqa: E402
from nanguard.cli.output import LIST_CELL_ITEMS, PIPE_WIDTH  # noqa: E402
# isort: on

__all__ = [
    "AUDIT_PRECEDENCE",
    "EXIT_CODE_MEANINGS",
    "LIST_CELL_ITEMS",
    "PIPE_WIDTH",
    "YOLO_SPECIAL_COMMANDS",
    "CheckpointPaths",
    "JsonFlag",
    "RecordDir",
    "RunDir",
    "YoloArgumentError",
    "YoloRunDir",
    "app",
    "audit",
    "incidents",
    "inspect",
    "main",
    "plan",
    "report",
    "rollback",
    "run",
    "scan_log",
    "status",
    "undo",
    "yolo",
]
