"""distributed.py owns the *agree* step between measuring a step and deciding it.

Every step engine measures its step into one small float tensor (each micro-batch's loss, then the gradient
norm) and hands it to an :class:`Agreement` before anything is decided, so every process that trains the same
model decides the same from the same numbers. On one process the agreement is the identity
(:class:`LocalAgreement`); under torch.distributed it is where the all-reduce goes (the distributed-training
issue builds it on this seam). An agreement never reads the tensor on the host.
"""

from __future__ import annotations

from typing import Protocol

from torch import Tensor


class Agreement(Protocol):
    """Makes one step's measurements the same on every process that trains the model."""

    def agree(self, measured: Tensor) -> Tensor:
        """``measured`` (1-d float, on the device) as every process must see it; no host read."""
        ...


class LocalAgreement:
    """One process: what it measured is what is agreed."""

    def agree(self, measured: Tensor) -> Tensor:
        return measured
