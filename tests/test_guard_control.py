"""The controller's state table, move by move: escalation, probation and LR back-off live in one table."""

from __future__ import annotations

import pytest

from nanguard.checks import Finding, Kind
from nanguard.guard.control import TRANSITIONS, Controller, Event, Phase
from nanguard.policy import Action, Decision, Policy

POLICY = Policy(lr_backoff_on=("rollback", "loss_spike"), lr_backoff_factor=0.5, lr_probation_steps=10,
                lr_recovery_steps=4, max_rollbacks=2)
CONTINUE = Decision(Action.CONTINUE)
SKIP = Decision(Action.SKIP, "loss spike")


def controller_in(phase: Phase) -> Controller:
    c = Controller(POLICY)
    if phase is Phase.BACKED_OFF:
        c.fire(Event.BACKOFF_TRIGGER, 0)
    elif phase is Phase.PROBATION:
        c.rolled_back(incident_step=5, to_step=0)
    elif phase is Phase.RECOVERING:
        c.fire(Event.BACKOFF_TRIGGER, 0)
        c.fire(Event.WINDOW_ENDED, 10)
    elif phase is Phase.STOPPED:
        c.stopped(0)
    assert c.phase is phase
    return c


@pytest.mark.parametrize(("phase", "event"), sorted(TRANSITIONS, key=lambda k: (k[0].value, k[1].value)),
                         ids=lambda v: v.value)
def test_every_transition_of_the_table_moves_to_its_phase(phase: Phase, event: Event) -> None:
    c = controller_in(phase)
    change = c.fire(event, 20)
    assert change is not None and (change.before, change.after) == (phase, TRANSITIONS[(phase, event)])
    assert c.phase is TRANSITIONS[(phase, event)] and c.phase_start == 20


@pytest.mark.parametrize("phase", list(Phase), ids=lambda v: v.value)
def test_an_event_the_table_does_not_list_leaves_the_phase(phase: Phase) -> None:
    for event in Event:
        if (phase, event) in TRANSITIONS:
            continue
        c = controller_in(phase)
        assert c.fire(event, 20) is None and c.phase is phase


def test_a_backoff_trigger_scales_the_lr_for_the_window_then_ramps_back() -> None:
    c = Controller(POLICY)
    changes = c.after_step(3, [Finding(Kind.LOSS_SPIKE, 9.0, 2.0)], SKIP)
    assert [ch.journal_action for ch in changes] == ["lr_backoff"]
    assert [c.lr_scale(s) for s in (4, 13)] == [0.5, 0.5]
    for step in range(4, 14):
        c.after_step(step, [], CONTINUE)
    assert c.phase is Phase.RECOVERING
    ramp = [c.lr_scale(s) for s in range(14, 18)]
    assert ramp == sorted(ramp) and 0.5 < ramp[0] < 1.0 and ramp[-1] < 1.0
    for step in range(14, 18):
        c.after_step(step, [], CONTINUE)
    assert c.phase is Phase.HEALTHY and c.lr_scale(18) == 1.0


def test_a_probation_without_incident_passes_and_resets_the_escalation() -> None:
    c = Controller(POLICY)
    c.rolled_back(incident_step=15, to_step=10)
    assert c.phase is Phase.PROBATION and c.lr_scale(10) == 0.5 and c.probation_until == 20
    moves = [ch.journal_action for step in range(10, 20) for ch in c.after_step(step, [], CONTINUE)]
    assert moves == ["probation_passed"]
    assert (c.phase, c.level, c.rollbacks_without_progress) == (Phase.RECOVERING, 0, 0)


def test_an_incident_during_probation_fails_it_and_raises_the_level() -> None:
    c = Controller(POLICY)
    c.rolled_back(incident_step=15, to_step=10)
    changes = c.after_step(12, [Finding(Kind.NONFINITE_LOSS, float("nan"))], SKIP)
    assert [ch.journal_action for ch in changes] == ["probation_failed"]
    assert (c.phase, c.level) == (Phase.BACKED_OFF, 1)
    # The next rollback backs the LR off harder: factor ** (level + 1).
    c.rolled_back(incident_step=13, to_step=10)
    assert c.lr_scale(10) == pytest.approx(0.25)


def test_a_grad_scaler_overflow_during_probation_is_no_incident() -> None:
    c = Controller(POLICY)
    c.rolled_back(incident_step=15, to_step=10)
    changes = c.after_step(12, [Finding(Kind.AMP_OVERFLOW, float("inf"))], CONTINUE)
    assert changes == [] and c.phase is Phase.PROBATION and c.level == 0
    assert c.decide([Finding(Kind.AMP_OVERFLOW, float("inf"))], step=12).action is Action.CONTINUE
    assert c.first_symptom_step is None


def test_repeated_skips_escalate_to_rollback_then_stop() -> None:
    policy = Policy(max_skips_in_window=3, skip_window_steps=10, max_rollbacks=1)
    c = Controller(policy)
    nan = [Finding(Kind.NONFINITE_LOSS, float("nan"))]
    assert [c.decide(nan, step=s).action for s in (1, 2, 3)] == [Action.SKIP, Action.SKIP, Action.ROLLBACK]
    assert c.first_symptom_step == 1
    c.rolled_back(incident_step=3, to_step=0)
    assert [c.decide(nan, step=s).action for s in (1, 2, 3)] == [Action.SKIP, Action.SKIP, Action.STOP]


def test_a_rollback_decision_starts_no_backoff_of_its_own_before_the_rollback() -> None:
    c = Controller(POLICY)
    changes = c.after_step(4, [Finding(Kind.NONFINITE_MODEL, tensors=("w",))], Decision(Action.ROLLBACK, "x"))
    assert changes == [] and c.phase is Phase.HEALTHY


def test_controller_state_round_trips_and_refuses_unknown_versions() -> None:
    c = Controller(POLICY)
    c.rolled_back(incident_step=15, to_step=10)
    c.decide([Finding(Kind.LOSS_SPIKE, 9.0, 2.0)], step=11)
    other = Controller(POLICY)
    other.load_state_dict(c.state_dict())
    assert other.state_dict() == c.state_dict()
    with pytest.raises(ValueError, match="unknown state version"):
        other.load_state_dict({"version": 2})
    with pytest.raises(ValueError, match="LR factor"):
        other.load_state_dict(c.state_dict() | {"factor": float("nan")})
