"""restart.py owns what happens on disk between a stopped attempt and the next: the audit, the rollback, and the
command the restart runs.

Three cases, in this order:

- ``--checkpoint-dir`` (any framework): every checkpoint in it is audited (:func:`nanguard.ckpt.audit`, no
  code run from the files) and the newest clean one becomes ``{checkpoint}``. Nothing in the folder is
  changed: the resume command must be told which checkpoint to load.
- an Ultralytics run (``<run>/weights`` exists): :func:`nanguard.runs.plan_rollback` with ``latest-clean``,
  then :func:`nanguard.runs.apply_rollback` under the run lock the supervisor holds (it backs up, rewrites
  ``last.pt``, trims results.csv and records ``disk_rollback``, all or nothing). The restart runs
  ``--resume-cmd``, else the plan's ``yolo train resume model=<run>/weights/last.pt``.
- neither: nothing is audited or changed; the restart runs ``--resume-cmd`` (if it does not use
  ``{checkpoint}``), else the original command.

When checkpoints were looked for but none is clean and resumable, nothing is changed and the restart runs the
original command again: resuming would load a dirty or missing checkpoint.

It does not stop or start processes (:mod:`~nanguard.supervise.supervisor` does).
"""

from __future__ import annotations

import logging
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nanguard.runs.lock import HeldLock
from nanguard.supervise.config import SupervisorConfig, format_resume, resume_placeholders

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Restart:
    """What the next attempt runs and why.

    Attributes:
        command: the command to start.
        source: where checkpoints were looked for: ``ultralytics`` (``<run>/weights``, rolled back on disk when
            a clean one was found), ``checkpoint_dir``, or ``none``.
        checkpoint: the checkpoint rolled back to or passed as ``{checkpoint}``; ``None`` when there is none.
        original: the restart runs the original command again (no resume command applies).
        detail: facts for the journal's ``supervisor_restart`` action.
    """

    command: list[str]
    source: str
    checkpoint: Path | None
    original: bool
    detail: dict[str, Any] = field(default_factory=dict)


def prepare_restart(config: SupervisorConfig, held: HeldLock | None = None) -> Restart:
    """Audit, roll back where there is something to roll back, and work out the restart's command.

    ``held``: the run lock the supervisor holds for its whole life; the rollback runs under it (None: the
    rollback takes the lock itself).

    Raises:
        RunLocked: another process holds the run lock during the Ultralytics rollback.
        RollbackRefused, UnsafeCheckpoint: the rollback was planned but could not be applied.
    """
    template = config.resume_command
    detail: dict[str, Any] = {}
    ultralytics_resume: list[str] | None = None
    if config.checkpoint_dir is not None:
        checkpoint, verdicts = newest_clean_checkpoint(config.checkpoint_dir)
        detail["audited"] = verdicts
        source = "checkpoint_dir"
    elif (config.run_dir / "weights").is_dir():
        checkpoint, ultralytics_resume, more = _ultralytics_rollback(config, held)
        detail.update(more)
        source = "ultralytics"
    else:
        checkpoint, source = None, "none"
        detail["reason"] = f"no --checkpoint-dir and no {config.run_dir / 'weights'} folder"
    looked = source != "none"
    values = {"run_dir": str(config.run_dir), "last": str(config.run_dir / "weights" / "last.pt"),
              "checkpoint": "" if checkpoint is None else str(checkpoint)}
    if checkpoint is None and looked:
        command = list(config.command)
    elif template is not None and not ("checkpoint" in resume_placeholders(template) and checkpoint is None):
        command = format_resume(template, values)
    elif template is None and ultralytics_resume is not None:
        command = ultralytics_resume
    else:
        # No resume command, or one that needs a checkpoint there is none of: run the original command.
        command = list(config.command)
    original = command == list(config.command)
    detail.update({"source": source, "checkpoint": values["checkpoint"] or None, "original_command": original,
                   "command": command})
    return Restart(command, source, checkpoint, original, detail)


def newest_clean_checkpoint(folder: Path) -> tuple[Path | None, list[dict[str, Any]]]:
    """The newest (by modification time) checkpoint in ``folder`` that audits clean, and every verdict as
    ``{"path", "status"}``; ``(None, [])`` when the folder is missing or holds no checkpoint."""
    from nanguard.ckpt import Status, audit, find_checkpoints

    if not folder.is_dir():
        return None, []
    found = sorted(find_checkpoints(folder), key=lambda path: path.stat().st_mtime, reverse=True)
    verdicts: list[dict[str, Any]] = []
    chosen: Path | None = None
    for path in found:
        verdict = audit(path)
        verdicts.append({"path": str(path), "status": verdict.status.value})
        if chosen is None and verdict.status is Status.CLEAN:
            chosen = path
    return chosen, verdicts


def _ultralytics_rollback(
    config: SupervisorConfig, held: HeldLock | None
) -> tuple[Path | None, list[str] | None, dict[str, Any]]:
    """Roll the Ultralytics run back to its newest resumable clean checkpoint; returns the target, the plan's
    resume command, and facts for the journal. ``(None, None, why)`` when there is nothing clean to resume."""
    from nanguard.runs import RollbackRefused, apply_rollback, plan_rollback

    try:
        plan = plan_rollback(config.run_dir, to="latest-clean", lr_scale=config.lr_scale)
    except RollbackRefused as err:
        # latest-clean refuses only when no checkpoint is both clean and resumable (e.g. a fault in the
        # first epoch, before any epoch was saved): there is nothing to roll back to, not an error.
        log.warning("nothing to roll back to: %s", err)
        return None, None, {"reason": str(err)}
    result = apply_rollback(plan, held=held)
    log.info("rolled back %s to %s (epoch index %d; resumes at %d); backup in %s", config.run_dir,
             plan.target.name, plan.target_epoch, plan.resume_epoch, result.backup_dir)
    return plan.target, shlex.split(plan.resume_command), {
        "target_epoch": plan.target_epoch, "resume_epoch": plan.resume_epoch, "backup": str(result.backup_dir),
        "disk_rollback_action": result.action_id, "lr_scale": plan.lr_scale,
    }
