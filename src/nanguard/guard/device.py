"""device.py owns the sync-free step engine: the GPU path with no host-device synchronisation per step.

It follows the same :class:`~nanguard.guard.engine.StepEngine` protocol and the same
:class:`~nanguard.guard.control.StepRule` as the eager engine, evaluated on device flags instead of host numbers:
finite micro-batch losses and gradients, no skipping spike. The update is masked with the ``ok`` flag, never
multiplied by it (``0 * NaN`` is NaN): fused optimizers (``fused=True``) receive it as ``found_inf`` (set in
``before``, removed in ``after``) and skip in the kernel, step counts included; other optimizers run normally and
every parameter and state tensor is then selected back (``torch.where``) from a copy taken in ``before``. Buffers
and the nanguard EMA are selected the same way. Each step's values go into a device ring that :meth:`flush` reads
once every ``check_every_steps`` steps — or at the step after one whose flag says it was skipped (CUDA: the flag is
copied to the host without blocking and looked at one step later; CPU: read directly), so a fault is answered
within a step or two instead of skipping every step up to the periodic check.

What differs from the eager engine, on purpose (docs/guard.md):

- the first applied step runs eagerly, because optimizers create their state in their first step;
- escalation (rollback, stop) and LR back-off are decided at the flush, one to ``check_every_steps`` steps late;
  until then the step rule (skip, clip) acts alone;
- the scheduler steps on every call (its decision would need a host read);
- gradient tensor names are not reported (the gradients are gone by the flush); a flush that saw a non-finite
  value scans the state, so contaminated weights or moments are named;
- one incident row per symptom kind and step (the first micro-batch that had it), where the eager engine writes one
  per micro-batch;
- GradScaler is not supported (its ``step`` reads ``found_inf`` on the host); use bf16 autocast.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from nanguard.checks import DeviceRunningStats, Finding, Kind, RunningStats, clip_grads_
from nanguard.distributed import Agreement
from nanguard.ema import EMA
from nanguard.guard.control import Controller
from nanguard.guard.state import TrainingState
from nanguard.guard.step import Judged, Seen, StepVerdict
from nanguard.policy import Action, Decision

COLUMNS = ("loss", "grad_norm", "ok", "loss_spike", "grad_spike", "loss_threshold", "grad_threshold",
           "nonfinite_micro", "spike_micro", "spike_loss", "micro_batches")
"""One ring row per step. ``nonfinite_micro``/``spike_micro``: the first micro-batch with a non-finite loss / a loss
spike (-1: none); ``spike_loss``: that micro-batch's loss."""


class DeviceEngine:
    """The sync-free engine (``policy.sync_free``); the eager engine's statistics are handed over both ways."""

    def __init__(self, state: TrainingState, controller: Controller, agreement: Agreement, *,
                 loss_stats: RunningStats, grad_stats: RunningStats) -> None:
        if state.scaler is not None:
            raise ValueError("sync_free mode does not support a GradScaler (its step reads found_inf on the "
                             "host); train with bf16 autocast, or set sync_free = false")
        if state.ema is not None and not isinstance(state.ema.ema, EMA):
            raise ValueError("sync_free mode needs nanguard.EMA (masked on the device), got "
                             f"{type(state.ema.ema).__name__}")
        if state.loop_ema is not None:
            raise ValueError("sync_free mode cannot mask an EMA the loop updates itself (it would take in a skipped "
                             "update before the device flag undoes it); pass nanguard.EMA as ema=, or set "
                             "sync_free = false")
        optimizer = state.optimizer
        self.fused = bool(optimizer.defaults.get("fused")) and getattr(optimizer, "_step_supports_amp_scaling", False)
        device = state.params[0].device
        if device.type != "cpu" and not self.fused and optimizer.defaults.get("capturable") is False:
            raise ValueError(f"sync_free mode on {device.type} needs the optimizer's state on the device: create "
                             f"{type(optimizer).__name__} with fused=True or capturable=True")
        self.state, self.controller, self.agreement = state, controller, agreement
        self.policy = policy = controller.policy
        self.device = device
        self.host_loss_stats, self.host_grad_stats = loss_stats, grad_stats
        self.loss_stats = DeviceRunningStats(decay=policy.stats_decay, warmup_steps=policy.spike_warmup_steps,
                                             device=device)
        self.grad_stats = DeviceRunningStats(decay=policy.stats_decay, warmup_steps=policy.spike_warmup_steps,
                                             device=device)
        self.ring = torch.zeros((policy.check_every_steps, len(COLUMNS)), dtype=torch.float64, device=device)
        self.seen: list[Seen] = []
        self.live: list[Tensor] | None = None
        self.backup: list[Tensor] = []
        self.active = False
        self.stateless: bool | None = None
        self.inf = torch.full((), math.inf, dtype=torch.float32, device=device)
        self.watch: tuple[Tensor, Any] | None = None  # the last step's ok flag on its way to the host (CUDA)
        self.saw_nonfinite = False
        self.constants: dict[int, tuple[Tensor, Tensor, Tensor]] = {}
        self.flag_on_host: Tensor | None = None  # pinned; copies into it are stream-ordered, read after their event

    def ready(self, applied_updates: int) -> bool:
        """True once an update was applied eagerly, so the optimizer's state exists (and again after a rollback
        to a snapshot taken before the optimizer had any state)."""
        optimizer = self.state.optimizer
        if applied_updates == 0:
            return False
        if self.stateless is None:
            self.stateless = len(optimizer.state) == 0  # SGD without momentum keeps no state at all
        ready = self.stateless or len(optimizer.state) > 0
        if ready and not self.active:
            self.load_stats()
        self.active = ready
        return ready

    # ------------------------------------------------------------------ before the optimizer step
    @torch.no_grad()
    def before(self, seen: Seen, losses: list[Tensor], *, rollback_requested: str | None) -> StepVerdict:
        if rollback_requested is not None:
            raise RuntimeError("a requested rollback is carried out by the eager engine (the Guard flushes first)")
        state, policy, rule = self.state, self.policy, self.controller.rule
        grads = state.grads()
        norm = state.grad_norm(grads).to(self.device)
        measured = self.agreement.agree(torch.stack([*(x.to(self.device, torch.float32) for x in losses), norm]))
        loss_each, norm = measured[:-1], measured[-1]
        loss_finite = loss_each.isfinite()
        norm_finite = norm.isfinite()
        loss_warm, loss_thr = self.loss_stats.threshold(policy.loss_spike_z, policy.spike_min_ratio)
        grad_warm, grad_thr = self.grad_stats.threshold(policy.grad_spike_z, policy.spike_min_ratio)
        spike_each = loss_finite & loss_warm & (loss_each > loss_thr)
        loss_spike = spike_each.any()
        grad_spike = norm_finite & grad_warm & (norm > grad_thr)
        ok = loss_finite.all() & norm_finite
        if Kind.LOSS_SPIKE in rule.skip_kinds:
            ok = ok & ~loss_spike
        if Kind.GRAD_SPIKE in rule.skip_kinds:
            ok = ok & ~grad_spike
        limit = self.inf if rule.max_grad_norm is None else torch.full_like(self.inf, rule.max_grad_norm)
        if rule.clip_on_grad_spike:
            limit = torch.where(grad_spike, torch.minimum(limit, grad_thr.float()), limit)
        if rule.max_grad_norm is not None or rule.clip_on_grad_spike:
            clip_grads_(grads, norm, limit)
        saved_lrs = state.scale_lr(self.controller.lr_scale(seen.step))
        if self.fused:
            # Fused Adam/AdamW/SGD read `found_inf` and skip on the device, step counts included.
            state.optimizer.found_inf = (~ok).float()  # type: ignore[attr-defined]
        else:
            live = self.live_tensors()
            torch._foreach_copy_(self.backup, live)
        index, none, count = self.micro_constants(len(losses))
        nonfinite_micro = torch.where(~loss_finite, index, math.inf).min()
        spike_micro = torch.where(spike_each, index, math.inf).min()
        nonfinite_micro = torch.where(nonfinite_micro.isfinite(), nonfinite_micro, none)
        spike_micro_i = torch.where(spike_micro.isfinite(), spike_micro, none)
        spike_loss = (loss_each.double() * (index == spike_micro_i).double()).nan_to_num().sum()
        loss_sum = loss_each.double().sum()
        row = torch.stack([loss_sum, norm.double(), ok.double(), loss_spike.double(), grad_spike.double(),
                           loss_thr, grad_thr, nonfinite_micro, spike_micro_i, spike_loss, count])
        engine_state = (ok, saved_lrs, loss_each, loss_finite, norm, loss_warm, loss_thr, grad_warm, grad_thr, row)
        return StepVerdict(seen.step, False, None, None, (), None, None, None, seen, engine_state=engine_state)

    # ------------------------------------------------------------------ after the optimizer step
    @torch.no_grad()
    def after(self, verdict: StepVerdict) -> tuple[list[Judged], Decision | None]:
        state, policy = self.state, self.policy
        ok, saved_lrs, loss_each, loss_finite, norm, loss_warm, loss_thr, grad_warm, grad_thr, row = \
            verdict.engine_state
        if self.fused:
            del state.optimizer.found_inf  # type: ignore[attr-defined]
        else:
            for tensor, old in zip(self.live_tensors(), self.backup, strict=True):
                torch.where(ok, tensor, old, out=tensor)
        state.restore_lr(saved_lrs)
        if state.ema is not None:
            ema = state.ema.ema
            assert isinstance(ema, EMA)
            ema.update_masked(state.model, ok)
        if state.scheduler is not None:
            state.scheduler.step()
        if state.buffers:
            state.select_buffers(ok)
        loss_cap = torch.where(loss_warm, loss_thr, math.inf)
        for i in range(loss_each.numel()):
            self.loss_stats.observe(loss_each[i], enter=loss_finite[i], cap=loss_cap)
        self.grad_stats.observe(norm, enter=norm.isfinite(), cap=torch.where(grad_warm, grad_thr, math.inf))
        assert verdict.seen is not None
        self.ring[len(self.seen)].copy_(row)
        self.seen.append(verdict.seen)
        step = verdict.seen.step
        if (len(self.seen) == policy.check_every_steps or (step + 1) % policy.check_every_steps == 0
                or self.skipped_lately(ok)):
            return self.flush()
        return [], None

    def skipped_lately(self, ok: Tensor) -> bool:
        """Whether a recent step's flag says it was skipped, without waiting for the device: on the CPU this step's
        flag is read directly; on CUDA the previous step's flag, copied to pinned memory, is looked at when its
        copy has landed, and this step's copy is started."""
        if ok.device.type == "cpu":
            return not bool(ok)
        skipped = False
        if self.watch is not None:
            host, event = self.watch
            if event.query():
                skipped = not bool(host)
                self.watch = None
        if self.watch is None:
            if self.flag_on_host is None:
                self.flag_on_host = torch.empty((), dtype=torch.bool, pin_memory=True)
            host = self.flag_on_host
            host.copy_(ok, non_blocking=True)
            event = torch.cuda.Event()
            event.record()
            self.watch = (host, event)
        return skipped

    def micro_constants(self, n: int) -> tuple[Tensor, Tensor, Tensor]:
        """Device constants for a step of ``n`` micro-batches (their indices, -1, and ``n``), made once per ``n``:
        no host-to-device copy per step."""
        found = self.constants.get(n)
        if found is None:
            found = (torch.arange(n, dtype=torch.float64, device=self.device),
                     torch.full((), -1.0, dtype=torch.float64, device=self.device),
                     torch.full((), float(n), dtype=torch.float64, device=self.device))
            self.constants[n] = found
        return found

    def live_tensors(self) -> list[Tensor]:
        """Parameters and optimizer state tensors the masked update must be able to put back."""
        if self.live is None:
            self.live = [p.data for p in self.state.params] + self.state.optimizer_tensors()
            self.backup = [t.detach().clone() for t in self.live]
        return self.live

    # ------------------------------------------------------------------ the flush
    def flush(self) -> tuple[list[Judged], Decision | None]:
        """Read the ring (one host sync) and decide each step the device already did: the steps, and the first
        rollback or stop the controller decided (carried out by the caller at the last of them)."""
        if not self.seen:
            return [], None
        rows = self.ring[: len(self.seen)].tolist()
        seen_all, self.seen = self.seen, []
        self.watch = None
        judged: list[Judged] = []
        pending: Decision | None = None
        self.saw_nonfinite = False
        clip = self.policy.max_grad_norm
        for values, seen in zip(rows, seen_all, strict=True):
            row = dict(zip(COLUMNS, values, strict=True))
            findings = row_findings(row)
            self.saw_nonfinite |= any(f.kind in (Kind.NONFINITE_LOSS, Kind.NONFINITE_GRAD) for f in findings)
            seen = Seen(seen.step, seen.epoch, seen.batch_index, row["loss"], row["grad_norm"], seen.sample_ids,
                        seen.loop_step, seen.micro_sample_ids)
            applied = bool(row["ok"])
            if findings:
                decision = self.controller.decide(findings, step=seen.step)
                if decision.action in (Action.ROLLBACK, Action.STOP):
                    pending = pending or decision
            else:
                decision = Decision(Action.CONTINUE, "", clip)
            # The LR of a step already gone by is not known here (a scheduler may have moved it): left out.
            judged.append(Judged(seen, tuple(findings), decision, applied, clip, None))
        self.live = None  # a rollback or a load replaces the optimizer's state tensors: re-collect them
        self.sync_stats()
        return judged, pending

    # ------------------------------------------------------------------ statistics hand-over
    def sync_stats(self) -> None:
        """Copy the device statistics to the host statistics (for ``state_dict``; one sync)."""
        if self.active:
            self.host_loss_stats.load_state_dict(self.loss_stats.state_dict())
            self.host_grad_stats.load_state_dict(self.grad_stats.state_dict())

    def load_stats(self) -> None:
        """Copy the host statistics to the device (after the eager steps, or after a load or rollback)."""
        self.loss_stats.load_state_dict(self.host_loss_stats.state_dict())
        self.grad_stats.load_state_dict(self.host_grad_stats.state_dict())


def row_findings(row: dict[str, float]) -> list[Finding]:
    """The findings one ring row stands for: the same kinds the eager engine finds from the same values."""
    findings = []
    nonfinite_micro = int(row["nonfinite_micro"])
    spike_micro = int(row["spike_micro"])
    several = row["micro_batches"] > 1  # one loss per step: no micro-batch to name, as in the eager engine
    micro = nonfinite_micro if nonfinite_micro >= 0 and several else None
    if not math.isfinite(row["loss"]) or nonfinite_micro >= 0:
        findings.append(Finding(Kind.NONFINITE_LOSS, row["loss"], micro_batch=micro))
    if row["loss_spike"]:
        findings.append(Finding(Kind.LOSS_SPIKE, row["spike_loss"], row["loss_threshold"],
                                micro_batch=spike_micro if spike_micro >= 0 and several else None))
    if not math.isfinite(row["grad_norm"]):
        findings.append(Finding(Kind.NONFINITE_GRAD, row["grad_norm"]))
    if row["grad_spike"]:
        findings.append(Finding(Kind.GRAD_SPIKE, row["grad_norm"], row["grad_threshold"]))
    return findings
