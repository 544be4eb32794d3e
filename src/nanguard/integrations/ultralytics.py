"""nanguard.integrations.ultralytics puts the guard inside a real Ultralytics YOLO training, any task.

    from ultralytics import YOLO
    from nanguard.integrations.ultralytics import guard

    model = YOLO("yolo11n.yaml")
    guarded = guard(model)                  # before model.train(...)
    model.train(data="data.yaml", epochs=100)
    print(guarded.guard.report())

What it does, all through ``yolo.add_callback`` and two instance overrides on the trainer:

- at ``on_pretrain_routine_end`` (optimizer, scaler, EMA, scheduler exist) it builds a :class:`nanguard.Guard`
  on the unwrapped model, the trainer's optimizer, its GradScaler when enabled and its ``ModelEMA`` (as
  ``loop_ema``: Ultralytics updates it), with the journal in the run's ``save_dir``, and wraps
  ``trainer.optimizer_step`` in the guard's step API: ``before_optimizer_step`` unscales, checks the loss and
  gradients, clips (at 10.0 unless the policy says otherwise, Ultralytics' fixed value) and, when the update must
  not happen, sets every gradient to ``None``; then Ultralytics' own ``optimizer_step`` runs (its ``unscale_`` a
  no-op for the call, its EMA hidden on a skipped step), and ``after_optimizer_step`` records the step. The
  scheduler stays Ultralytics' (stepped per epoch); the guard's LR back-off scales the optimizer's param-group
  LRs around each step only, so warmup and the scheduler keep writing their own values;
- it records every step with the epoch, the batch index within the epoch (counted at
  ``on_train_batch_start``, reset at ``on_train_epoch_start``) and the image files of the batches since the
  previous step (read from the batch dict as ``trainer.preprocess_batch`` receives it; ``None`` for tasks
  whose batches carry no ``im_file``, e.g. classification);
- a batch whose loss is non-finite is left out of Ultralytics' running mean loss (``trainer.tloss``), so the
  progress line, ``results.csv`` and the checkpoints' ``train_results`` stay finite: the guard never applied
  that batch, and a NaN there is what the audit calls a NaN-corrupted history;
- at ``on_train_epoch_end``, before validation and saving, it scans weights, EMA and optimizer state and
  rolls back in process to the newest clean snapshot when they are contaminated;
- it takes over Ultralytics' own epoch-level NaN recovery (``_handle_nan_recovery``, 8.3.213 on), which would
  reload ``last.pt`` and replace ``trainer.ema`` behind the guard's back: the guard's state check decides;
- at ``on_model_save`` (and once more at ``on_train_end``, after ``strip_optimizer`` rewrote ``last.pt`` and
  ``best.pt``) it audits every checkpoint file written since the last look. A clean ``last.pt``/``best.pt`` is
  pinned to ``<save_dir>/.nanguard/pinned/``; a dirty, scrubbed, unsafe or unreadable one is replaced by its
  pinned clean copy (atomically), the bad one kept in ``<save_dir>/.nanguard/quarantine/``, and the journal says
  so; a bad ``epochN.pt`` is moved to that quarantine. Every verdict goes to the journal's ``checkpoints`` table
  (all of it is :class:`nanguard.ckpt.CheckpointKeeper`, shared with the other adapters);
- it closes the guard at ``on_train_end`` (``finished``) or ``teardown`` (``crashed`` when training did not
  reach its end).

Version gates (Ultralytics 8.3.0 on; tests run the pinned newest):

- ``trainer.loss`` is the summed loss in 8.4.x, and a per-component vector in some 8.3.x criteria: summed
  here when it has more than one element;
- ``loss_items``/``tloss`` became dicts in 8.4.101–8.4.120 (tensors before): the running-mean repair
  (:meth:`UltralyticsGuard.keep_running_loss_finite`) handles both;
- ``_handle_nan_recovery`` exists from 8.3.213: overridden only when present;
- ``unwrap_model`` is newer than 8.3.0 (``de_parallel`` there): whichever exists is used;
- ``teardown`` is registered where the trainer fires it (8.4.x); ``on_train_end`` closes the guard anyway;
- 8.4.35–8.4.83 skip writing ``last.pt`` when the EMA is non-finite: an unchanged file is not re-audited;
- from 8.4.70 the saved EMA is scrubbed (NaN → 0): the audit reports the marks of scrubbing as dirty;
- ``trainer.stop`` is honoured per batch only from 8.4.x; the guard does not rely on it (a stop decision
  raises :class:`nanguard.TrainingStopped` from the optimizer step);
- DDP: 8.3.253 and 8.4.100 do not pass custom callbacks to DDP workers, so the guard is not attached there;
  multi-GPU training is not supported by this integration (a warning is logged).
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from nanguard.ckpt import Verdict
from nanguard.ckpt.keeper import CheckpointKeeper, load_guard_state, save_guard_state
from nanguard.guard import Guard, StepResult
from nanguard.policy import Policy

if TYPE_CHECKING:
    from ultralytics import YOLO

log = logging.getLogger(__name__)

MIN_VERSION = (8, 3, 0)
"""The oldest Ultralytics release this integration supports."""
NAN_RECOVERY_SINCE = (8, 3, 213)
"""First release with the epoch-level ``_handle_nan_recovery`` that the guard takes over."""
ULTRALYTICS_CLIP_NORM = 10.0
"""Ultralytics' hard-coded ``clip_grad_norm_`` limit, the default ``max_grad_norm`` here."""

WEIGHTS_KEYS = ("model", "pretrained", "distill_model")
"""The ``train`` arguments Ultralytics resolves to a ``.pt`` file and unpickles: the model, the weights to start
from, the distillation teacher (``resume`` is handled apart: :func:`checkpoints_to_load`)."""


def checkpoints_to_load(overrides: dict[str, Any]) -> list[Path]:
    """The local checkpoint files ``YOLO(overrides["model"]).train(**overrides)`` will unpickle with real classes.

    Resolved as Ultralytics does: a model stem gets ``.pt`` (``yolo11n`` -> ``yolo11n.pt``), a file is looked up
    where it is, then in the settings' ``weights_dir``; an official asset missing locally is downloaded first
    (as Ultralytics would) so that it is audited too. ``resume`` given as an existing path is that file; a bare
    ``resume`` with a ``.pt`` model resumes that model, otherwise the newest ``last*.pt`` under the current
    folder (Ultralytics' ``get_latest_run``). ``.yaml`` models are built from config, nothing is unpickled.

    Raises:
        UnreadableCheckpoint: a remote weights URL (``https://``, ``ul://``...): it cannot be audited before
            Ultralytics downloads and loads it in one call; download it first and pass the local file.
    """
    from ultralytics.utils.files import get_latest_run

    found: dict[str, Path] = {}
    model_file: Path | None = None
    for key in WEIGHTS_KEYS:
        path = _weights_file(key, overrides.get(key))
        if path is not None:
            found.setdefault(str(path.resolve()), path)
            if key == "model":
                model_file = path
    resume = overrides.get("resume")
    if isinstance(resume, str | Path) and Path(resume).exists():
        found.setdefault(str(Path(resume).resolve()), Path(resume))
    elif resume and not (resume is True and model_file is not None):
        latest = get_latest_run()
        if latest:
            found.setdefault(str(Path(latest).resolve()), Path(latest))
    return list(found.values())


def _weights_file(key: str, value: Any) -> Path | None:
    from ultralytics.utils import SETTINGS
    from ultralytics.utils.checks import REMOTE_FILE_PREFIXES, check_model_file_from_stem
    from ultralytics.utils.downloads import GITHUB_ASSETS_NAMES, attempt_download_asset

    from nanguard.errors import UnreadableCheckpoint

    if not isinstance(value, str | Path) or not str(value).strip():
        return None  # pretrained=True/False, no distill_model
    text = str(value).strip()
    if text.lower().startswith(REMOTE_FILE_PREFIXES):
        raise UnreadableCheckpoint(f"{key}={text}: a remote checkpoint cannot be audited before Ultralytics loads "
                                   "it; download it and pass the local file")
    path = Path(str(check_model_file_from_stem(text)))
    if path.suffix.lower() != ".pt":
        return None  # a .yaml is built from config; other formats are not unpickled by train
    for candidate in (path, Path(SETTINGS["weights_dir"]) / path):
        if candidate.is_file():
            return candidate
    if path.name in GITHUB_ASSETS_NAMES:  # Ultralytics would download its own release asset: fetch it, audit it
        try:
            downloaded = Path(attempt_download_asset(path))
        except Exception:  # offline or unavailable: Ultralytics fails the same way when it tries
            return None
        return downloaded if downloaded.is_file() else None
    return None


def parse_version(text: str) -> tuple[int, int, int]:
    """``"8.4.190"`` → ``(8, 4, 190)``; suffixes (``.dev0``, ``rc1``) and missing parts count as 0."""
    parts: list[int] = []
    for piece in text.split(".")[:3]:
        digits = ""
        for char in piece:
            if not char.isdigit():
                break
            digits += char
        parts.append(int(digits) if digits else 0)
    while len(parts) < 3:
        parts.append(0)
    return parts[0], parts[1], parts[2]


def ultralytics_version() -> tuple[int, int, int]:
    """The installed Ultralytics version; raises ``RuntimeError`` when it is older than :data:`MIN_VERSION`."""
    import ultralytics

    version = parse_version(str(ultralytics.__version__))
    if version < MIN_VERSION:
        oldest = ".".join(map(str, MIN_VERSION))
        raise RuntimeError(f"nanguard supports Ultralytics {oldest} and newer, found {ultralytics.__version__}")
    return version


def unwrap_model(model: nn.Module) -> nn.Module:
    """The bare model under DDP/DataParallel/``torch.compile`` wrappers (Ultralytics' own helper when present)."""
    import ultralytics.utils.torch_utils as torch_utils

    # unwrap_model in newer releases, de_parallel in 8.3.0
    unwrap: Any = getattr(torch_utils, "unwrap_model", None) or getattr(torch_utils, "de_parallel", None)
    if unwrap is not None:
        unwrapped = unwrap(model)
        if isinstance(unwrapped, nn.Module):
            model = unwrapped
    inner = getattr(model, "module", None)
    while isinstance(inner, nn.Module):
        model, inner = inner, getattr(inner, "module", None)
    orig = getattr(model, "_orig_mod", None)
    return orig if isinstance(orig, nn.Module) else model


def guard(yolo: YOLO, *, policy: Policy | None = None) -> UltralyticsGuard:
    """Attach nanguard to the next trainings of ``yolo`` (call it before ``yolo.train``).

    Args:
        yolo: an ``ultralytics.YOLO`` (or any ``ultralytics.engine.model.Model``), any task.
        policy: the guard's policy; ``None`` takes the project's policy (``nanguard.toml`` or
            ``[tool.nanguard]`` in the current folder, else the defaults) with ``max_grad_norm`` set to
            Ultralytics' 10.0 when it leaves clipping unset.
    """
    guarded = UltralyticsGuard(policy=policy)
    guarded.attach(yolo)
    return guarded


class UltralyticsGuard:
    """The callbacks that run a :class:`~nanguard.Guard` inside an Ultralytics trainer.

    Attributes:
        guard: the guard of the current (or last) training; ``None`` before ``on_pretrain_routine_end``.
        trainer: that training's trainer.
        version: the Ultralytics version, parsed.
        results: the :class:`~nanguard.guard.StepResult` of every optimizer step of the current training.
        verdicts: every checkpoint audit made, in order.
    """

    def __init__(self, *, policy: Policy | None = None) -> None:
        self.version = ultralytics_version()
        self.policy = policy
        self.guard: Guard | None = None
        self.trainer: Any = None
        self.results: list[StepResult] = []
        self.verdicts: list[Verdict] = []
        self._batch_index = -1
        self._pending_files: list[str] = []
        self.keeper: CheckpointKeeper | None = None
        self._finished = False

    # ------------------------------------------------------------------ wiring
    def callbacks(self) -> dict[str, Callable[[Any], None]]:
        """Event name → callback, as registered by :meth:`attach`."""
        return {
            "on_pretrain_routine_end": self.on_pretrain_routine_end,
            "on_train_epoch_start": self.on_train_epoch_start,
            "on_train_batch_start": self.on_train_batch_start,
            "on_train_batch_end": self.on_train_batch_end,
            "on_train_epoch_end": self.on_train_epoch_end,
            "on_model_save": self.on_model_save,
            "on_train_end": self.on_train_end,
            "teardown": self.teardown,
        }

    def attach(self, yolo: Any) -> None:
        for event, callback in self.callbacks().items():
            yolo.add_callback(event, callback)

    def _resolve_policy(self) -> Policy:
        if self.policy is not None:
            return self.policy
        policy = Policy.discover(Path.cwd())
        if policy.max_grad_norm is None:
            policy = dataclasses.replace(policy, max_grad_norm=ULTRALYTICS_CLIP_NORM)
        return policy

    def on_pretrain_routine_end(self, trainer: Any) -> None:
        """Build the guard and take over the trainer's optimizer step (and NaN recovery, where present)."""
        if self.guard is not None:
            self.guard.close("finished" if self._finished else "crashed")  # a previous training of this model
        self.trainer = trainer
        self.results, self.verdicts = [], []
        self._batch_index, self._pending_files, self._finished = -1, [], False
        self._tloss_before: Any = None
        self._tloss_checked = False  # this batch's tloss already repaired (at the optimizer step)
        self._restart_mean = False
        self._best_state: dict[str, Any] | None = None  # the guard state saved with best.pt
        if getattr(trainer, "world_size", 1) > 1:
            log.warning("nanguard: multi-GPU (DDP) Ultralytics training is not supported; guarding this rank only")
        scaler = getattr(trainer, "scaler", None)
        if scaler is not None and not scaler.is_enabled():
            scaler = None
        # Ultralytics updates its EMA and steps its scheduler (per epoch) itself: the EMA is the loop's (scanned and
        # kept in snapshots); the scheduler is left out, since an in-process rollback does not rewind the epoch.
        self.guard = Guard(
            unwrap_model(trainer.model), trainer.optimizer, run_dir=trainer.save_dir, policy=self._resolve_policy(),
            scaler=scaler, loop_ema=getattr(trainer, "ema", None) or None,
        )
        self.ultralytics_optimizer_step = trainer.optimizer_step
        self.keeper = CheckpointKeeper.for_guard(self.guard, trainer.save_dir)
        if getattr(trainer, "resume", False) and getattr(trainer.args, "resume", None):
            self.restore_guard_state(Path(trainer.args.resume))
        trainer.optimizer_step = self.optimizer_step
        original_preprocess = trainer.preprocess_batch

        def preprocess_batch(batch: Any) -> Any:
            files = batch.get("im_file") if isinstance(batch, dict) else None
            if files is not None:
                self._pending_files.extend(str(f) for f in files)
            if self._restart_mean:  # the epoch's first batch was non-finite: the mean starts at this batch
                trainer.tloss, self._restart_mean = None, False
            self._tloss_before = trainer.tloss  # this batch's forward is next; Ultralytics then updates tloss
            self._tloss_checked = False
            return original_preprocess(batch)

        trainer.preprocess_batch = preprocess_batch
        if hasattr(trainer, "_handle_nan_recovery"):  # 8.3.213 on
            trainer._handle_nan_recovery = self.handle_nan_recovery

    def on_train_epoch_start(self, trainer: Any) -> None:
        self._batch_index = -1
        self._pending_files = []

    def on_train_batch_start(self, trainer: Any) -> None:
        self._batch_index += 1

    def on_train_batch_end(self, trainer: Any) -> None:
        self.keep_running_loss_finite()

    def keep_running_loss_finite(self) -> None:
        """Leave a non-finite batch out of Ultralytics' running mean loss (``trainer.tloss``).

        Ultralytics folds every batch's loss items into ``tloss`` before the optimizer step, and one NaN batch
        makes the epoch's mean NaN: the progress line, ``results.csv`` and the checkpoints' ``train_results``
        then hold NaN although the guard never applied the bad update — a NaN-corrupted history, which the audit
        reports as dirty. Each element that turned non-finite keeps its value from before the batch (selected on
        the device: no host sync). When the batch was the epoch's first (no previous mean), the non-finite
        elements read 0 for the progress line and the mean restarts at the next batch. Called after the
        optimizer step (before Ultralytics prints the progress line) and at ``on_train_batch_end`` (batches
        that only accumulate); once per batch."""
        trainer = self.trainer
        new, before = getattr(trainer, "tloss", None), self._tloss_before
        if new is None or self._tloss_checked:
            return
        self._tloss_checked = True
        if before is None:
            values = list(new.values()) if isinstance(new, dict) else [new]
            if all(bool(torch.isfinite(torch.as_tensor(v)).all()) for v in values):
                return  # the epoch's first batch was finite (one host read, once per epoch)
            before = {k: torch.zeros_like(torch.as_tensor(v)) for k, v in new.items()} if isinstance(new, dict) \
                else torch.zeros_like(new)
            self._restart_mean = True
        if isinstance(new, dict) and isinstance(before, dict):
            trainer.tloss = {k: _finite_or(v, before.get(k)) for k, v in new.items()}
        elif isinstance(new, torch.Tensor) and isinstance(before, torch.Tensor) and new.shape == before.shape:
            trainer.tloss = _finite_or(new, before)

    # ------------------------------------------------------------------ the step
    def optimizer_step(self) -> None:
        """Wraps Ultralytics' own ``optimizer_step`` in the guard's step API. Ultralytics calls it once every
        ``accumulate`` batches; the step is recorded at the last of them, with the image files of all of them.

        ``before_optimizer_step`` unscales, checks the loss and gradients, decides and clips; when the update must
        not happen every gradient is ``None``, so Ultralytics' ``scaler.step(optimizer)`` changes nothing, and its
        EMA is hidden for the call (``trainer.ema = None``) so the average does not move either. Ultralytics' own
        ``unscale_`` is a no-op for the call (the gradients are unscaled already) and its fixed clip at 10 then
        finds them clipped. ``after_optimizer_step`` records the step and runs the periodic check or a rollback."""
        guard, trainer = self._require_guard(), self.trainer
        loss = trainer.loss.detach()
        if loss.numel() != 1:
            loss = loss.sum()
        files, self._pending_files = self._pending_files, []
        verdict = guard.before_optimizer_step(loss, epoch=int(trainer.epoch), batch_index=max(self._batch_index, 0),
                                              sample_ids=files or None)
        scaler, ema = getattr(trainer, "scaler", None), getattr(trainer, "ema", None)
        hide_ema = verdict.known and not verdict.apply
        if scaler is not None:
            scaler.unscale_ = _already_unscaled
        if hide_ema:
            trainer.ema = None
        try:
            self.ultralytics_optimizer_step()
        finally:
            if scaler is not None:
                del scaler.unscale_  # the instance attribute shadowed the class's method
            if hide_ema:
                trainer.ema = ema
        self.results.append(guard.after_optimizer_step(verdict))
        self.keep_running_loss_finite()

    def on_train_epoch_end(self, trainer: Any) -> None:
        """Before validation and saving: contaminated state (a NaN weight, EMA or optimizer moment that no
        step has shown yet) is rolled back now, so the epoch's checkpoint is written from clean state."""
        guard = self._require_guard()
        # The periodic check, at the epoch boundary: contaminated state rolls back, clean state is kept as a
        # snapshot, so a later fault never rolls back further than one epoch (short runs included). Not
        # twice: when the periodic check just ran at the end of the epoch's last step, nothing changed since.
        if not guard.checked_since_last_step:
            guard.check_state(max(guard.step_count - 1, 0))

    def handle_nan_recovery(self, epoch: int) -> bool:
        """Replaces Ultralytics' epoch-level recovery (reload ``last.pt``): the guard already skipped bad
        steps and rolled back bad state, so a NaN last-batch loss or fitness no longer means bad weights.
        Returns False (no epoch re-run); contaminated state is rolled back by the guard."""
        guard, trainer = self._require_guard(), self.trainer
        loss = getattr(trainer, "loss", None)
        loss_nan = isinstance(loss, torch.Tensor) and not bool(torch.isfinite(loss.detach()).all())
        fitness = getattr(trainer, "fitness", None)
        fitness_nan = fitness is not None and not math.isfinite(float(fitness))
        if not (loss_nan or fitness_nan):
            # Ultralytics would not recover either; the state was checked at on_train_epoch_end, before this
            # epoch's validation, and validation changes no weights.
            return False
        dirty = guard.scan_state()
        if dirty:
            guard.check_state(max(guard.step_count - 1, 0))
        guard.journal.record_action(
            guard.run_id, step=guard.step_count, action="ultralytics_recovery_replaced",
            reason="non-finite " + " and ".join(n for n, bad in (("loss", loss_nan), ("fitness", fitness_nan)) if bad),
            detail={"epoch": int(epoch), "state_clean": not dirty},
        )
        return False

    # ------------------------------------------------------------------ checkpoints
    def on_model_save(self, trainer: Any) -> None:
        self.save_guard_state()
        self.guard_checkpoints()

    def save_guard_state(self, *, final: bool = False) -> None:
        """Keep the guard's state (statistics, escalation, probation, LR back-off, position) beside ``last.pt``,
        and beside ``best.pt`` when Ultralytics just wrote it (with ``last.pt``'s bytes, when the fitness is the
        best so far), so that ``resume=True`` goes on with them. Written before the checkpoints are pinned: a
        pin takes its state along, and a dirty checkpoint put back gets the pinned one's state back. ``final``:
        after ``final_eval`` stripped both files, ``best.pt`` gets back the state of the epoch it came from."""
        guard, trainer = self._require_guard(), self.trainer
        state = guard.state_dict()
        best_written = trainer.best_fitness is not None and trainer.best_fitness == getattr(trainer, "fitness", None)
        if best_written and not final:
            self._best_state = state
        pairs = [(Path(trainer.last), state)]
        if (best_written or final) and self._best_state is not None:
            pairs.append((Path(trainer.best), self._best_state))
        for path, saved in pairs:
            if not path.is_file():
                continue
            try:
                save_guard_state(trainer.save_dir, path, saved)
            except (OSError, ValueError) as err:
                log.warning("nanguard: the guard state for %s was not saved: %s", path, err)

    def restore_guard_state(self, ckpt: Path) -> None:
        """On ``resume=True``: load the guard state saved with the checkpoint being resumed. A missing state
        (a run trained without nanguard) starts fresh statistics; a state that does not belong to this
        checkpoint (it was replaced or edited since) is not loaded, and the journal says so."""
        guard = self._require_guard()
        try:
            self._best_state = load_guard_state(self.trainer.save_dir, self.trainer.best)
        except ValueError:
            self._best_state = None  # best.pt was replaced since: its state is unknown, not the last one's
        try:
            state = load_guard_state(self.trainer.save_dir, ckpt)
            if state is None:
                return
            guard.load_state_dict(state)
        except (ValueError, KeyError, TypeError) as err:
            log.warning("nanguard: guard state not restored on resume: %s", err)
            guard.journal.record_action(guard.run_id, step=guard.step_count, action="guard_state_not_restored",
                                        reason=str(err), detail={"checkpoint": str(ckpt)})
            return
        log.info("nanguard: resumed the guard state saved with %s (step %d)", ckpt, guard.step_count)
        guard.journal.record_action(guard.run_id, step=guard.step_count, action="guard_state_restored",
                                    reason=f"resumed from {ckpt.name}", detail={"checkpoint": str(ckpt)})

    def guard_checkpoints(self) -> list[Verdict]:
        """Audit ``last.pt``, ``best.pt`` and this epoch's ``epochN.pt`` when written since the last look;
        pin clean ``last``/``best``, put the pinned copy back over a bad one, quarantine a bad ``epochN``
        (:class:`~nanguard.ckpt.keeper.CheckpointKeeper`)."""
        trainer = self.trainer
        wdir = Path(trainer.wdir)
        candidates: list[tuple[str | Path, str | None]] = [(Path(trainer.last), "last"), (Path(trainer.best), "best")]
        if isinstance(getattr(trainer, "epoch", None), int) and trainer.epoch >= 0:
            candidates.append((wdir / f"epoch{trainer.epoch}.pt", None))
        self._require_guard()
        if self.keeper is None:  # built with the guard
            raise RuntimeError("nanguard: the checkpoint keeper is built at on_pretrain_routine_end")
        verdicts = self.keeper.keep_all(candidates)
        self.verdicts.extend(verdicts)
        return verdicts

    # ------------------------------------------------------------------ end
    def on_train_end(self, trainer: Any) -> None:
        """After ``final_eval`` stripped ``last.pt``/``best.pt``: audit them once more, then close the guard."""
        if self.guard is None:
            return
        self.save_guard_state(final=True)  # final_eval stripped the optimizer: the files (and their sha256) changed
        self.guard_checkpoints()
        self._finished = True
        self.guard.close("finished")

    def teardown(self, trainer: Any) -> None:
        if self.guard is not None:
            self.guard.close("finished" if self._finished else "crashed")

    def _require_guard(self) -> Guard:
        if self.guard is None:
            raise RuntimeError("nanguard: the guard is built at on_pretrain_routine_end; the trainer has not got there")
        return self.guard


def _already_unscaled(optimizer: Any) -> None:
    """Ultralytics' ``scaler.unscale_`` during the guarded step: the guard unscaled the gradients already."""


def _finite_or(value: Any, fallback: Any) -> Any:
    """``value`` where finite, ``fallback`` elsewhere (tensors, on the device); ``value`` when either is no tensor."""
    if not isinstance(value, torch.Tensor) or not isinstance(fallback, torch.Tensor):
        return value
    return torch.where(torch.isfinite(value), value, fallback.to(value.device, value.dtype))


__all__ = ["UltralyticsGuard", "guard", "parse_version", "ultralytics_version", "unwrap_model"]
