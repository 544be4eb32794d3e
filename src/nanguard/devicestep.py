"""devicestep.py owns the guard's sync-free step: the GPU path with no host-device synchronisation.

Everything a step decides stays on the device as a 0-d ``ok`` flag: finite loss and gradients, no skipped
spike. The update is masked with it, never multiplied by it (``0 * NaN`` is NaN, the bug class of
OLMo-core's skip): fused optimizers (``fused=True``) receive it as ``found_inf`` and skip in the kernel,
including their step counts; other optimizers run normally and every parameter and state tensor is then
selected back (``torch.where``) from a copy taken before the step. Buffers and the nanguard EMA are
selected the same way. Each step's loss, norm and flags go into a device ring; :meth:`DeviceStep.flush`
reads the ring once every ``check_every_steps`` steps (or when the user calls ``Guard.flush``), records
the incidents with their exact steps, lets the policy escalate, and runs the guard's periodic check.

What differs from the eager mode, on purpose:
- the first applied step runs eagerly, because optimizers create their state in their first step;
- escalation (rollback, stop) and LR back-off happen at the flush, up to ``check_every_steps`` late;
- the scheduler steps on every call (its decision would need a host read);
- gradient tensor names are not reported (the gradients are gone by the flush);
- GradScaler is not supported (its ``step`` reads ``found_inf`` on the host); use bf16 autocast.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from nanguard.checks import DeviceRunningStats, Finding, Kind, clip_grads_, named_optimizer_tensors, total_norm
from nanguard.ema import EMA
from nanguard.policy import Action, Decision, decide

if TYPE_CHECKING:
    from nanguard.guard import Guard, StepResult

_COLUMNS = ("loss", "grad_norm", "ok", "loss_spike", "grad_spike", "loss_threshold", "grad_threshold")


class DeviceStep:
    """The sync-free step of one :class:`~nanguard.guard.Guard` (created by it when ``policy.sync_free``)."""

    def __init__(self, guard: Guard) -> None:
        if guard.scaler is not None:
            raise ValueError("sync_free mode does not support a GradScaler (its step reads found_inf on the "
                             "host); train with bf16 autocast, or set sync_free = false")
        if guard.ema is not None and not isinstance(guard.ema.ema, EMA):
            raise ValueError("sync_free mode needs nanguard.EMA (masked on the device), got "
                             f"{type(guard.ema.ema).__name__}")
        optimizer = guard.optimizer
        self.fused = bool(optimizer.defaults.get("fused")) and getattr(optimizer, "_step_supports_amp_scaling", False)
        device = guard._params[0].device
        if device.type != "cpu" and not self.fused and optimizer.defaults.get("capturable") is False:
            raise ValueError(f"sync_free mode on {device.type} needs the optimizer's state on the device: create "
                             f"{type(optimizer).__name__} with fused=True or capturable=True")
        self.guard = guard
        self.device = device
        policy = guard.policy
        self.loss_stats = DeviceRunningStats(decay=policy.stats_decay, warmup_steps=policy.spike_warmup_steps,
                                             device=device)
        self.grad_stats = DeviceRunningStats(decay=policy.stats_decay, warmup_steps=policy.spike_warmup_steps,
                                             device=device)
        self.ring = torch.zeros((policy.check_every_steps, len(_COLUMNS)), dtype=torch.float64, device=device)
        self.positions: list[tuple[int, int | None, int | None, Any]] = []
        self._live: list[Tensor] | None = None
        self._backup: list[Tensor] = []
        self._ready = False
        self._stateless: bool | None = None
        self.inf = torch.full((), math.inf, dtype=torch.float32, device=device)

    def ready(self) -> bool:
        """True once an update was applied eagerly, so the optimizer's state exists (and again after a
        rollback to a snapshot taken before the optimizer had any state)."""
        optimizer = self.guard.optimizer
        if self.guard.applied_updates == 0:
            return False
        if self._stateless is None:
            self._stateless = len(optimizer.state) == 0  # SGD without momentum keeps no state at all
        ready = self._stateless or len(optimizer.state) > 0
        if ready and not self._ready:
            self.load_stats()
        self._ready = ready
        return ready

    # ------------------------------------------------------------------ the step
    @torch.no_grad()
    def step(self, loss_t: Tensor, sample_ids: Any, step: int) -> StepResult:
        from nanguard.guard import StepResult

        guard, policy = self.guard, self.guard.policy
        grads = guard._grads()
        norm = total_norm(grads).to(self.device)
        loss = loss_t.to(device=norm.device, dtype=torch.float32)
        finite = loss.isfinite() & norm.isfinite()
        loss_warm, loss_thr = self.loss_stats.threshold(policy.loss_spike_z, policy.spike_min_ratio)
        grad_warm, grad_thr = self.grad_stats.threshold(policy.grad_spike_z, policy.spike_min_ratio)
        loss_spike = finite & loss_warm & (loss > loss_thr)
        grad_spike = finite & grad_warm & (norm > grad_thr)
        ok = finite
        if policy.on_loss_spike == "skip":
            ok = ok & ~loss_spike
        if policy.on_grad_spike == "skip":
            ok = ok & ~grad_spike
        limit = self.inf if policy.max_grad_norm is None else torch.full_like(self.inf, policy.max_grad_norm)
        if policy.on_grad_spike == "clip":
            limit = torch.where(grad_spike, torch.minimum(limit, grad_thr.float()), limit)
        if policy.max_grad_norm is not None or policy.on_grad_spike == "clip":
            clip_grads_(grads, norm, limit)

        self._masked_update(ok, step)
        if guard.ema is not None:
            ema = guard.ema.ema
            assert isinstance(ema, EMA)
            ema.update_masked(guard.model, ok)
        if guard.scheduler is not None:
            guard.scheduler.step()
        self.loss_stats.observe(loss, enter=loss.isfinite(), cap=torch.where(loss_warm, loss_thr, math.inf))
        self.grad_stats.observe(norm, enter=norm.isfinite(), cap=torch.where(grad_warm, grad_thr, math.inf))
        row = torch.stack([loss.double(), norm.double(), ok.double(), loss_spike.double(), grad_spike.double(),
                           loss_thr, grad_thr])
        self.ring[len(self.positions)].copy_(row)
        self.positions.append((step, guard.epoch, guard.batch_index, sample_ids))
        guard.optimizer.zero_grad(set_to_none=True)
        if len(self.positions) == policy.check_every_steps or (step + 1) % policy.check_every_steps == 0:
            self.flush()
        return StepResult(step, None, None)

    def _masked_update(self, ok: Tensor, step: int) -> None:
        guard = self.guard
        saved_lrs = guard._scale_lr(guard.lr_backoff.scale(step))
        try:
            if self.fused:
                # Fused Adam/AdamW/SGD read `found_inf` and skip on the device, step counts included.
                guard.optimizer.found_inf = (~ok).float()  # type: ignore[attr-defined]
                try:
                    guard.optimizer.step()
                finally:
                    del guard.optimizer.found_inf  # type: ignore[attr-defined]
            else:
                live = self._live_tensors()
                torch._foreach_copy_(self._backup, live)
                guard.optimizer.step()
                for tensor, old in zip(live, self._backup, strict=True):
                    torch.where(ok, tensor, old, out=tensor)
        finally:
            guard._restore_lr(saved_lrs)
        if guard._buffers:
            for buf, old in zip(guard._buffers, guard._buffer_backup, strict=True):
                torch.where(ok, buf, old, out=buf)
            guard._save_buffers()

    def _live_tensors(self) -> list[Tensor]:
        """Parameters and optimizer state tensors the masked update must be able to put back."""
        if self._live is None:
            state = [t for _, t in named_optimizer_tensors(self.guard.optimizer, self.guard._param_names)]
            self._live = [p.data for p in self.guard._params] + state
            self._backup = [t.detach().clone() for t in self._live]
        return self._live

    # ------------------------------------------------------------------ the flush
    def flush(self) -> list[Any]:
        """Read the ring (one host sync), record its incidents, escalate, then run the periodic check."""
        guard, policy = self.guard, self.guard.policy
        if not self.positions:
            return []
        from nanguard.guard import Seen

        rows = self.ring[: len(self.positions)].tolist()
        positions, self.positions = self.positions, []
        before = len(guard.incidents)
        pending: Decision | None = None
        last_step = positions[-1][0]
        for values, (step, epoch, batch_index, sample_ids) in zip(rows, positions, strict=True):
            row = dict(zip(_COLUMNS, values, strict=True))
            findings = self._row_findings(row)
            # The LR of a step already gone by is not known here (a scheduler may have moved it): left out.
            guard.note_metrics(Seen(step, epoch, batch_index, row["loss"], row["grad_norm"]), applied=bool(row["ok"]),
                               clip_threshold=policy.max_grad_norm, lr=None)
            if findings:
                decision = decide(policy, findings, guard.escalation, step=step)
                done = decision
                if decision.action in (Action.ROLLBACK, Action.STOP):
                    pending = pending or decision
                    done = Decision(Action.SKIP, decision.reason)  # what the device already did
                seen = Seen(step, epoch, batch_index, row["loss"], row["grad_norm"], sample_ids)
                guard._record(seen, done, findings, applied=bool(row["ok"]))
            if pending is None or findings:
                guard._follow_probation(step, had_incident=bool(findings))
        self._live = None  # a rollback or a load replaces the optimizer's state tensors: re-collect them
        if pending is not None:
            guard._roll_back_or_stop(last_step, pending)
        else:
            guard.check_state(last_step)
        self.sync_stats()
        return guard.incidents[before:]

    def _row_findings(self, row: dict[str, float]) -> list[Finding]:
        findings = []
        if not math.isfinite(row["loss"]):
            findings.append(Finding(Kind.NONFINITE_LOSS, row["loss"]))
        if not math.isfinite(row["grad_norm"]):
            findings.append(Finding(Kind.NONFINITE_GRAD, row["grad_norm"]))
        if row["loss_spike"]:
            findings.append(Finding(Kind.LOSS_SPIKE, row["loss"], row["loss_threshold"]))
        if row["grad_spike"]:
            findings.append(Finding(Kind.GRAD_SPIKE, row["grad_norm"], row["grad_threshold"]))
        return findings

    # ------------------------------------------------------------------ statistics hand-over
    def sync_stats(self) -> None:
        """Copy the device statistics to the guard's host statistics (for ``state_dict``; one sync)."""
        if self._ready:
            self.guard.loss_stats.load_state_dict(self.loss_stats.state_dict())
            self.guard.grad_stats.load_state_dict(self.grad_stats.state_dict())

    def load_stats(self) -> None:
        """Copy the guard's host statistics to the device (after the eager steps, or after a load)."""
        self.loss_stats.load_state_dict(self.guard.loss_stats.state_dict())
        self.grad_stats.load_state_dict(self.guard.grad_stats.state_dict())
