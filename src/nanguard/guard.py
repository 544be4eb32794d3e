"""guard.py owns the Guard: the per-step engine of check → decide → act → record for any training loop.

The guard owns the optimizer step. A nanoGPT-style loop adopts it with three changed lines::

    guard = Guard(model, optimizer, run_dir="out")          # 1: after the optimizer is built
    for epoch in range(epochs):
        for i, (x, y) in enumerate(loader):
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            guard.step(loss, epoch=epoch, batch_index=i)    # 2: replaces optimizer.step(); zero_grad()
    guard.close()                                           # 3: marks the run finished in the journal

Every step it reads the loss and the total gradient norm (one fused norm; one host read in the default
eager mode, none in the sync-free mode), judges spikes against running statistics that a non-finite
value never enters, and applies, clips or skips the update. A skipped update leaves weights, buffers,
optimizer state, EMA, scheduler and GradScaler exactly as they were. At the end of every
``check_every_steps`` steps it scans weights, buffers, EMA and optimizer state: clean, it keeps a snapshot
(recovery.py); contaminated, it rolls back to one — and when the loop iterates ``guard.batches(loader)``,
the data is rewound too, so replay is exact. Every incident is committed to the run's journal before the
step returns.
"""

from __future__ import annotations

import logging
import math
import os
import time
import weakref
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from nanguard.checks import (
    Finding,
    Kind,
    RunningStats,
    clip_grads_,
    loss_value_check,
    named_model_tensors,
    named_optimizer_tensors,
    nonfinite_names,
    total_norm,
)
from nanguard.ema import EMAAdapter
from nanguard.errors import TrainingStopped
from nanguard.journal import IncidentRecord, Journal, MetricRecord
from nanguard.policy import Action, Decision, Escalation, LRBackoff, Policy, decide
from nanguard.runs.lock import guard_lock
from nanguard.snapshot import Stateful

if TYPE_CHECKING:
    from nanguard.data import Batch

log = logging.getLogger(__name__)

METRICS_FLUSH_ROWS = 512
"""Per-step metrics are written to the journal in batches of this many rows (one transaction, one fsync) ..."""
METRICS_FLUSH_SECONDS = 15.0
"""... or when this much time passed since the last batch, so ``nanguard status`` stays current on slow steps."""


@dataclass(frozen=True)
class StepResult:
    """What the guard did with one step. ``action`` and ``applied`` are ``None`` in the sync-free mode,
    where the answer stays on the device until the next flush."""

    step: int
    action: Action | None
    applied: bool | None
    loss: float | None = None
    grad_norm: float | None = None
    findings: tuple[Finding, ...] = ()


@dataclass(frozen=True)
class Seen:
    """Where one step was and what it measured: what the journal records with each of its incidents."""

    step: int
    epoch: int | None
    batch_index: int | None
    loss: float | None = None
    grad_norm: float | None = None
    sample_ids: Any = None


class Guard:
    """Check → decide → act → record around the optimizer step of one model and one optimizer.

    Args:
        model: the model being trained.
        optimizer: its optimizer; every parameter it holds must belong to ``model``.
        run_dir: the run folder; the journal goes to ``<run_dir>/.nanguard/journal.db``.
        policy: a :class:`Policy`, a path to a policy TOML file, or ``None`` for the policy found in the
            current folder (``nanguard.toml`` or ``[tool.nanguard]`` in ``pyproject.toml``) or the defaults.
        scaler: a ``torch.amp.GradScaler`` when training with fp16 autocast; the guard then calls
            ``unscale_``, ``step`` and ``update`` itself.
        scheduler: an LR scheduler the guard should step after each applied update (leave it out if the
            loop sets the LR itself).
        ema: an EMA of the weights, updated after each applied update and scanned with the state.
        rank: this process's rank, recorded with each incident (defaults to torch.distributed's rank).
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        *,
        run_dir: str | Path,
        policy: Policy | str | Path | None = None,
        scaler: torch.amp.GradScaler | None = None,
        scheduler: Any = None,
        ema: Any = None,
        rank: int | None = None,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
        if isinstance(policy, str | Path):
            policy = Policy.from_file(policy)
        self.policy = policy if policy is not None else Policy.discover(Path.cwd())
        self.model, self.optimizer, self.scaler, self.scheduler = model, optimizer, scaler, scheduler
        self.ema = EMAAdapter(ema) if ema is not None else None
        self._param_names = {id(p): name for name, p in model.named_parameters()}
        self._params = _check_optimizer_params(model, optimizer, self._param_names)
        self._buffers = [b for b in model.buffers()]
        self._buffer_backup = [b.detach().clone() for b in self._buffers]
        self.rank = rank if rank is not None else _default_rank()
        self._device_mode = None
        if self.policy.sync_free:
            from nanguard.devicestep import DeviceStep  # the GPU path lives in its own module

            self._device_mode = DeviceStep(self)

        self.step_count = 0
        self.epoch: int | None = None
        self.batch_index: int | None = None
        self.loss_stats = RunningStats(decay=self.policy.stats_decay, warmup_steps=self.policy.spike_warmup_steps)
        self.grad_stats = RunningStats(decay=self.policy.stats_decay, warmup_steps=self.policy.spike_warmup_steps)
        self.escalation = Escalation()
        self.lr_backoff = LRBackoff()
        self.skipped_steps = 0
        self.applied_updates = 0
        self.incidents: list[IncidentRecord] = []

        # Buffers that are already non-finite are constants (a causal mask of -inf), not damage: they are
        # left out of every scan. Parameters and optimizer state must start finite.
        self._constant_buffers = set(nonfinite_names((n, b) for n, b in model.named_buffers()))
        if self._constant_buffers:
            log.info("nanguard: buffers non-finite from the start, not scanned: %s", sorted(self._constant_buffers))
        dirty = self.scan_state()
        if dirty:
            names = ", ".join(t for f in dirty for t in f.tensors)
            raise ValueError(f"the training state already holds non-finite values before the first step: {names}")
        # A Guard is its run folder's one in-process writer for its life: it writes the journal, disk snapshots and
        # (integrations) the framework's checkpoints. A second Guard on the folder (another process, or one of
        # this process not closed) and `nanguard rollback`/`undo` are refused while it lives, before anything
        # is written: two snapshot rotations would delete each other's files, and a rollback would rewrite
        # files under a live training. Its own lock, not the run lock, so `nanguard run -- python train.py`
        # (the supervisor holds the run lock) does not refuse its own guarded child; the kernel drops it when
        # the process dies, and close() (or garbage collection of an unclosed Guard) releases it. See
        # nanguard.runs.lock.
        self._folder_lock = guard_lock(run_dir, f"Guard in pid {os.getpid()}")
        weakref.finalize(self, self._folder_lock.release)
        try:
            self.journal = Journal(run_dir)
        except BaseException:
            self._folder_lock.release()
            raise
        self.run_id = self.journal.start_run(policy=self.policy.to_dict(), rank=self.rank,
                                             torch_version=torch.__version__)
        from nanguard.recovery import Recovery  # snapshots, rollback and resume

        self.recovery = Recovery(self, run_dir)
        self.recovery.snapshot(0)
        self._rollback_requested: str | None = None
        self._closed = False
        self.checked_since_last_step = True
        """Whether :meth:`check_state` ran after the last step: an integration's epoch-end check skips a repeat."""
        self._metrics: list[MetricRecord] = []
        self._metrics_written_at = time.monotonic()

    # ------------------------------------------------------------------ the loop's data
    def batches(self, loader: Any, *, epochs: int | None = None) -> Iterator[Batch]:
        """Iterate ``loader`` through the guard, so a rollback can rewind the data exactly::

            for batch in guard.batches(loader, epochs=10):
                x, y = batch.data
                ...
                guard.step(loss)            # epoch, batch index and sample ids come from the batch

        Yields :class:`~nanguard.data.Batch` (``data``, ``epoch``, ``index``, ``sample_ids``) for ``epochs``
        epochs (``None``: until the loop stops). Skipped windows are never loaded.
        """
        return self.recovery.batches(loader, epochs=epochs)

    def resume(self) -> int | None:
        """Restore the newest clean snapshot on disk (``disk_snapshot_every_steps`` writes them): model,
        optimizer, scheduler, scaler, EMA, RNG streams, the guard's state and the data position. Returns
        the step training continues from, or ``None`` when the run folder has no snapshot (a fresh start).
        Call it after constructing the guard and before iterating ``guard.batches``."""
        step = self.recovery.resume()
        if step is not None:
            self.journal.record_action(self.run_id, step=step, action="resume", reason="resumed from disk",
                                       detail={"step": step})
        return step

    def request_rollback(self, reason: str = "requested by the user") -> None:
        """Roll back at the next step (a user trigger, e.g. from a validation callback)."""
        self._rollback_requested = reason

    # ------------------------------------------------------------------ the step
    def step(
        self,
        loss: Tensor,
        *,
        epoch: int | None = None,
        batch_index: int | None = None,
        sample_ids: Any = None,
    ) -> StepResult:
        """Check this step's loss and gradients, then apply, clip or skip the update, and zero the
        gradients. Call it after ``loss.backward()`` (``scaler.scale(loss).backward()`` under AMP).

        Args:
            loss: the loss the gradients came from (one element; detached here).
            epoch: the epoch; when it changes the batch index restarts at 0.
            batch_index: the batch's index in the epoch; counted by the guard when left out.
            sample_ids: identifiers of the batch's samples (indices, file names), recorded with incidents.
        """
        loss_t = loss_value_check(loss)
        current = self.recovery.current
        if current is not None and epoch is None and batch_index is None:
            epoch, batch_index = current.epoch, current.index
            sample_ids = current.sample_ids if sample_ids is None else sample_ids
        self._advance_position(epoch, batch_index)
        self.checked_since_last_step = False
        step = self.step_count
        self.step_count = step + 1  # the next step, unless a rollback rewinds it
        if self._device_mode is not None and self._device_mode.ready():
            return self._device_mode.step(loss_t, sample_ids, step)
        return self._eager_step(loss_t, sample_ids, step)

    def _eager_step(self, loss_t: Tensor, sample_ids: Any, step: int) -> StepResult:
        policy = self.policy
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        grads = self._grads()
        norm_t = total_norm(grads)
        # The one host read of the step: loss and gradient norm together.
        loss_v, norm_v = torch.stack([loss_t.float().to(norm_t.device), norm_t]).tolist()
        findings: list[Finding] = []
        loss_ok, grads_ok = math.isfinite(loss_v), math.isfinite(norm_v)
        if not loss_ok:
            findings.append(Finding(Kind.NONFINITE_LOSS, loss_v))
        if not grads_ok:
            kind = Kind.AMP_OVERFLOW if self.scaler is not None and loss_ok else Kind.NONFINITE_GRAD
            findings.append(Finding(kind, norm_v, tensors=tuple(self._nonfinite_grad_names())))
        loss_thr = self.loss_stats.threshold(policy.loss_spike_z, policy.spike_min_ratio)
        grad_thr = self.grad_stats.threshold(policy.grad_spike_z, policy.spike_min_ratio)
        if loss_ok and loss_thr is not None and loss_v > loss_thr:
            findings.append(Finding(Kind.LOSS_SPIKE, loss_v, loss_thr))
        if grads_ok and grad_thr is not None and norm_v > grad_thr:
            findings.append(Finding(Kind.GRAD_SPIKE, norm_v, grad_thr))

        if not loss_ok or (not grads_ok and self.scaler is None):
            # This step will not be applied: put back buffers its forward changed (BatchNorm statistics
            # computed from a NaN batch), then look at the state to tell a bad batch from bad state.
            self._restore_buffers()
            findings.extend(self.scan_state())

        decision = decide(policy, findings, self.escalation, step=step)
        if self._rollback_requested is not None and decision.action is not Action.STOP:
            decision = Decision(Action.ROLLBACK, self._rollback_requested)
            self._rollback_requested = None
        applied = self._act(step, decision, grads, norm_t, norm_v, grads_ok)
        if decision.action is not Action.ROLLBACK:
            if loss_ok:
                self.loss_stats.observe(loss_v, cap=loss_thr)
            if grads_ok:
                self.grad_stats.observe(norm_v, cap=grad_thr)
        seen = Seen(step, self.epoch, self.batch_index, loss_v, norm_v, sample_ids)
        self.note_metrics(seen, clip_threshold=decision.clip_to, lr=self._applied_lr(step), applied=applied)
        late = self._conclude(seen, decision, findings, applied=applied)
        if late:  # the periodic check at the end of this step found contaminated state and rolled back
            return StepResult(step, Action.ROLLBACK, False, loss_v, norm_v, (*findings, *late))
        return StepResult(step, decision.action, applied, loss_v, norm_v, tuple(findings))

    def _conclude(
        self, seen: Seen, decision: Decision, findings: list[Finding], *, applied: bool, periodic_check: bool = True
    ) -> list[Finding]:
        """Record the step, carry out a rollback or stop, follow probation, and at the end of every
        ``check_every_steps`` steps scan the state: clean → snapshot, contaminated → roll back. Returns the
        findings of that scan when it rolled back."""
        step = seen.step
        self._record(seen, decision, findings, applied=applied)
        self._follow_probation(step, had_incident=bool(findings))  # before a rollback: a failure raises its level
        if decision.action in (Action.ROLLBACK, Action.STOP):
            self._roll_back_or_stop(step, decision)
            return []
        if periodic_check and (step + 1) % self.policy.check_every_steps == 0:
            return self.check_state(step)
        return []

    def _follow_probation(self, step: int, *, had_incident: bool) -> None:
        event = self.escalation.after_step(step, had_incident=had_incident)
        if event is not None:
            escalation = self.escalation
            self.journal.record_action(self.run_id, step=step, action=event, reason="", detail={
                "level": escalation.level, "rollbacks_without_progress": escalation.rollbacks_without_progress})

    def check_state(self, step: int) -> list[Finding]:
        """The periodic check at the end of ``step``: scan weights, buffers, EMA and optimizer state; keep
        a snapshot when clean, roll back (or stop) when not. Returns what the scan found."""
        dirty = self.scan_state()
        self.checked_since_last_step = True  # clean now, or about to be rolled back to a clean snapshot
        if not dirty:
            self.recovery.snapshot(step + 1)
            self.escalation.note_clean_check()
            return []
        decision = decide(self.policy, dirty, self.escalation, step=step)
        self._record(Seen(step, self.epoch, self.batch_index), decision, dirty, applied=False)
        self._roll_back_or_stop(step, decision)
        return dirty

    def _roll_back_or_stop(self, step: int, decision: Decision) -> None:
        self._write_metrics()  # the curve up to the rollback is on disk before the steps are rewound
        if decision.action is Action.STOP:
            self.journal.record_action(self.run_id, step=step, action="stop", reason=decision.reason, detail={})
            self.close(status="stopped")
            raise TrainingStopped(f"nanguard stopped training at step {step}: {decision.reason}", self.report())
        self._reset_scaler_stage()
        self.optimizer.zero_grad(set_to_none=True)
        detail = self.recovery.rollback(step, decision.reason)
        self.journal.record_action(self.run_id, step=step, action="rollback", reason=decision.reason, detail=detail)

    # ------------------------------------------------------------------ acting
    def _act(
        self, step: int, decision: Decision, grads: list[Tensor], norm_t: Tensor, norm_v: float, grads_ok: bool
    ) -> bool:
        """Carry out a decision; return whether the update was applied."""
        applied = False
        if decision.action in (Action.CONTINUE, Action.CLIP):
            if decision.clip_to is not None:  # always, like clip_grad_norm_: the same bits as the sync-free path
                limit = torch.tensor(decision.clip_to, dtype=torch.float32, device=norm_t.device)
                clip_grads_(grads, norm_t, limit)
            # Under AMP, non-finite gradients at a finite loss are GradScaler's ordinary overflow: its
            # step() skips the update and update() lowers the scale, as it always does.
            applied = self._apply_update(step, grads_ok)
            if not applied:
                self._restore_buffers()
        elif decision.action is Action.SKIP:
            self._restore_buffers()
            self._reset_scaler_stage()
        self.optimizer.zero_grad(set_to_none=True)
        if applied:
            self._save_buffers()
        return applied

    def _apply_update(self, step: int, grads_ok: bool) -> bool:
        saved_lrs = self._scale_lr(self.lr_backoff.scale(step))
        try:
            if self.scaler is not None and grads_ok:
                # unscale_ already recorded this step's found_inf and the host read showed every gradient
                # finite (a finite norm has no NaN/Inf element), so GradScaler.step would only read found_inf
                # back — a second device sync per step — and then call optimizer.step(): do that directly.
                # update() reads the recorded found_inf (zero) as usual.
                self.optimizer.step()
                self.scaler.update()
            elif self.scaler is not None:
                self.scaler.step(self.optimizer)
                self.scaler.update()
            else:
                self.optimizer.step()
        finally:
            self._restore_lr(saved_lrs)
        applied = grads_ok or self.scaler is None
        self.applied_updates += applied
        if applied:
            if self.ema is not None:
                self.ema.update(self.model)
            if self.scheduler is not None:
                self.scheduler.step()
        return applied

    def _scale_lr(self, scale: float) -> list[Any] | None:
        # The LR is scaled around the optimizer step only, so schedulers and loops that set the LR
        # themselves see their own values.
        if scale == 1.0:
            return None
        saved = [group["lr"] for group in self.optimizer.param_groups]
        for group in self.optimizer.param_groups:
            group["lr"] = group["lr"] * scale
        return saved

    def _applied_lr(self, step: int) -> float | None:
        # A Python number read from the param group, times the back-off scale: no device sync. A tensor LR
        # (capturable optimizers) is left out rather than read from the device.
        lr = self.optimizer.param_groups[0].get("lr")
        if isinstance(lr, Tensor):
            lr = lr.item() if lr.device.type == "cpu" else None
        return None if lr is None else float(lr) * self.lr_backoff.scale(step)

    def _restore_lr(self, saved: list[Any] | None) -> None:
        if saved is not None:
            for group, lr in zip(self.optimizer.param_groups, saved, strict=True):
                group["lr"] = lr

    def _reset_scaler_stage(self) -> None:
        # After unscale_, GradScaler expects step() and update(). A skipped step calls neither, so the
        # scaler's scale and growth tracker stay as they were; only its per-step bookkeeping is cleared,
        # exactly as update() would clear it (torch.amp.GradScaler._per_optimizer_states).
        if self.scaler is not None:
            self.scaler._per_optimizer_states.pop(id(self.optimizer), None)

    @torch.no_grad()
    def _save_buffers(self) -> None:
        if self._buffers:
            torch._foreach_copy_(self._buffer_backup, self._buffers)

    @torch.no_grad()
    def _restore_buffers(self) -> None:
        if self._buffers:
            torch._foreach_copy_(self._buffers, self._buffer_backup)

    # ------------------------------------------------------------------ recording
    def _record(self, seen: Seen, decision: Decision, findings: list[Finding], *, applied: bool) -> None:
        step, epoch, batch_index = seen.step, seen.epoch, seen.batch_index
        for finding in _one_symptom(findings):
            action = decision.action.value
            if finding.kind is Kind.AMP_OVERFLOW and not applied:
                action = "scaler_skip"
            incident = IncidentRecord(
                kind=finding.kind.value, step=step, action=action, epoch=epoch,
                batch_index=batch_index, sample_ids=_plain_ids(seen.sample_ids), rank=self.rank,
                loss=seen.loss, grad_norm=seen.grad_norm, value=finding.value, threshold=finding.threshold,
                tensors=finding.tensors,
            )
            self.incidents.append(incident)
            self.journal.record_incident(self.run_id, incident)
            log.warning("nanguard: %s at step %d (epoch %s, batch %s): %s", finding.kind.value, step,
                        epoch, batch_index, action)
        if decision.action is Action.SKIP:
            self.skipped_steps += 1
        if decision.action in (Action.ROLLBACK, Action.STOP):
            return  # a rollback starts its own back-off
        kinds = {f.kind.value for f in findings}
        triggers = set(self.policy.lr_backoff_on)
        if decision.action.value in triggers or kinds & triggers:
            self.lr_backoff.start(step + 1, self.policy)
            self.journal.record_action(
                self.run_id, step=step, action="lr_backoff", reason=decision.reason or ", ".join(sorted(kinds)),
                detail={"factor": self.policy.lr_backoff_factor, "probation_steps": self.policy.lr_probation_steps,
                        "recovery_steps": self.policy.lr_recovery_steps},
            )

    def note_metrics(self, seen: Seen, *, clip_threshold: float | None, lr: float | None, applied: bool) -> None:
        """Buffer what one step measured; the buffer goes to the journal's ``metrics`` table in batches."""
        self._metrics.append(MetricRecord(
            step=seen.step, epoch=seen.epoch, batch_index=seen.batch_index, loss=seen.loss, grad_norm=seen.grad_norm,
            clip_threshold=clip_threshold, lr=lr, applied=applied, wall_time=time.time()))
        if (len(self._metrics) >= METRICS_FLUSH_ROWS
                or time.monotonic() - self._metrics_written_at >= METRICS_FLUSH_SECONDS):
            self._write_metrics()

    def _write_metrics(self) -> None:
        rows, self._metrics = self._metrics, []
        self._metrics_written_at = time.monotonic()
        if rows:
            self.journal.record_metrics(self.run_id, rows)

    def report(self) -> list[str]:
        """One line per incident of this process, oldest first."""
        return [
            f"step {i.step} (epoch {i.epoch}, batch {i.batch_index}): {i.kind} -> {i.action}"
            + (f" [{', '.join(i.tensors)}]" if i.tensors else "")
            for i in self.incidents
        ]

    # ------------------------------------------------------------------ state
    def scan_state(self) -> list[Finding]:
        """Look for non-finite values in weights and buffers, the EMA and the optimizer state; one finding
        per place that has any, naming the tensors. Reads flags on the host (one sync)."""
        findings = []
        model_bad = [n for n in nonfinite_names(named_model_tensors(self.model)) if n not in self._constant_buffers]
        if model_bad:
            findings.append(Finding(Kind.NONFINITE_MODEL, tensors=tuple(model_bad)))
        if self.ema is not None:
            ema_bad = [n for n in nonfinite_names(named_model_tensors(self.ema.module, prefix="ema."))
                       if n.removeprefix("ema.") not in self._constant_buffers]
            if ema_bad:
                findings.append(Finding(Kind.NONFINITE_EMA, tensors=tuple(ema_bad)))
        opt_bad = nonfinite_names(named_optimizer_tensors(self.optimizer, self._param_names))
        if opt_bad:
            findings.append(Finding(Kind.NONFINITE_OPTIMIZER, tensors=tuple("optimizer." + n for n in opt_bad)))
        return findings

    def _stateful(self) -> dict[str, Stateful]:
        components: dict[str, Stateful] = {"model": self.model, "optimizer": self.optimizer}
        if self.ema is not None:
            components["ema"] = self.ema.ema if hasattr(self.ema.ema, "state_dict") else self.ema.module
        if self.scaler is not None:
            components["scaler"] = self.scaler
        if self.scheduler is not None:
            components["scheduler"] = self.scheduler
        return components

    def _grads(self) -> list[Tensor]:
        return [p.grad for p in self._params if p.grad is not None]

    def _nonfinite_grad_names(self) -> list[str]:
        named = ((self._param_names[id(p)], p.grad) for p in self._params if p.grad is not None)
        return nonfinite_names(named)

    def _advance_position(self, epoch: int | None, batch_index: int | None) -> None:
        if epoch is not None and epoch != self.epoch:
            self.epoch = epoch
            self.batch_index = None
        if batch_index is not None:
            self.batch_index = batch_index
        else:
            self.batch_index = 0 if self.batch_index is None else self.batch_index + 1

    def _position_state(self) -> dict[str, Any]:
        """What a snapshot keeps of the guard: where training is and the statistics its decisions use."""
        if self._device_mode is not None:
            self._device_mode.sync_stats()
        return {
            "version": 2, "step": self.step_count, "epoch": self.epoch, "batch_index": self.batch_index,
            "skipped_steps": self.skipped_steps, "loss_stats": self.loss_stats.state_dict(),
            "grad_stats": self.grad_stats.state_dict(), "escalation": self.escalation.state_dict(),
            "lr_backoff": self.lr_backoff.state_dict(),
        }

    def _load_position_state(self, state: dict[str, Any], *, history: bool = False) -> None:
        """Load :meth:`_position_state`. A rollback keeps the escalation history and starts its own LR
        back-off (``history=False``); resuming from disk restores them too."""
        if state.get("version") != 2:
            raise ValueError(f"Guard.load_state_dict: unknown state version {state.get('version')!r}")
        self.step_count, self.epoch, self.batch_index = state["step"], state["epoch"], state["batch_index"]
        self.skipped_steps = state["skipped_steps"]
        self.loss_stats.load_state_dict(state["loss_stats"])
        self.grad_stats.load_state_dict(state["grad_stats"])
        if history:
            self.escalation.load_state_dict(state["escalation"])
            self.lr_backoff.load_state_dict(state["lr_backoff"])
        if self._device_mode is not None:
            self._device_mode.load_stats()

    def state_dict(self) -> dict[str, Any]:
        """The guard's own state (position, statistics, escalation, LR back-off); not the model's."""
        return self._position_state()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._load_position_state(state, history=True)

    # ------------------------------------------------------------------ lifecycle
    def flush(self) -> list[IncidentRecord]:
        """Sync-free mode: read the device flags of the steps since the last flush and record their
        incidents now (one host sync). In the eager mode incidents are already recorded; returns []."""
        if self._device_mode is None:
            return []
        return self._device_mode.flush()

    def close(self, status: str = "finished") -> None:
        """Flush, mark the run ended in the journal and close it. Idempotent."""
        if self._closed:
            return
        self._closed = True
        if self._device_mode is not None and status == "finished":
            self._device_mode.flush()
        self._write_metrics()
        self.journal.end_run(self.run_id, status)
        self.journal.close()
        self._folder_lock.release()

    def __enter__(self) -> Guard:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        self.close("finished" if exc_type is None else "crashed")


def _check_optimizer_params(
    model: nn.Module, optimizer: torch.optim.Optimizer, names: dict[int, str]
) -> list[nn.Parameter]:
    if not names:
        raise ValueError("model has no parameters: there is nothing to guard")
    params = [p for group in optimizer.param_groups for p in group["params"]]
    if not params:
        raise ValueError("optimizer holds no parameters")
    foreign = [p for p in params if id(p) not in names]
    if len(foreign) == len(params):
        raise ValueError("optimizer does not hold the model's parameters (none of its tensors belong to the model)")
    if foreign:
        raise ValueError(f"optimizer holds {len(foreign)} tensors that are not parameters of the model")
    return params


_SYMPTOM_ORDER = (Kind.NONFINITE_LOSS, Kind.NONFINITE_GRAD, Kind.AMP_OVERFLOW, Kind.LOSS_SPIKE, Kind.GRAD_SPIKE)


def _one_symptom(findings: list[Finding]) -> list[Finding]:
    """One journal row per step for the step's symptom (a NaN loss also makes every gradient NaN; a loss
    spike comes with a gradient spike): the first of _SYMPTOM_ORDER, plus each contaminated-state finding,
    which names its own tensors."""
    symptoms = [f for f in findings if f.kind in _SYMPTOM_ORDER]
    symptoms.sort(key=lambda f: _SYMPTOM_ORDER.index(f.kind))
    return symptoms[:1] + [f for f in findings if f.kind not in _SYMPTOM_ORDER]


def _default_rank() -> int:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank()
    return 0


def _plain_ids(sample_ids: Any) -> list[Any] | None:
    """Sample ids as a JSON-friendly list (tensors and numpy arrays become lists of numbers)."""
    if sample_ids is None:
        return None
    if isinstance(sample_ids, Tensor):
        return list(sample_ids.detach().cpu().reshape(-1).tolist())
    if hasattr(sample_ids, "tolist"):
        return list(sample_ids.tolist())
    if isinstance(sample_ids, str | int):
        return [sample_ids]
    return [x if isinstance(x, str | int | float) else str(x) for x in sample_ids]
