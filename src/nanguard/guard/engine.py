"""engine.py owns the eager step engine: measure → agree → decide → act with one host read per step.

Both engines (this one and the sync-free :mod:`nanguard.guard.device`) follow the :class:`StepEngine` protocol:
:meth:`~StepEngine.before` runs after backward (and unscale), before the optimizer step — it measures the step's
micro-batch losses and gradient norm, hands them to the :class:`~nanguard.distributed.Agreement` (the identity on
one process; the all-reduce across ranks under torch.distributed), lets the :class:`~nanguard.guard.control.
Controller` decide, and acts: clip, scale the LR, or make the coming ``optimizer.step()`` a true no-op (every
gradient ``None``). :meth:`~StepEngine.after` runs after the optimizer step: it puts the LR back, lets the
guard-owned EMA and scheduler follow an applied update, feeds the running statistics and returns the steps now
decided and done (:class:`~nanguard.guard.step.Judged`) for the recorder and the controller.

The engine keeps the running statistics of the loss and the gradient norm (a non-finite value never enters them)
and knows nothing of the journal, snapshots or the Guard.
"""

from __future__ import annotations

import math
from typing import Any, Protocol

import torch
from torch import Tensor

from nanguard.checks import Finding, Kind, RunningStats, clip_grads_
from nanguard.distributed import Agreement
from nanguard.guard.control import Controller
from nanguard.guard.state import TrainingState
from nanguard.guard.step import Judged, Seen, StepVerdict
from nanguard.policy import Action, Decision, Policy


class StepEngine(Protocol):
    """What the Guard drives each step, whichever engine it is."""

    def before(self, seen: Seen, losses: list[Tensor], *, rollback_requested: str | None) -> StepVerdict:
        """Measure, agree, decide and act before the optimizer step."""
        ...

    def after(self, verdict: StepVerdict) -> tuple[list[Judged], Decision | None]:
        """Finish the step after the optimizer step: the steps now known, and a rollback or stop still to do."""
        ...


def new_stats(policy: Policy) -> RunningStats:
    return RunningStats(decay=policy.stats_decay, warmup_steps=policy.spike_warmup_steps)


class EagerEngine:
    """The default engine: one host read per step (every micro-batch loss and the gradient norm together)."""

    def __init__(self, state: TrainingState, controller: Controller, agreement: Agreement) -> None:
        self.state, self.controller, self.agreement = state, controller, agreement
        policy = controller.policy
        self.policy = policy
        self.loss_stats = new_stats(policy)
        self.grad_stats = new_stats(policy)

    # ------------------------------------------------------------------ before the optimizer step
    @torch.no_grad()
    def before(self, seen: Seen, losses: list[Tensor], *, rollback_requested: str | None) -> StepVerdict:
        state, policy = self.state, self.policy
        state.unscale()
        grads = state.grads()
        norm_t = state.grad_norm(grads)
        measured = torch.stack([*(loss.float().to(norm_t.device) for loss in losses), norm_t])
        # The one host read of the step: every micro-batch loss and the gradient norm, agreed across ranks.
        values = self.agreement.agree(measured).tolist()
        loss_vs, norm_v = values[:-1], values[-1]
        micro = len(loss_vs) > 1
        findings: list[Finding] = []
        loss_thr = self.loss_stats.threshold(policy.loss_spike_z, policy.spike_min_ratio)
        grad_thr = self.grad_stats.threshold(policy.grad_spike_z, policy.spike_min_ratio)
        for i, value in enumerate(loss_vs):
            at = i if micro else None
            if not math.isfinite(value):
                findings.append(Finding(Kind.NONFINITE_LOSS, value, micro_batch=at))
            elif loss_thr is not None and value > loss_thr:
                findings.append(Finding(Kind.LOSS_SPIKE, value, loss_thr, micro_batch=at))
        loss_ok = all(math.isfinite(v) for v in loss_vs)
        grads_ok = math.isfinite(norm_v)
        if not grads_ok:
            kind = Kind.AMP_OVERFLOW if state.scaler is not None and loss_ok else Kind.NONFINITE_GRAD
            findings.append(Finding(kind, norm_v, tensors=tuple(state.nonfinite_grad_names())))
        elif grad_thr is not None and norm_v > grad_thr:
            findings.append(Finding(Kind.GRAD_SPIKE, norm_v, grad_thr))
        if not loss_ok or (not grads_ok and state.scaler is None):
            # This step will not be applied: put back the buffers its forward changed (BatchNorm statistics of a
            # NaN batch), then look at the state to tell a bad batch from bad state.
            state.restore_buffers()
            findings.extend(state.scan())

        decision = self.controller.decide(findings, step=seen.step)
        if rollback_requested is not None and decision.action is not Action.STOP:
            decision = Decision(Action.ROLLBACK, rollback_requested)
        apply = decision.action in (Action.CONTINUE, Action.CLIP)
        saved_lrs = None
        if apply:
            if decision.clip_to is not None:  # always, like clip_grad_norm_: the same bits as the sync-free engine
                limit = torch.tensor(decision.clip_to, dtype=torch.float32, device=norm_t.device)
                clip_grads_(grads, norm_t, limit)
            saved_lrs = state.scale_lr(self.controller.lr_scale(seen.step))
        else:
            state.restore_buffers()
            state.drop_grads()
        seen = Seen(seen.step, seen.epoch, seen.batch_index, sum(loss_vs), norm_v, seen.sample_ids, seen.loop_step,
                    seen.micro_sample_ids)
        return StepVerdict(seen.step, True, apply, decision.action, tuple(findings), seen.loss, norm_v, decision,
                           seen, micro_losses=tuple(loss_vs), engine_state=(saved_lrs, loss_thr, grad_thr, grads_ok))

    # ------------------------------------------------------------------ after the optimizer step
    def after(self, verdict: StepVerdict) -> tuple[list[Judged], Decision | None]:
        state = self.state
        saved_lrs, loss_thr, grad_thr, grads_ok = verdict.engine_state
        assert verdict.decision is not None and verdict.seen is not None
        lr = None
        if verdict.apply:
            lr = state.first_lr()  # as the update used it, back-off included
            state.restore_lr(saved_lrs)
        # Under AMP, non-finite gradients at a finite loss are GradScaler's ordinary overflow: its step() skipped
        # the update and update() lowered the scale, as it always does.
        applied = bool(verdict.apply) and (grads_ok or state.scaler is None)
        if applied:
            state.after_update()
        else:
            state.restore_buffers()
        decision, seen = verdict.decision, verdict.seen
        if decision.action is not Action.ROLLBACK:
            for value in verdict.micro_losses:  # non-finite values never enter
                self.loss_stats.observe(value, cap=loss_thr)
            if grads_ok and seen.grad_norm is not None:
                self.grad_stats.observe(seen.grad_norm, cap=grad_thr)
        judged = Judged(seen, verdict.findings, decision, applied, decision.clip_to, lr)
        pending = decision if decision.action in (Action.ROLLBACK, Action.STOP) else None
        return [judged], pending

    # ------------------------------------------------------------------ statistics
    def stats_state(self) -> dict[str, Any]:
        return {"loss_stats": self.loss_stats.state_dict(), "grad_stats": self.grad_stats.state_dict()}

    def load_stats_state(self, state: dict[str, Any]) -> None:
        self.loss_stats.load_state_dict(state["loss_stats"])
        self.grad_stats.load_state_dict(state["grad_stats"])
