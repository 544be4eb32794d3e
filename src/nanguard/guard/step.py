"""step.py owns the values that pass between the guard's parts during one optimizer step.

:class:`Seen` is where a step was and what it measured (what the journal records with its incidents),
:class:`StepVerdict` is what :meth:`Guard.before_optimizer_step` decided before the trainer's own optimizer step,
:class:`Judged` is one step decided and done (what the recorder and the controller follow), and
:class:`StepResult` is what the user gets back. None of them does anything.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from nanguard.checks import Finding
from nanguard.policy import Action, Decision


@dataclass(frozen=True)
class Seen:
    """Where one step was and what it measured: what the journal records with each of its incidents.

    ``loss`` is the step's loss (the sum of its micro-batch losses under gradient accumulation);
    ``loop_step`` is the loop's own counter when the loop gave one (nanoGPT's ``iter_num``)."""

    step: int
    epoch: int | None
    batch_index: int | None
    loss: float | None = None
    grad_norm: float | None = None
    sample_ids: Any = None
    loop_step: int | None = None
    micro_sample_ids: tuple[Any, ...] = ()
    """Per micro-batch sample ids (gradient accumulation), when the loop gave them per micro-batch."""


@dataclass
class StepVerdict:
    """What the guard decided for one step before the optimizer step; hand it to ``after_optimizer_step``.

    Attributes:
        step: the guard's step number.
        known: whether the decision is known on the host now (eager mode). In the sync-free mode it stays on
            the device until the next flush and ``apply``/``action`` are ``None``.
        apply: ``True`` when the update goes ahead, ``False`` when every gradient was set to ``None`` so the
            trainer's own ``optimizer.step()`` changes nothing.
        action: the decided action (``None`` when not known).
        findings: what the checks saw.
    """

    step: int
    known: bool
    apply: bool | None
    action: Action | None
    findings: tuple[Finding, ...] = ()
    loss: float | None = None
    grad_norm: float | None = None
    decision: Decision | None = None
    seen: Seen | None = None
    micro_losses: tuple[float, ...] = ()
    """Each micro-batch's loss as read on the host (eager mode; empty in the sync-free mode)."""
    engine_state: Any = field(default=None, repr=False)
    """What the engine that made the verdict needs back in ``after`` (saved LRs, device flags)."""
    done: bool = False


@dataclass(frozen=True)
class Judged:
    """One step decided and done: what the recorder writes and the controller follows."""

    seen: Seen
    findings: tuple[Finding, ...]
    decision: Decision
    applied: bool
    clip_to: float | None = None
    lr: float | None = None


class StepNotKnown(RuntimeError):
    """``StepResult.applied``/``action`` read in the sync-free mode before the flush that knows them."""


class StepResult:
    """What the guard did with one step.

    In the eager mode every field is known when the step returns (``known`` is ``True``). In the sync-free mode
    the decision stays on the device until the next flush: ``known`` is ``False``, and reading ``applied`` or
    ``action`` raises :class:`StepNotKnown` instead of answering ``None`` (``if not result.applied`` would
    otherwise read every step as skipped); the flush's incidents (``Guard.flush``) say what happened.
    """

    __slots__ = ("_action", "_applied", "findings", "grad_norm", "known", "loss", "step")

    def __init__(
        self,
        step: int,
        action: Action | None,
        applied: bool | None,
        loss: float | None = None,
        grad_norm: float | None = None,
        findings: tuple[Finding, ...] = (),
    ) -> None:
        self.step = step
        self.known = action is not None and applied is not None
        self.loss, self.grad_norm, self.findings = loss, grad_norm, findings
        self._action, self._applied = action, applied

    @classmethod
    def pending(cls, step: int) -> StepResult:
        """A sync-free step whose decision is still on the device."""
        return cls(step, None, None)

    @property
    def action(self) -> Action:
        """What the guard did: continue, clip, skip, rollback or stop."""
        if self._action is None:
            raise StepNotKnown(f"step {self.step}: the sync-free mode decides on the device; the action is known "
                               "at the next flush (check result.known, or call guard.flush())")
        return self._action

    @property
    def applied(self) -> bool:
        """Whether the update changed the weights."""
        if self._applied is None:
            raise StepNotKnown(f"step {self.step}: the sync-free mode decides on the device; whether the update was "
                               "applied is known at the next flush (check result.known, or call guard.flush())")
        return self._applied

    def __repr__(self) -> str:
        if not self.known:
            return f"StepResult(step={self.step}, known=False)"
        return (f"StepResult(step={self.step}, action={self._action}, applied={self._applied}, loss={self.loss}, "
                f"grad_norm={self.grad_norm}, findings={self.findings})")
