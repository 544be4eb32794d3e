"""ema.py owns nanguard's exponential moving average of a model's weights.

The guard updates it only after an update was applied, and in the sync-free mode masks it on the device,
so a skipped step never moves the average. Any other EMA object with an ``update(model)`` or
``update_parameters(model)`` method (Ultralytics' ``ModelEMA``, timm's ``ModelEmaV3``, torch's
``AveragedModel``) also works with the guard in the default (eager) mode.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import Tensor, nn


class EMA:
    """``ema = decay * ema + (1 - decay) * weights`` over parameters and floating buffers; integer buffers
    (BatchNorm's ``num_batches_tracked``) are copied."""

    def __init__(self, model: nn.Module, *, decay: float = 0.999) -> None:
        if not 0.0 < decay < 1.0:
            raise ValueError(f"EMA decay must be in (0, 1), got {decay!r}")
        self.decay = decay
        self.module = copy.deepcopy(model).eval().requires_grad_(False)
        self.updates = 0

    def _pairs(self, model: nn.Module) -> tuple[list[Tensor], list[Tensor], list[Tensor], list[Tensor]]:
        mine = self.module.state_dict(keep_vars=True)
        theirs = model.state_dict(keep_vars=True)
        if mine.keys() != theirs.keys():
            raise ValueError("EMA.update: the model's state_dict keys differ from the EMA's")
        float_ema: list[Tensor] = []
        float_model: list[Tensor] = []
        other_ema: list[Tensor] = []
        other_model: list[Tensor] = []
        for key, value in mine.items():
            target = float_ema if value.is_floating_point() else other_ema
            source = float_model if value.is_floating_point() else other_model
            target.append(value.detach())
            source.append(theirs[key].detach())
        return float_ema, float_model, other_ema, other_model

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        float_ema, float_model, other_ema, other_model = self._pairs(model)
        if float_ema:
            torch._foreach_lerp_(float_ema, float_model, 1.0 - self.decay)
        for dst, src in zip(other_ema, other_model, strict=True):
            dst.copy_(src)
        self.updates += 1

    @torch.no_grad()
    def update_masked(self, model: nn.Module, applied: Tensor) -> None:
        """Update where the device flag ``applied`` is true, keep the average where it is false, with no
        host synchronisation. Select, never multiply: ``0 * NaN`` is NaN."""
        float_ema, float_model, other_ema, other_model = self._pairs(model)
        for dst, src in zip(float_ema, float_model, strict=True):
            torch.where(applied, torch.lerp(dst, src, 1.0 - self.decay), dst, out=dst)
        for dst, src in zip(other_ema, other_model, strict=True):
            torch.where(applied, src, dst, out=dst)
        self.updates += 1  # counts calls; the sync-free mode cannot know on the host which were applied

    def state_dict(self) -> dict[str, Any]:
        return {"version": 1, "decay": self.decay, "updates": self.updates, "module": self.module.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("version") != 1:
            raise ValueError(f"EMA.load_state_dict: unknown state version {state.get('version')!r}")
        self.decay = float(state["decay"])
        self.updates = int(state["updates"])
        self.module.load_state_dict(state["module"])


class EMAAdapter:
    """Gives any EMA object the two calls the guard needs: ``update(model)`` and its module to scan."""

    def __init__(self, ema: Any) -> None:
        self.ema = ema
        if hasattr(ema, "update_parameters"):  # torch.optim.swa_utils.AveragedModel
            self._update = ema.update_parameters
        elif callable(getattr(ema, "update", None)):  # nanguard.EMA, Ultralytics ModelEMA, timm ModelEma*
            self._update = ema.update
        else:
            raise TypeError(f"ema must have an update(model) or update_parameters(model) method, got {type(ema)!r}")
        module = ema if isinstance(ema, nn.Module) else getattr(ema, "module", None) or getattr(ema, "ema", None)
        if not isinstance(module, nn.Module):
            raise TypeError(f"cannot find the averaged module of {type(ema).__name__} (.module or .ema)")
        self.module: nn.Module = module

    def update(self, model: nn.Module) -> None:
        self._update(model)
