"""control.py owns escalation, probation and LR back-off: one state table, and the one decision function
both step engines use.

What one step needs decided *now* (skip, clip, apply) is :func:`step_rule`'s :class:`StepRule`, which the eager
engine evaluates on host numbers and the sync-free engine on device flags: one rule, two evaluators. What a
run of steps needs decided (roll back, stop, back the LR off, end a probation) is the :class:`Controller`'s.

The controller is in one :class:`Phase` at a time; :data:`TRANSITIONS` is every move it can make, and
nothing else changes the phase::

    phase        event             next phase   what happens on the way
    -----------  ----------------  -----------  ----------------------------------------------------------
    healthy      backoff_trigger   backed_off   LR x factor for lr_probation_steps (an event in lr_backoff_on)
    healthy      rolled_back       probation    LR x factor**(level+1) when "rollback" is in lr_backoff_on
    backed_off   backoff_trigger   backed_off   the back-off window starts again
    backed_off   window_ended      recovering   LR ramps back to 1 over lr_recovery_steps
    backed_off   rolled_back       probation
    backed_off   no_backoff        healthy      (a back-off with factor 1: nothing to wait for)
    probation    incident          backed_off   probation failed: level + 1 (the next rollback goes further back)
    probation    probation_ended   recovering   probation passed: level 0, rollbacks without progress 0
    probation    rolled_back       probation    (a rollback's own incident failed the probation first)
    recovering   ramp_ended        healthy
    recovering   backoff_trigger   backed_off
    recovering   rolled_back       probation
    recovering   no_backoff        healthy
    any          stopped           stopped      training ends with a report

An event not listed for a phase leaves it as it is (an incident while healthy is counted by :meth:`decide`, not
by a phase change). A probation lasts until ``lr_probation_steps`` after the rollback point *and* past the step
whose incident triggered it. GradScaler's ordinary overflow (``amp_overflow``) is no incident: it neither fails
a probation nor counts as a symptom. The counters the decisions use (skips in a window, a loss-spike streak, the
first symptom since the last clean check, the escalation level, rollbacks without progress) live here too, with
the phase, in one ``state_dict``.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from nanguard.checks import STATE_KINDS, Finding, Kind
from nanguard.policy import Action, Decision, Policy

BENIGN_KINDS = frozenset({Kind.AMP_OVERFLOW})
"""Findings that are no incident: GradScaler's own overflow handling (it skips and lowers its scale)."""


# ---------------------------------------------------------------------------------------------- the step rule
@dataclass(frozen=True)
class StepRule:
    """What one step's findings mean for that step alone, before any escalation.

    Attributes:
        skip_kinds: a finding of one of these kinds skips the update.
        clip_on_grad_spike: a gradient-norm spike clips the gradients to the spike threshold.
        max_grad_norm: the fixed clip limit (``None``: none).
    """

    skip_kinds: frozenset[Kind]
    clip_on_grad_spike: bool
    max_grad_norm: float | None

    def clip_limit(self, grad_spike_threshold: float | None) -> float | None:
        """The norm the gradients are clipped to: the fixed limit, lowered to the spike threshold on a spike."""
        limits = [self.max_grad_norm] if self.max_grad_norm is not None else []
        if self.clip_on_grad_spike and grad_spike_threshold is not None:
            limits.append(grad_spike_threshold)
        return min(limits) if limits else None


def step_rule(policy: Policy) -> StepRule:
    """The one per-step rule of ``policy``: the eager engine reads it on the host, the sync-free one on the device."""
    skip = {Kind.NONFINITE_LOSS, Kind.NONFINITE_GRAD}
    if policy.on_loss_spike == "skip":
        skip.add(Kind.LOSS_SPIKE)
    if policy.on_grad_spike == "skip":
        skip.add(Kind.GRAD_SPIKE)
    return StepRule(frozenset(skip), policy.on_grad_spike == "clip", policy.max_grad_norm)


# ---------------------------------------------------------------------------------------------- the state table
class Phase(str, Enum):
    """Where the run stands between incidents."""

    HEALTHY = "healthy"
    BACKED_OFF = "backed_off"
    PROBATION = "probation"
    RECOVERING = "recovering"
    STOPPED = "stopped"


class Event(str, Enum):
    """What moves the controller from one phase to another."""

    BACKOFF_TRIGGER = "backoff_trigger"
    ROLLED_BACK = "rolled_back"
    INCIDENT = "incident"
    WINDOW_ENDED = "window_ended"
    PROBATION_ENDED = "probation_ended"
    RAMP_ENDED = "ramp_ended"
    NO_BACKOFF = "no_backoff"
    STOPPED = "stopped"


TRANSITIONS: dict[tuple[Phase, Event], Phase] = {
    (Phase.HEALTHY, Event.BACKOFF_TRIGGER): Phase.BACKED_OFF,
    (Phase.HEALTHY, Event.ROLLED_BACK): Phase.PROBATION,
    (Phase.BACKED_OFF, Event.BACKOFF_TRIGGER): Phase.BACKED_OFF,
    (Phase.BACKED_OFF, Event.WINDOW_ENDED): Phase.RECOVERING,
    (Phase.BACKED_OFF, Event.ROLLED_BACK): Phase.PROBATION,
    (Phase.BACKED_OFF, Event.NO_BACKOFF): Phase.HEALTHY,
    (Phase.PROBATION, Event.INCIDENT): Phase.BACKED_OFF,
    (Phase.PROBATION, Event.PROBATION_ENDED): Phase.RECOVERING,
    (Phase.PROBATION, Event.ROLLED_BACK): Phase.PROBATION,
    (Phase.RECOVERING, Event.RAMP_ENDED): Phase.HEALTHY,
    (Phase.RECOVERING, Event.BACKOFF_TRIGGER): Phase.BACKED_OFF,
    (Phase.RECOVERING, Event.ROLLED_BACK): Phase.PROBATION,
    (Phase.RECOVERING, Event.NO_BACKOFF): Phase.HEALTHY,
    **{(phase, Event.STOPPED): Phase.STOPPED for phase in Phase},
}
"""Every phase change there is. The module docstring is this table with what happens on each move."""

JOURNAL_ACTIONS = {
    (Phase.PROBATION, Phase.BACKED_OFF): "probation_failed",
    (Phase.PROBATION, Phase.RECOVERING): "probation_passed",
}
"""Phase changes that are journal actions of their own (a back-off is recorded as ``lr_backoff`` by the caller,
a rollback and a stop by recovery)."""


@dataclass(frozen=True)
class Change:
    """One move through :data:`TRANSITIONS`, for the recorder."""

    step: int
    event: Event
    before: Phase
    after: Phase
    level: int
    rollbacks_without_progress: int

    @property
    def journal_action(self) -> str | None:
        """``probation_passed``/``probation_failed``/``lr_backoff`` when this move is one, else ``None``."""
        if self.event is Event.BACKOFF_TRIGGER:
            return "lr_backoff"
        return JOURNAL_ACTIONS.get((self.before, self.after))


@dataclass
class Controller:
    """Escalation, probation and LR back-off of one guard, driven through :data:`TRANSITIONS`."""

    policy: Policy
    phase: Phase = Phase.HEALTHY
    phase_start: int = 0
    """The step the current phase began at (the back-off window and the ramp count from it)."""
    factor: float = 1.0
    """The LR multiplier of the current back-off (``backed_off``, ``probation``; ``recovering`` ramps from it)."""
    level: int = 0
    """Failed probations since the last passed one: each makes the next rollback go further back and skip more."""
    rollbacks_without_progress: int = 0
    probation_until: int | None = None
    incident_step: int | None = None
    first_symptom_step: int | None = None
    skip_steps: deque[int] = field(default_factory=deque)
    spike_streak: int = 0

    def __post_init__(self) -> None:
        self.rule = step_rule(self.policy)

    # ------------------------------------------------------------------ moves
    def fire(self, event: Event, step: int) -> Change | None:
        """Make the move ``(phase, event)`` of :data:`TRANSITIONS`, with its effects; ``None`` when it has none."""
        after = TRANSITIONS.get((self.phase, event))
        if after is None:
            return None
        before = self.phase
        policy = self.policy
        if event is Event.BACKOFF_TRIGGER:
            self.factor = policy.lr_backoff_factor
        elif event is Event.ROLLED_BACK:
            backoff = "rollback" in policy.lr_backoff_on
            self.factor = policy.lr_backoff_factor ** (self.level + 1) if backoff else 1.0
        elif event is Event.INCIDENT:  # a failed probation
            self.level += 1
            self.probation_until = None
        elif event is Event.PROBATION_ENDED:
            self.level = 0
            self.rollbacks_without_progress = 0
            self.probation_until = None
            self.first_symptom_step = None
        elif event is Event.RAMP_ENDED or event is Event.NO_BACKOFF:
            self.factor = 1.0
        self.phase, self.phase_start = after, step
        return Change(step, event, before, after, self.level, self.rollbacks_without_progress)

    def after_step(self, step: int, findings: list[Finding], decision: Decision) -> list[Change]:
        """Follow the phase after ``step`` was decided and done. A step decided ``rollback`` or ``stop`` still fails
        a probation here (before :meth:`rolled_back`, so the next rollback goes further back) but starts no back-off
        of its own. Returns the moves made, oldest first."""
        changes: list[Change] = []
        incident = any(f.kind not in BENIGN_KINDS for f in findings)

        def fire(event: Event, at: int) -> None:
            change = self.fire(event, at)
            if change is not None:
                changes.append(change)

        if incident and self.phase is Phase.PROBATION:
            fire(Event.INCIDENT, step + 1)
        triggers = set(self.policy.lr_backoff_on)
        kinds = {f.kind.value for f in findings}
        rolling_back = decision.action in (Action.ROLLBACK, Action.STOP)  # a rollback starts its own back-off
        if not rolling_back and (decision.action.value in triggers or kinds & triggers):
            fire(Event.BACKOFF_TRIGGER, step + 1)
        since = step + 1 - self.phase_start
        if self.phase is Phase.PROBATION and self.probation_until is not None and step + 1 >= self.probation_until:
            fire(Event.PROBATION_ENDED, step + 1)
        elif self.phase is Phase.BACKED_OFF and since >= self.policy.lr_probation_steps:
            fire(Event.WINDOW_ENDED, step + 1)
        elif self.phase is Phase.RECOVERING and since >= self.policy.lr_recovery_steps:
            fire(Event.RAMP_ENDED, step + 1)
        if self.phase in (Phase.BACKED_OFF, Phase.RECOVERING) and self.factor == 1.0:
            fire(Event.NO_BACKOFF, step + 1)
        return changes

    def rolled_back(self, *, incident_step: int, to_step: int) -> Change | None:
        """A rollback from ``incident_step`` to the snapshot of ``to_step`` was done: start its probation."""
        self.rollbacks_without_progress += 1
        self.incident_step = incident_step
        self.probation_until = max(to_step + self.policy.lr_probation_steps, incident_step + 1)
        self.skip_steps.clear()
        self.spike_streak = 0
        self.first_symptom_step = None
        return self.fire(Event.ROLLED_BACK, to_step)

    def stopped(self, step: int) -> Change | None:
        return self.fire(Event.STOPPED, step)

    def clean_check(self) -> None:
        """A scan found the state clean: symptoms before now need not be rolled back past."""
        if self.phase is not Phase.PROBATION:
            self.first_symptom_step = None

    # ------------------------------------------------------------------ reading
    def lr_scale(self, step: int) -> float:
        """The multiplier of every param group's LR for ``step`` (applied around the optimizer step only)."""
        if self.phase in (Phase.BACKED_OFF, Phase.PROBATION):
            return self.factor
        if self.phase is Phase.RECOVERING:
            ramp = max(step - self.phase_start, 0)
            return min(1.0, self.factor + (1.0 - self.factor) * (ramp + 1) / (self.policy.lr_recovery_steps + 1))
        return 1.0

    # ------------------------------------------------------------------ deciding
    def decide(self, findings: list[Finding], *, step: int) -> Decision:
        """Map one step's findings to a decision, updating the counters (not the phase)."""
        kinds = {f.kind for f in findings} - BENIGN_KINDS
        if kinds and self.first_symptom_step is None:
            self.first_symptom_step = step
        self.spike_streak = self.spike_streak + 1 if Kind.LOSS_SPIKE in kinds else 0
        policy, rule = self.policy, self.rule
        if kinds & STATE_KINDS:
            places = sorted(_STATE_PLACES[k] for k in kinds & STATE_KINDS)
            return self._rollback_or_stop("non-finite values in the " + " and ".join(places))
        if self.spike_streak >= policy.persistent_spike_steps:
            return self._rollback_or_stop(f"a loss spike persisted {self.spike_streak} steps")
        skipping = kinds & rule.skip_kinds
        if skipping:
            self.skip_steps.append(step)
            while self.skip_steps and self.skip_steps[0] <= step - policy.skip_window_steps:
                self.skip_steps.popleft()
            if len(self.skip_steps) >= policy.max_skips_in_window:
                return self._rollback_or_stop(
                    f"{policy.max_skips_in_window} skipped steps within {policy.skip_window_steps} steps")
            return Decision(Action.SKIP, _skip_reason(skipping))
        spike = next((f for f in findings if f.kind is Kind.GRAD_SPIKE), None)
        limit = rule.clip_limit(spike.threshold if spike is not None else None)
        if spike is not None and rule.clip_on_grad_spike:
            return Decision(Action.CLIP, "adaptive clip after a gradient-norm spike", limit)
        return Decision(Action.CONTINUE, "", limit)

    def _rollback_or_stop(self, why: str) -> Decision:
        if self.rollbacks_without_progress >= self.policy.max_rollbacks:
            return Decision(Action.STOP, f"{why}; {self.rollbacks_without_progress} rollbacks did not get past "
                                         "the incident")
        return Decision(Action.ROLLBACK, why)

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        return {"version": 3, "phase": self.phase.value, "phase_start": self.phase_start, "factor": self.factor,
                "level": self.level, "rollbacks": self.rollbacks_without_progress,
                "probation_until": self.probation_until, "incident_step": self.incident_step,
                "first_symptom_step": self.first_symptom_step, "skip_steps": list(self.skip_steps),
                "spike_streak": self.spike_streak}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if not isinstance(state, dict) or state.get("version") != 3:
            version = state.get("version") if isinstance(state, dict) else None
            raise ValueError(f"Controller.load_state_dict: unknown state version {version!r}")
        self.phase = Phase(state["phase"])
        self.phase_start = int(state["phase_start"])
        self.factor = float(state["factor"])
        if not (math.isfinite(self.factor) and 0 < self.factor <= 1):
            raise ValueError(f"Controller.load_state_dict: LR factor {self.factor!r} is not in (0, 1]")
        self.level = int(state["level"])
        self.rollbacks_without_progress = int(state["rollbacks"])
        self.probation_until = _optional_int(state["probation_until"])
        self.incident_step = _optional_int(state["incident_step"])
        self.first_symptom_step = _optional_int(state["first_symptom_step"])
        self.skip_steps = deque(int(s) for s in state["skip_steps"])
        self.spike_streak = int(state["spike_streak"])


_STATE_PLACES = {Kind.NONFINITE_MODEL: "model", Kind.NONFINITE_EMA: "EMA", Kind.NONFINITE_OPTIMIZER: "optimizer state"}


def _skip_reason(kinds: set[Kind]) -> str:
    nonfinite = kinds & {Kind.NONFINITE_LOSS, Kind.NONFINITE_GRAD}
    if nonfinite:
        return "non-finite " + ", ".join(sorted(k.value for k in nonfinite))
    return "loss spike" if Kind.LOSS_SPIKE in kinds else "gradient-norm spike"


def _optional_int(value: Any) -> int | None:
    return None if value is None else int(value)
