"""ultralytics_disk.py plans and applies the rollback of an Ultralytics training run on disk, the procedure
users otherwise do by hand.

A run folder (``runs/detect/train``) holds ``weights/last.pt``, ``best.pt``, ``epochN.pt`` (with
``save_period``) and ``results.csv``. Rolling back means: pick a checkpoint that still carries optimizer state
and is clean, make it ``weights/last.pt`` so that ``yolo train resume model=…/last.pt`` continues at the
epoch after it, and drop the results.csv rows of the epochs that are undone.

- :func:`plan_rollback` is pure: it audits every checkpoint without running code from it, picks the target,
  and explains what would change. It refuses (a :class:`RollbackRefused`, one line naming the file and the
  reason) a stripped checkpoint (``epoch == -1``), one without optimizer state, the final epoch's checkpoint,
  and, unless ``force``, a dirty, unsafe or journal-tainted one.
- :func:`check_apply` makes every check of applying without writing (``--dry-run`` and the real run share it).
- :func:`apply_rollback` takes the run's lock (:mod:`~nanguard.runs.lock`; a held lock raises
  :class:`~nanguard.runs.lock.RunLocked`), writes an intent record (:mod:`~nanguard.runs.intent`), backs up
  ``last.pt``, ``best.pt`` and ``results.csv`` (:func:`~nanguard.runs.backups.take_backup`), then writes each
  file atomically (temp file + rename), records a ``disk_rollback`` action in the journal (the commit point),
  removes the intent and releases the lock. :func:`recover` finishes what a killed one left.

It does not audit a single checkpoint (:mod:`~nanguard.runs.candidates`), own the lock, the backups or undoing
them (:mod:`~nanguard.runs.backups`), nor the results.csv trimming rules (:mod:`~nanguard.runs.results_csv`).

Epochs: a checkpoint's ``epoch`` is the 0-based index of the epoch it finished; Ultralytics resumes at
``epoch + 1`` (and prints it 1-based, ``from epoch epoch+2``). results.csv numbers epochs from 1, so a
checkpoint of epoch index E goes with rows ``1 … E+1``.

A checkpoint is loaded with its real classes only to rewrite it (``lr0`` scaling, or a ``save_dir`` that no
longer names this folder), and only through :func:`nanguard.ckpt.load_checkpoint` (allowlisted globals, or
``trust``). Otherwise the target's bytes are copied unchanged.
"""

from __future__ import annotations

import math
import os
import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nanguard.atomic import atomic_copy, atomic_write_bytes
from nanguard.errors import JournalError
from nanguard.journal import Journal, journal_path
from nanguard.runs.backups import (
    BACKED_UP,
    new_backup_name,
    recover_pending,
    require_replaceable,
    sha256_file,
    take_backup,
)
from nanguard.runs.base import RESULTS_CSV, WEIGHTS_DIR, RollbackRefused, as_float, as_int
from nanguard.runs.candidates import Candidate, examine, journal_taints, require_resumable, train_args_of
from nanguard.runs.intent import clear_intent, new_intent_id, read_intent, write_intent
from nanguard.runs.lock import HeldLock, check_writer_free, folder_writer, state_folder
from nanguard.runs.results_csv import read_results_text, trim_counts, trim_results

_EPOCH_TARGET = re.compile(r"^epoch\s*[:=]?\s*(\d+)$", re.IGNORECASE)
_EPOCH_FILE = re.compile(r"^epoch(\d+)\.pt$")


@dataclass
class RollbackPlan:
    """What :func:`apply_rollback` will do; :func:`plan_rollback` builds it and changes nothing.

    Attributes:
        run_dir: the Ultralytics run folder (holds ``weights/`` and ``results.csv``).
        target: the checkpoint that becomes ``weights/last.pt``.
        target_sha256: its SHA-256 when planned; applying refuses if it changed since.
        target_epoch: its 0-based epoch index.
        epochs: the run's total epochs (``train_args.epochs``).
        resume_epoch: the 0-based epoch index training resumes at (``target_epoch + 1``).
        replace_best: whether ``best.pt`` is replaced by the new ``last.pt``, and ``best_reason`` why (not).
        results_rows: rows results.csv keeps and drops (None without a results.csv).
        lr0_before, lr0_after, lr_scale: ``train_args.lr0`` before and after scaling.
        save_dir_before: the target's ``train_args.save_dir`` when it names another folder (then rewritten).
        forced: the concerns ``force`` overrode.
        candidates: every checkpoint audited, in the order found.
        trust: load the target with globals outside the allowlist when rewriting it.
    """

    run_dir: Path
    target: Path
    target_sha256: str
    target_epoch: int
    epochs: int | None
    replace_best: bool
    best_reason: str
    results_rows: tuple[int, int] | None
    lr0_before: float | None
    lr0_after: float | None
    lr_scale: float | None
    save_dir_before: str | None
    forced: list[str] = field(default_factory=list)
    candidates: list[Candidate] = field(default_factory=list)
    trust: bool = False

    @property
    def weights_dir(self) -> Path:
        return self.run_dir / WEIGHTS_DIR

    @property
    def last(self) -> Path:
        return self.weights_dir / "last.pt"

    @property
    def resume_epoch(self) -> int:
        return self.target_epoch + 1

    @property
    def rewrite(self) -> bool:
        """True when the target is loaded and saved with edits; False when its bytes are copied."""
        return self.lr_scale is not None or self.save_dir_before is not None

    @property
    def resume_command(self) -> str:
        return f"yolo train resume model={shlex.quote(str(self.last))}"

    @property
    def python_command(self) -> str:
        return f"from ultralytics import YOLO; YOLO({str(self.last)!r}).train(resume=True)"

    def to_dict(self) -> dict[str, Any]:
        kept, dropped = self.results_rows if self.results_rows is not None else (None, None)
        return {
            "run_dir": str(self.run_dir),
            "target": str(self.target),
            "target_sha256": self.target_sha256,
            "target_epoch": self.target_epoch,
            "resume_epoch": self.resume_epoch,
            "epochs": self.epochs,
            "last": str(self.last),
            "last_written_as": "rewritten" if self.rewrite else "copy",
            "replace_best": self.replace_best,
            "best_reason": self.best_reason,
            "results_rows_kept": kept,
            "results_rows_dropped": dropped,
            "lr_scale": self.lr_scale,
            "lr0_before": self.lr0_before,
            "lr0_after": self.lr0_after,
            "save_dir_before": self.save_dir_before,
            "forced": list(self.forced),
            "backed_up": [name for name in BACKED_UP if (self.run_dir / name).exists()],
            "candidates": [candidate.to_dict() for candidate in self.candidates],
            "resume_command": self.resume_command,
            "python_command": self.python_command,
        }


@dataclass(frozen=True)
class RollbackResult:
    """What :func:`apply_rollback` did: the plan, the backup folder, the journal action id, and the SHA-256
    of each file written (relative name → digest)."""

    plan: RollbackPlan
    backup_dir: Path
    action_id: int
    written: dict[str, str]

    def to_dict(self) -> dict[str, Any]:
        return {**self.plan.to_dict(), "backup_dir": str(self.backup_dir), "action_id": self.action_id,
                "written": dict(self.written)}


# ---- planning ---------------------------------------------------------------------------------------------


def plan_rollback(
    run_dir: str | Path,
    *,
    to: str = "latest-clean",
    lr_scale: float | None = None,
    force: bool = False,
    trust: bool = False,
) -> RollbackPlan:
    """Audit every checkpoint of an Ultralytics run folder and plan a rollback; changes nothing on disk.

    Args:
        run_dir: the run folder (the one holding ``weights/`` and ``results.csv``).
        to: ``latest-clean`` (the newest resumable clean checkpoint), ``best`` (``weights/best.pt``),
            ``epoch N`` / ``epochN`` (0-based, ``weights/epochN.pt``), or a checkpoint path.
        lr_scale: multiply ``train_args.lr0`` by this factor in the written ``last.pt``.
        force: accept a dirty, unsafe or tainted target (a stripped or final one is still refused).
        trust: accept a target that :func:`nanguard.ckpt.require_loadable` refuses (it calls code, or names
            classes outside the allowlist); ``force`` does not. Also used when the target must be rewritten.

    Raises:
        RollbackRefused: no run or weights folder, a bad ``to`` or ``lr_scale``, no resumable clean
            checkpoint, a target that cannot be resumed, or a dirty/unsafe/tainted target without ``force``.
    """
    from nanguard.ckpt import find_checkpoints

    run = Path(run_dir)
    weights = run / WEIGHTS_DIR
    if not run.is_dir():
        raise RollbackRefused(f"{run}: no such run folder")
    if not weights.is_dir():
        raise RollbackRefused(f"{run}: no weights folder ({weights}); is this an Ultralytics run folder?")
    require_replaceable(run)
    if lr_scale is not None and not (math.isfinite(lr_scale) and lr_scale > 0):
        raise RollbackRefused(f"--lr-scale {lr_scale}: must be a finite number above 0")
    taints = journal_taints(run)
    files = [path for path in find_checkpoints(weights) if path.is_file() and path.suffix == ".pt"]
    candidates: dict[Path, tuple[Candidate, Any]] = {path: examine(path, taints) for path in files}

    target, root = _pick(run, to, candidates, taints, force)
    require_resumable(target.path, trust)  # a resume hands it to Ultralytics: --force never accepts code
    forced = [target.concern] if target.concern else []
    assert target.epoch is not None  # _pick returns resumable candidates only
    train_args = train_args_of(root)
    epochs = as_int(train_args.get("epochs"))
    lr0 = as_float(train_args.get("lr0"))
    if lr_scale is not None and lr0 is None:
        raise RollbackRefused(f"{target.path}: train_args holds no numeric lr0 to scale")
    save_dir = train_args.get("save_dir")
    save_dir_before = str(save_dir) if save_dir and not _same_folder(Path(str(save_dir)), run) else None
    replace_best, best_reason = _best_decision(weights / "best.pt", target, candidates)
    return RollbackPlan(
        run_dir=run,
        target=target.path,
        target_sha256=sha256_file(target.path),
        target_epoch=target.epoch,
        epochs=epochs,
        replace_best=replace_best,
        best_reason=best_reason,
        results_rows=trim_counts(run / RESULTS_CSV, target.epoch),
        lr0_before=lr0,
        lr0_after=None if lr_scale is None or lr0 is None else lr0 * lr_scale,
        lr_scale=lr_scale,
        save_dir_before=save_dir_before,
        forced=forced,
        candidates=[candidate for candidate, _ in candidates.values()],
        trust=trust,
    )


def _pick(
    run: Path, to: str, candidates: dict[Path, tuple[Candidate, Any]], taints: dict[str, str], force: bool
) -> tuple[Candidate, Any]:
    """The target the ``to`` argument names, checked; raises :class:`RollbackRefused` when unusable."""
    weights = run / WEIGHTS_DIR
    spec = to.strip()
    if spec == "latest-clean":
        usable = [pair for pair in candidates.values() if pair[0].usable]
        if not usable:
            summary = "; ".join(f"{c.path.name} {c.problem or c.concern}" for c, _ in candidates.values())
            raise RollbackRefused(f"{weights}: no resumable clean checkpoint" + (f" ({summary})" if summary else
                                  " (no .pt files)"))
        # Newest epoch wins; at a tie an epochN.pt file is preferred over last.pt/best.pt (it is not rewritten
        # by a resumed run's first save).
        return max(usable, key=lambda pair: (pair[0].epoch or 0, bool(_EPOCH_FILE.match(pair[0].path.name))))
    match = _EPOCH_TARGET.match(spec)
    if spec == "best":
        path = weights / "best.pt"
    elif match:
        wanted = int(match.group(1))
        path = weights / f"epoch{wanted}.pt"
        if path not in candidates:
            same = [p for p, (c, _) in candidates.items() if c.epoch == wanted and c.problem is None]
            if not same:
                have = sorted(c.epoch for c, _ in candidates.values() if c.epoch is not None and c.epoch >= 0)
                raise RollbackRefused(f"{path}: no checkpoint of epoch {wanted} in {weights} (epochs found: "
                                      f"{', '.join(map(str, have)) or 'none'}; save_period=1 keeps one per epoch)")
            path = same[0]
    else:
        path = Path(spec)
        if not path.is_file():
            raise RollbackRefused(f"{path}: no such checkpoint file (--to takes latest-clean, best, 'epoch N' "
                                  "or a checkpoint path)")
    if path not in candidates:
        if not path.is_file():
            raise RollbackRefused(f"{path}: no such checkpoint file")
        candidates[path] = examine(path, taints)
    candidate, root = candidates[path]
    if candidate.problem is not None:
        raise RollbackRefused(f"{path}: {candidate.problem}")
    if candidate.concern is not None and not force:
        raise RollbackRefused(f"{path}: {candidate.concern}; pass --force to roll back to it anyway",
                              candidate.concern_code)
    return candidate, root


def _best_decision(
    best: Path, target: Candidate, candidates: dict[Path, tuple[Candidate, Any]]
) -> tuple[bool, str]:
    """Whether ``best.pt`` is replaced by the new ``last.pt``, and why (not)."""
    if not best.exists():
        return False, "no best.pt"
    if _same_folder(best, target.path):
        return False, "best.pt is the target"
    info = candidates.get(best)
    if info is None:
        return False, "best.pt was not audited"
    candidate = info[0]
    if candidate.status != "clean" or candidate.concern is not None:
        return True, f"best.pt {candidate.concern or 'is ' + candidate.status}"
    if candidate.epoch is None or candidate.epoch < 0:
        return False, "best.pt is a stripped final checkpoint (a resumed run rewrites it)"
    if target.epoch is not None and candidate.epoch > target.epoch:
        return True, f"best.pt is from epoch {candidate.epoch}, after the target"
    return False, f"best.pt is clean and from epoch {candidate.epoch}, not after the target"


# ---- applying ---------------------------------------------------------------------------------------------


def check_apply(run_dir: str | Path, *, held: HeldLock | None = None) -> None:
    """Every check :func:`apply_rollback` makes before its first write, without writing anything: the run's
    ``.nanguard`` is a folder, no live process holds the run or Guard lock, the journal opens (the real
    :class:`~nanguard.journal.Journal` checks, when there is one) or can be created, and the folders of the
    files a rollback changes are writable. ``--dry-run`` runs it, so a dry run fails exactly where the real
    rollback would (same exit code, same message); the real one runs it too, before it creates anything.
    ``held``: the run lock this process already holds (not checked again).

    Raises:
        RunLocked, JournalError, RollbackRefused: as :func:`apply_rollback` would.
    """
    run = Path(run_dir)
    state = state_folder(run, create=False)
    check_writer_free(run, run_lock_held=held is not None)
    if journal_path(run).exists():
        Journal(run).close()
    elif not os.access(state if state.is_dir() else run, os.W_OK | os.X_OK):
        raise JournalError(f"{journal_path(run)}: cannot create the journal ({state if state.is_dir() else run} "
                           "is not writable)")
    read_intent(run)  # an unreadable intent record refuses both
    for name in BACKED_UP:
        folder = (run / name).parent
        if folder.is_dir() and not os.access(folder, os.W_OK | os.X_OK):
            raise RollbackRefused(f"{folder}: not writable; nothing changed")


def recover(run_dir: str | Path) -> str | None:
    """Complete or revert what a killed rollback or undo left in ``run_dir``
    (:func:`~nanguard.runs.backups.recover_pending`, under the run and Guard locks); returns the one line that
    says what was done, or None when nothing was pending (then nothing is created or locked).

    Raises:
        RunLocked: a live process holds a lock; RollbackRefused: an unreadable intent or a damaged backup.
    """
    run = Path(run_dir)
    if not run.is_dir() or read_intent(run) is None:
        return None
    with folder_writer(run, "rollback: recovery"):
        return recover_pending(run)


def apply_rollback(plan: RollbackPlan, *, held: HeldLock | None = None) -> RollbackResult:
    """Carry out ``plan`` under the run's lock, all or nothing: back up, write ``last.pt`` (and ``best.pt``),
    trim results.csv, record a ``disk_rollback`` action in the journal.

    An intent record (:mod:`~nanguard.runs.intent`) is written before the first change; the journal row is
    the commit point. A command killed at any moment leaves the folder as before, or fully rolled back with
    its backup and journal row, or with the intent that the next rollback, undo or ``nanguard run`` reverts.

    Args:
        plan: what :func:`plan_rollback` planned (after :func:`recover`, when something was pending).
        held: the run lock the caller already holds (``nanguard run`` between restarts holds it for its whole
            life); None takes it here.

    Raises:
        RunLocked: another process holds the lock, or a live Guard writes snapshots into the folder.
        RollbackRefused: the target changed since the plan was made, or a killed command's intent was found
            (it is recovered first: plan again).
        UnsafeCheckpoint: the target must be rewritten, has globals outside the allowlist, and ``trust`` is off.
    """
    run = plan.run_dir
    check_apply(run, held=held)  # the dry run's checks, before anything is created
    with folder_writer(run, "rollback", held):
        recovered = recover_pending(run)
        if recovered is not None:  # the plan saw the folder before this: it may no longer hold
            raise RollbackRefused(f"{recovered}; plan the rollback again")
        if sha256_file(plan.target) != plan.target_sha256:
            raise RollbackRefused(f"{plan.target}: changed since the rollback was planned; plan it again")
        journal = Journal(run)  # opened before any file changes: a journal that cannot open stops it here
        try:
            # Load the target before last.pt (possibly the target itself) is replaced.
            obj = _rewritten(plan) if plan.rewrite else None
            intent_id, backup_name = new_intent_id(), new_backup_name()
            write_intent(run, {"action": "disk_rollback", "id": intent_id, "backup": backup_name,
                               "target": str(plan.target), "target_sha256": plan.target_sha256})
            backup = take_backup(run, {"action": "disk_rollback", "target": str(plan.target),
                                       "target_epoch": plan.target_epoch, "intent": intent_id}, backup_name)
            written: dict[str, str] = {}
            last_name = f"{WEIGHTS_DIR}/last.pt"
            if obj is not None:
                from nanguard.ckpt import save_checkpoint

                save_checkpoint(obj, plan.last)
            elif plan.target.resolve() != plan.last.resolve():
                atomic_copy(plan.target, plan.last)
            written[last_name] = sha256_file(plan.last)
            if plan.replace_best:
                atomic_copy(plan.last, plan.weights_dir / "best.pt")
                written[f"{WEIGHTS_DIR}/best.pt"] = written[last_name]
            csv_path = run / RESULTS_CSV
            dropped = 0
            if csv_path.is_file():
                text, _, dropped = trim_results(read_results_text(csv_path), plan.target_epoch)
                atomic_write_bytes(csv_path, text.encode("utf-8"))
                written[RESULTS_CSV] = sha256_file(csv_path)
            import torch

            run_id = journal.start_run(policy={"command": "nanguard rollback"}, torch_version=torch.__version__)
            action_id = journal.record_action(  # the commit point
                run_id, step=plan.target_epoch, action="disk_rollback",
                reason=f"rolled back to {plan.target.name} (epoch index {plan.target_epoch}); resumes at epoch "
                       f"index {plan.resume_epoch}",
                detail={
                    "target": str(plan.target.resolve()), "target_sha256": plan.target_sha256,
                    "target_epoch": plan.target_epoch, "resume_epoch": plan.resume_epoch,
                    "backup": str(backup.resolve()), "written": written, "results_rows_dropped": dropped,
                    "lr_scale": plan.lr_scale, "lr0_before": plan.lr0_before, "lr0_after": plan.lr0_after,
                    "save_dir_before": plan.save_dir_before, "replaced_best": plan.replace_best,
                    "forced": plan.forced, "intent": intent_id,
                },
            )
            journal.end_run(run_id, "finished")
            clear_intent(run)
        finally:
            journal.close()
    return RollbackResult(plan, backup, action_id, written)


def _rewritten(plan: RollbackPlan) -> Any:
    """The target loaded with its real classes (allowlist, or ``plan.trust``), ``lr0`` scaled and
    ``save_dir`` set to this run folder."""
    from nanguard.ckpt import load_checkpoint

    obj = load_checkpoint(plan.target, trust=plan.trust)
    args = obj.get("train_args") if isinstance(obj, dict) else None
    if not isinstance(args, dict):
        raise RollbackRefused(f"{plan.target}: holds no train_args dict to edit")
    if plan.lr_scale is not None:
        args["lr0"] = float(args["lr0"]) * plan.lr_scale
    if plan.save_dir_before is not None:
        args["save_dir"] = str(plan.run_dir.resolve())
    return obj


def _same_folder(a: Path, b: Path) -> bool:
    try:
        return a.resolve() == b.resolve()
    except OSError:
        return False
