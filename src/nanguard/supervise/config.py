"""config.py owns what one ``nanguard run`` is told: :class:`SupervisorConfig`, its checks, the resume command's
placeholders, and the two errors the supervisor raises on purpose.

The trigger thresholds, the grace period, the restart budget and the back-off come from the ``supervise_*``
fields of :class:`nanguard.policy.Policy` (:meth:`SupervisorConfig.from_policy`); command-line options
override them one to one. Nothing here starts a process or touches the run folder.
"""

from __future__ import annotations

import math
import shlex
import shutil
import string
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from nanguard.errors import ExitCode, NanguardError

if TYPE_CHECKING:
    from nanguard.policy import Policy

PLACEHOLDERS = ("run_dir", "last", "checkpoint")
"""Names a resume command may use in braces: ``{run_dir}`` (the run folder, absolute), ``{last}``
(``{run_dir}/weights/last.pt``, Ultralytics' resume file) and ``{checkpoint}`` (the checkpoint rolled back to:
the Ultralytics rollback's target, or the newest clean checkpoint in ``--checkpoint-dir``)."""


class SupervisorInputError(NanguardError):
    """``nanguard run`` was given something it cannot use: no command, an unknown placeholder, a bad value."""


class RestartBudgetSpent(NanguardError):
    """The command failed (or was stopped by a trigger) after the restart budget was spent."""

    exit_code = ExitCode.STOPPED


@dataclass(frozen=True, kw_only=True, slots=True)
class SupervisorConfig:
    """One supervised training: the command, where its run folder is, and when to step in."""

    command: tuple[str, ...]
    """The training command and its arguments, run as given (no shell)."""
    run_dir: Path
    """The run folder: holds ``.nanguard/`` (log, status file, PID file, journal); for Ultralytics, the folder
    with ``weights/`` and ``results.csv``."""
    resume_command: str | None = None
    """The command a restart runs (shell-like quoting, placeholders in braces); ``None``: Ultralytics' own
    resume command after an Ultralytics rollback, else the original command."""
    checkpoint_dir: Path | None = None
    """A folder of checkpoints of another framework: its newest clean one becomes ``{checkpoint}``."""
    nan_lines: int = 3
    """Consecutive progress lines with a non-finite loss that stop the command."""
    stall_seconds: float = 1800.0
    """Seconds without any output that stop the command."""
    grace_seconds: float = 30.0
    """Seconds between SIGTERM to the command's process group and SIGKILL."""
    max_restarts: int = 3
    """Restarts allowed; a trigger after the last one ends the supervisor with exit 4."""
    backoff_seconds: float = 5.0
    """Wait before the first restart; each further restart waits twice as long as the one before ..."""
    backoff_max_seconds: float = 300.0
    """... but never longer than this."""
    lr_scale: float | None = None
    """Multiply ``lr0`` in the rolled-back Ultralytics ``last.pt`` by this factor; ``None`` keeps it."""
    run_dir_given: bool = True
    """Whether the user named the run folder (``{run_dir}``/``{last}`` need it)."""
    extra: dict[str, Any] = field(default_factory=dict)
    """Free-form facts recorded with ``supervisor_start`` (e.g. the policy file's path)."""

    def __post_init__(self) -> None:
        if not self.command:
            raise SupervisorInputError("no command to run: put the training command after --, e.g. "
                                       "nanguard run --run-dir runs/detect/train -- yolo train ...")
        _require(isinstance(self.nan_lines, int) and not isinstance(self.nan_lines, bool) and self.nan_lines >= 1,
                 "--nan-lines", self.nan_lines, "an integer >= 1")
        _require(isinstance(self.max_restarts, int) and not isinstance(self.max_restarts, bool)
                 and self.max_restarts >= 0, "--max-restarts", self.max_restarts, "an integer >= 0")
        _require(_number(self.stall_seconds) and self.stall_seconds > 0, "--stall-minutes", self.stall_seconds,
                 "a positive number")
        for name, value in (("--grace", self.grace_seconds), ("--backoff", self.backoff_seconds),
                            ("backoff_max_seconds", self.backoff_max_seconds)):
            _require(_number(value) and value >= 0, name, value, "a number >= 0")
        if self.lr_scale is not None:
            _require(_number(self.lr_scale) and self.lr_scale > 0, "--lr-scale", self.lr_scale, "a positive number")
        if self.run_dir.exists() and not self.run_dir.is_dir():
            raise SupervisorInputError(f"--run-dir {self.run_dir}: not a folder")
        if self.checkpoint_dir is not None and self.checkpoint_dir.exists() and not self.checkpoint_dir.is_dir():
            raise SupervisorInputError(f"--checkpoint-dir {self.checkpoint_dir}: not a folder")
        if self.resume_command is not None:
            used = resume_placeholders(self.resume_command)
            if not self.run_dir_given and used & {"run_dir", "last"}:
                names = ", ".join("{" + name + "}" for name in sorted(used & {"run_dir", "last"}))
                raise SupervisorInputError(f"--resume-cmd uses {names} but no --run-dir names the run folder to "
                                           "resume; pass --run-dir DIR")
        _require_executable(self.command[0])

    @classmethod
    def from_policy(cls, policy: Policy, **values: Any) -> SupervisorConfig:
        """A config with the policy's ``supervise_*`` values; keyword arguments (not ``None``) override them."""
        base: dict[str, Any] = {
            "nan_lines": policy.supervise_nan_lines,
            "stall_seconds": policy.supervise_stall_minutes * 60.0,
            "grace_seconds": policy.supervise_grace_seconds,
            "max_restarts": policy.supervise_max_restarts,
            "backoff_seconds": policy.supervise_backoff_seconds,
            "backoff_max_seconds": policy.supervise_backoff_max_seconds,
            "lr_scale": policy.supervise_lr_scale,
        }
        base.update({key: value for key, value in values.items() if value is not None})
        return cls(**base)

    @property
    def state_dir(self) -> Path:
        """``<run_dir>/.nanguard``: the journal, the status file, the PID file and the log folder."""
        from nanguard.journal import JOURNAL_DIR

        return self.run_dir / JOURNAL_DIR

    def backoff_for(self, restart: int) -> float:
        """Seconds to wait before restart number ``restart`` (1-based): exponential, capped."""
        return min(self.backoff_seconds * 2.0 ** (restart - 1), max(self.backoff_max_seconds, self.backoff_seconds))

    def to_dict(self) -> dict[str, Any]:
        """The config as plain values (for the journal's ``runs.policy`` and ``supervisor_start``)."""
        return {
            "command": list(self.command), "run_dir": str(self.run_dir), "resume_command": self.resume_command,
            "checkpoint_dir": None if self.checkpoint_dir is None else str(self.checkpoint_dir),
            "nan_lines": self.nan_lines, "stall_seconds": self.stall_seconds, "grace_seconds": self.grace_seconds,
            "max_restarts": self.max_restarts, "backoff_seconds": self.backoff_seconds,
            "backoff_max_seconds": self.backoff_max_seconds, "lr_scale": self.lr_scale, **self.extra,
        }


def resume_placeholders(template: str) -> set[str]:
    """The placeholder names ``template`` uses; raises :class:`SupervisorInputError` on an unknown one or bad
    quoting."""
    used: set[str] = set()
    try:
        tokens = shlex.split(template)
        for token in tokens:
            for _, name, spec, conversion in string.Formatter().parse(token):
                if name is None:
                    continue
                if name not in PLACEHOLDERS or spec or conversion:
                    known = ", ".join("{" + p + "}" for p in PLACEHOLDERS)
                    raise SupervisorInputError(f"--resume-cmd {template!r}: unknown placeholder {{{name}}} (known: "
                                               f"{known}; write {{{{ and }}}} for literal braces)")
                used.add(name)
    except ValueError as err:  # shlex (no closing quotation) and str.format (single brace) both raise it
        raise SupervisorInputError(f"--resume-cmd {template!r}: {err}") from None
    if not tokens:
        raise SupervisorInputError("--resume-cmd is empty")
    return used


def format_resume(template: str, values: dict[str, str]) -> list[str]:
    """``template`` split like a shell would and each word's placeholders filled in (a path with spaces stays
    one argument)."""
    return [token.format_map(values) for token in shlex.split(template)]


def _require(ok: bool, name: str, value: object, wanted: str) -> None:
    if not ok:
        raise SupervisorInputError(f"{name} must be {wanted}, got {value!r}")


def _number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _require_executable(program: str) -> None:
    # Found now, not at the first restart hours later: a typo in the command is bad input (exit 2).
    if shutil.which(program) is None:
        where = "not an executable file" if "/" in program else "not found on PATH"
        raise SupervisorInputError(f"{program}: {where}")
