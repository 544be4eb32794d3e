"""state.py owns the training state a guard protects: model, optimizer, GradScaler, schedulers and EMA.

:class:`TrainingState` checks what it is given, knows the parameters' names, reads the gradients and their
norm, makes a step a true no-op (:meth:`drop_grads`: every ``p.grad = None``, which leaves AdamW's weights,
moments and step count untouched, where zeroed gradients would not), unscales once, keeps the GradScaler's
per-step stage consistent, saves and restores the buffers a skipped forward changed, scales the LR around the
optimizer step, scans everything for non-finite values, and names what a snapshot keeps (:meth:`components`).

It decides nothing and records nothing. A disabled ``GradScaler`` (``enabled=False``, which nanoGPT builds on CPU
and with bf16) is no scaler at all: its ``step`` is a plain ``optimizer.step()``, so it is treated as absent.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import Tensor, nn

from nanguard.checks import (
    Finding,
    Kind,
    named_model_tensors,
    named_optimizer_tensors,
    nonfinite_names,
    total_norm,
)
from nanguard.ema import EMAAdapter
from nanguard.snapshot import Stateful

log = logging.getLogger(__name__)


class TrainingState:
    """The tensors and objects of one training that the guard reads, restores and snapshots.

    Args:
        model: the model being trained.
        optimizer: its optimizer; every parameter it holds must belong to ``model``.
        scaler: a ``torch.amp.GradScaler``; a disabled one is treated as none.
        scheduler: an LR scheduler the guard steps after each applied update (``Guard.step``).
        loop_scheduler: an LR scheduler the loop steps itself: kept in snapshots, so a replayed batch steps it
            from where it was, never twice. Needed when the loop draws its batches from ``Guard.batches`` (which
            replays them after a rollback); a loop whose position a rollback does not rewind leaves it out.
        ema: an EMA of the weights the guard updates after each applied update.
        loop_ema: an EMA the loop (or framework) updates itself: scanned and kept in snapshots only.
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        *,
        scaler: torch.amp.GradScaler | None = None,
        scheduler: Any = None,
        loop_scheduler: Any = None,
        ema: Any = None,
        loop_ema: Any = None,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
        if ema is not None and loop_ema is not None:
            raise ValueError("pass ema= (the guard updates it) or loop_ema= (the loop does), not both")
        if scheduler is not None and loop_scheduler is not None:
            raise ValueError("pass scheduler= (the guard steps it) or loop_scheduler= (the loop does), not both")
        if scaler is not None and not scaler.is_enabled():
            scaler = None  # GradScaler(enabled=False).step is optimizer.step(): nothing to unscale or skip
        self.model, self.optimizer, self.scaler = model, optimizer, scaler
        self.scheduler, self.loop_scheduler = scheduler, loop_scheduler
        self.ema = EMAAdapter(ema) if ema is not None else None
        self.loop_ema = EMAAdapter(loop_ema) if loop_ema is not None else None
        self.param_names = {id(p): name for name, p in model.named_parameters()}
        self.params = check_optimizer_params(model, optimizer, self.param_names)
        self.buffers = list(model.buffers())
        self.buffer_backup = [b.detach().clone() for b in self.buffers]
        # Buffers that are already non-finite are constants (a causal mask of -inf), not damage: they are left
        # out of every scan. Parameters and optimizer state must start finite.
        self.constant_buffers = set(nonfinite_names(model.named_buffers()))
        if self.constant_buffers:
            log.info("nanguard: buffers non-finite from the start, not scanned: %s", sorted(self.constant_buffers))

    def check_replayable(self) -> None:
        """Refuse a replay that would step an LR scheduler twice: torch's schedulers write ``initial_lr`` into the
        param groups, and one the guard was not given is left out of the snapshots, so a loop that steps it would
        step it again for every batch replayed after a rollback (a cosine schedule overruns its floor)."""
        if self.scheduler is None and self.loop_scheduler is None and any(
                "initial_lr" in group for group in self.optimizer.param_groups):
            raise ValueError("the optimizer has an LR scheduler (its param groups carry 'initial_lr') that the guard "
                             "was not given, and guard.batches() replays batches after a rollback: pass it as "
                             "loop_scheduler= when the loop steps it, or scheduler= for the guard to step it, so a "
                             "rollback rewinds it with the weights")

    @property
    def any_ema(self) -> EMAAdapter | None:
        """The EMA whichever side updates it."""
        return self.ema if self.ema is not None else self.loop_ema

    # ------------------------------------------------------------------ gradients
    def grads(self) -> list[Tensor]:
        return [p.grad for p in self.params if p.grad is not None]

    def grad_norm(self, grads: list[Tensor]) -> Tensor:
        """The total L2 norm of ``grads`` (0-d float32, on the device; no host read)."""
        return total_norm(grads)

    def nonfinite_grad_names(self) -> list[str]:
        named = ((self.param_names[id(p)], p.grad) for p in self.params if p.grad is not None)
        return nonfinite_names(named)

    def drop_grads(self) -> None:
        """Make the next ``optimizer.step()`` a true no-op: every gradient ``None``. Optimizers skip parameters
        without a gradient (weights, moments and step counts stay as they are), where zeroed gradients would
        still decay the weights and advance Adam's moments."""
        self.optimizer.zero_grad(set_to_none=True)

    def unscale(self) -> None:
        """Unscale the gradients once per step (a loop that called ``scaler.unscale_`` itself already did)."""
        if self.scaler is None:
            return
        try:
            self.scaler.unscale_(self.optimizer)
        except RuntimeError as err:
            if "unscale_() has already been called" not in str(err):
                raise

    def clear_scaler_stage(self) -> None:
        """A step the guard skipped calls neither ``scaler.step`` nor ``update``: the scale and growth tracker stay
        as they were, and only the per-step bookkeeping is cleared, exactly as ``update()`` clears it. The one
        place nanguard touches a private GradScaler field (``_per_optimizer_states``); torch has no public way."""
        if self.scaler is not None:
            self.scaler._per_optimizer_states.pop(id(self.optimizer), None)

    def optimizer_step(self, *, grads_finite: bool) -> None:
        """The update as ``Guard.step`` makes it (the loop does its own with the step API)."""
        if self.scaler is not None and grads_finite:
            # unscale_ already recorded this step's found_inf and the host read showed every gradient finite, so
            # GradScaler.step would only read found_inf back (a second device sync) before optimizer.step(). The
            # update() reads the recorded found_inf (zero) as usual.
            self.optimizer.step()
            self.scaler.update()
        elif self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()

    def after_update(self) -> None:
        """After an applied update: the guard-owned EMA and scheduler follow, the buffers are the new good ones."""
        if self.ema is not None:
            self.ema.update(self.model)
        if self.scheduler is not None:
            self.scheduler.step()
        self.save_buffers()

    # ------------------------------------------------------------------ buffers
    @torch.no_grad()
    def save_buffers(self) -> None:
        if self.buffers:
            torch._foreach_copy_(self.buffer_backup, self.buffers)

    @torch.no_grad()
    def restore_buffers(self) -> None:
        """Put back the buffers a step that is not applied changed (BatchNorm statistics of a NaN batch)."""
        if self.buffers:
            torch._foreach_copy_(self.buffers, self.buffer_backup)

    @torch.no_grad()
    def select_buffers(self, ok: Tensor) -> None:
        """Sync-free: keep the step's buffers where ``ok`` (a 0-d device flag), the saved ones elsewhere."""
        for buf, old in zip(self.buffers, self.buffer_backup, strict=True):
            torch.where(ok, buf, old, out=buf)
        self.save_buffers()

    # ------------------------------------------------------------------ learning rate
    def scale_lr(self, scale: float) -> list[Any] | None:
        """Multiply every param group's LR by ``scale``; returns what :meth:`restore_lr` puts back. Around the
        optimizer step only, so schedulers and loops that set the LR themselves see their own values."""
        if scale == 1.0:
            return None
        saved = [group["lr"] for group in self.optimizer.param_groups]
        for group in self.optimizer.param_groups:
            group["lr"] = group["lr"] * scale
        return saved

    def restore_lr(self, saved: list[Any] | None) -> None:
        if saved is not None:
            for group, lr in zip(self.optimizer.param_groups, saved, strict=True):
                group["lr"] = lr

    def first_lr(self) -> float | None:
        """The first param group's LR as a Python number, without a device read (a CUDA tensor LR: ``None``)."""
        lr = self.optimizer.param_groups[0].get("lr")
        if isinstance(lr, Tensor):
            return float(lr.item()) if lr.device.type == "cpu" else None
        return None if lr is None else float(lr)

    # ------------------------------------------------------------------ scans and snapshots
    def scan(self) -> list[Finding]:
        """Non-finite values in weights and buffers, the EMA and the optimizer state: one finding per place that
        has any, naming the tensors. Reads flags on the host (one sync)."""
        findings = []
        model_bad = [n for n in nonfinite_names(named_model_tensors(self.model)) if n not in self.constant_buffers]
        if model_bad:
            findings.append(Finding(Kind.NONFINITE_MODEL, tensors=tuple(model_bad)))
        ema = self.any_ema
        if ema is not None:
            ema_bad = [n for n in nonfinite_names(named_model_tensors(ema.module, prefix="ema."))
                       if n.removeprefix("ema.") not in self.constant_buffers]
            if ema_bad:
                findings.append(Finding(Kind.NONFINITE_EMA, tensors=tuple(ema_bad)))
        opt_bad = nonfinite_names(named_optimizer_tensors(self.optimizer, self.param_names))
        if opt_bad:
            findings.append(Finding(Kind.NONFINITE_OPTIMIZER, tensors=tuple("optimizer." + n for n in opt_bad)))
        return findings

    def components(self) -> dict[str, Stateful]:
        """What a snapshot keeps, by name."""
        components: dict[str, Stateful] = {"model": self.model, "optimizer": self.optimizer}
        ema = self.any_ema
        if ema is not None:
            components["ema"] = ema.ema if hasattr(ema.ema, "state_dict") else ema.module
        if self.scaler is not None:
            components["scaler"] = self.scaler
        scheduler = self.scheduler if self.scheduler is not None else self.loop_scheduler
        if scheduler is not None:
            components["scheduler"] = scheduler
        return components

    def optimizer_tensors(self) -> list[Tensor]:
        """The optimizer's state tensors (the sync-free masked update puts them back)."""
        return [t for _, t in named_optimizer_tensors(self.optimizer, self.param_names)]


def check_optimizer_params(
    model: nn.Module, optimizer: torch.optim.Optimizer, names: dict[int, str]
) -> list[nn.Parameter]:
    """The optimizer's parameters, all of which must be ``model``'s."""
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
