"""Skipping is exact: a run with one skipped step equals, bit for bit on CPU, a run that never saw that
batch — in the eager mode, in the sync-free mode, with a fused optimizer, and under a GradScaler."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from torch import nn

import nanguard
from nanguard.guard import StepNotKnown
from tests.training import Setup, assert_same_state, make_setup, set_nan, state_of, train


@pytest.fixture(autouse=True)
def deterministic() -> None:
    torch.use_deterministic_algorithms(True)
    yield
    torch.use_deterministic_algorithms(False)


def guarded(setup: Setup, run_dir: Path, **policy: object) -> nanguard.Guard:
    return nanguard.Guard(setup.model, setup.optimizer, run_dir=run_dir, scheduler=setup.scheduler,
                          policy=nanguard.Policy(check_every_steps=5, spike_warmup_steps=8, **policy))


@pytest.mark.parametrize("sync_free", [False, True], ids=["eager", "sync_free"])
@pytest.mark.parametrize("fused", [False, True], ids=["foreach", "fused"])
def test_skipped_step_equals_never_seeing_the_batch(tmp_path: Path, sync_free: bool, fused: bool) -> None:
    # The sync-free mode steps a guard-owned scheduler on every call (deciding would need a host read),
    # so there the comparison runs without one; the eager mode steps it only after applied updates.
    scheduler = not sync_free
    faulty = make_setup(fused=fused, scheduler=scheduler)
    guard = guarded(faulty, tmp_path / "faulty", sync_free=sync_free)
    train(faulty, guard, poison_input=[9])
    guard.close()

    clean = make_setup(fused=fused, scheduler=scheduler)
    train(clean, guarded(clean, tmp_path / "clean", sync_free=sync_free), skip_batches=[9])

    assert_same_state(state_of(faulty), state_of(clean))
    (incident,) = nanguard.read_incidents(tmp_path / "faulty")
    assert (incident["kind"], incident["step"], incident["action"]) == ("nonfinite_loss", 9, "skip")


def test_unguarded_loop_and_guarded_loop_train_identically_without_faults(tmp_path: Path) -> None:
    plain = train(make_setup(), None)
    guard_setup = make_setup()
    train(guard_setup, guarded(guard_setup, tmp_path))
    assert_same_state(state_of(guard_setup), state_of(plain))


def test_sync_free_mode_decides_and_trains_like_the_eager_mode(tmp_path: Path) -> None:
    # Without the two things the sync-free mode does later or differently (LR back-off starts at the
    # flush; a guard-owned scheduler steps every call), both modes must agree bit for bit.
    faults = {"poison_input": [6], "loss_scale": {17: 100.0, 23: math.inf}}
    runs = {}
    for mode in ("eager", "sync_free"):
        setup = make_setup(scheduler=False)
        guard = guarded(setup, tmp_path / mode, sync_free=mode == "sync_free", lr_backoff_on=())
        train(setup, guard, **faults)  # type: ignore[arg-type]
        guard.close()
        runs[mode] = (setup, guard)

    def summary(run: Path) -> list[tuple[object, ...]]:
        return [(r["kind"], r["step"], r["batch_index"], r["action"]) for r in nanguard.read_incidents(run)]

    assert summary(tmp_path / "sync_free") == summary(tmp_path / "eager") == [
        ("nonfinite_loss", 6, 6, "skip"), ("loss_spike", 17, 17, "skip"), ("nonfinite_loss", 23, 23, "skip")]
    assert_same_state(state_of(runs["sync_free"][0]), state_of(runs["eager"][0]))
    assert runs["sync_free"][1].state_dict() == runs["eager"][1].state_dict()


def test_sync_free_results_are_not_known_until_the_flush_and_a_skip_is_flushed_at_once(tmp_path: Path) -> None:
    setup = make_setup(steps=12)
    guard = guarded(setup, tmp_path, sync_free=True)
    train(setup, guard, poison_input=[7])
    result = setup.results[7]
    assert not result.known  # the answer is still on the device
    with pytest.raises(StepNotKnown, match="known at the next flush"):
        _ = result.applied  # never a None that `if not result.applied` would read as skipped
    # A step whose device flag says it was skipped is flushed at once (on the CPU the flag is read directly; on CUDA
    # one step later, without blocking): the skip is answered now, not after every step up to the periodic flush.
    assert [r["step"] for r in nanguard.read_incidents(tmp_path)] == [7]
    assert guard.flush() == []  # steps 10 and 11 were waiting for a flush and had nothing
    train(setup, guard, poison_input=[11])  # a second pass: steps 12..23, NaN at step 23, after the last flush
    assert [(r["step"], r["action"]) for r in nanguard.read_incidents(tmp_path)] == [(7, "skip"), (23, "skip")]
    assert guard.flush() == []


def test_sync_free_mode_restores_contaminated_state_at_the_flush(tmp_path: Path) -> None:
    setup = make_setup()
    guard = guarded(setup, tmp_path, sync_free=True)
    pre: dict[int, dict[str, torch.Tensor]] = {}
    train(setup, guard, before_forward={12: lambda i, s: set_nan(s.model[3].weight, (0, 0))}, pre=pre)
    rows = [(r["kind"], r["step"], r["action"]) for r in nanguard.read_incidents(tmp_path)]
    # Step 12's flag says skipped, so the ring is flushed at once; the flush saw a non-finite value and scanned the
    # state: the weight is named and rolled back at step 12, not skipped step after step until the periodic flush.
    assert rows == [("nonfinite_loss", 12, "skip"), ("nonfinite_model", 12, "rollback")]
    incident = next(r for r in nanguard.read_incidents(tmp_path) if r["kind"] == "nonfinite_model")
    assert incident["tensors"] == ["3.weight"]
    # Back to the snapshot taken at the flush after step 9, before the first symptom.
    assert_same_state(pre[13], pre[10])


def test_sync_free_mode_refuses_a_grad_scaler_at_construction(tmp_path: Path) -> None:
    setup = make_setup()
    with pytest.raises(ValueError, match="GradScaler"):
        nanguard.Guard(setup.model, setup.optimizer, loop_scheduler=setup.scheduler,
                       run_dir=tmp_path, scaler=torch.amp.GradScaler("cpu"),
                       policy=nanguard.Policy(sync_free=True))


def test_adaptive_clip_statistics_are_unchanged_by_a_nan_step(tmp_path: Path) -> None:
    setup = make_setup()
    guard = guarded(setup, tmp_path)
    stats: dict[str, dict[str, object]] = {}

    def remember(i: int, s: Setup) -> None:
        stats[f"before{i}"] = guard.grad_stats.state_dict() | {"loss": guard.loss_stats.state_dict()}

    weight = setup.model[0].weight
    train(setup, guard, grad_hook={12: lambda i, s: set_nan(weight.grad, (0, 1))},
          on_step=remember, loss_scale={12: math.nan})
    assert stats["before12"] == stats["before13"]
    assert math.isfinite(guard.grad_stats.mean) and math.isfinite(guard.grad_stats.var)


def test_a_gradient_spike_after_a_nan_step_is_still_clipped(tmp_path: Path) -> None:
    """ZClip's running mean turns NaN after one NaN norm and never clips again; here it stays finite."""
    setup = make_setup(steps=40)
    guard = guarded(setup, tmp_path, on_loss_spike="record")
    weight = setup.model[0].weight
    train(setup, guard, grad_hook={12: lambda i, s: set_nan(weight.grad, (0, 1))}, loss_scale={30: 1000.0})
    rows = [(r["kind"], r["step"], r["action"]) for r in nanguard.read_incidents(tmp_path)]
    assert rows == [("nonfinite_grad", 12, "skip"), ("loss_spike", 30, "clip")]
    assert setup.results[30].action is nanguard.Action.CLIP and setup.results[30].applied


def test_clip_bounds_the_applied_gradient_norm(tmp_path: Path) -> None:
    setup = make_setup(optimizer="sgd", scheduler=False)
    guard = nanguard.Guard(setup.model, setup.optimizer, loop_scheduler=setup.scheduler, run_dir=tmp_path,
                           policy=nanguard.Policy(max_grad_norm=0.05))
    before = [p.detach().clone() for p in setup.model.parameters()]
    train(setup, guard, skip_batches=range(1, 30))
    moved = torch.cat([(p.detach() - b).flatten() for p, b in zip(setup.model.parameters(), before, strict=True)])
    assert setup.results[0].grad_norm is not None and setup.results[0].grad_norm > 0.05
    assert torch.linalg.vector_norm(moved).item() == pytest.approx(0.1 * 0.05, rel=1e-3)  # lr * max_norm


def test_lr_is_backed_off_after_a_rollback_and_recovers(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = nn.Linear(4, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    policy = nanguard.Policy(check_every_steps=2, lr_backoff_factor=0.25, lr_probation_steps=3,
                             lr_recovery_steps=3)
    guard = nanguard.Guard(model, opt, run_dir=tmp_path, policy=policy)
    x, y = torch.randn(8, 4), torch.randn(8, 1)
    seen_lr = []
    for step in range(12):
        if step == 5:
            set_nan(model.weight, (0, 0))
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        grad = model.weight.grad.clone()
        weight = model.weight.detach().clone()
        result = guard.step(loss)
        if result.applied:
            seen_lr.append(round(((weight - model.weight.detach()) / grad).mean().item(), 6))
        else:
            seen_lr.append(None)
    assert seen_lr == [0.1, 0.1, 0.1, 0.1, 0.1, None, 0.025, 0.025, 0.025, 0.04375, 0.0625, 0.08125]
    assert opt.param_groups[0]["lr"] == 0.1  # the loop's own LR is never changed
    actions = nanguard.read_actions(tmp_path)
    assert [a["action"] for a in actions] == ["rollback", "probation_passed"]
    assert actions[0]["detail"]["lr_factor"] == 0.25


def test_grad_scaler_overflow_is_left_to_the_scaler_and_recorded(tmp_path: Path) -> None:
    setup = make_setup(scheduler=False)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    guard = nanguard.Guard(setup.model, setup.optimizer, loop_scheduler=setup.scheduler,
                           run_dir=tmp_path, scaler=scaler,
                           policy=nanguard.Policy(check_every_steps=5))
    pre: dict[int, dict[str, torch.Tensor]] = {}
    weight = setup.model[0].weight
    for i, (x, y, _) in enumerate(setup.batches[:10]):
        pre[i] = state_of(setup)
        loss = nn.functional.cross_entropy(setup.model(x), y)
        scaler.scale(loss).backward()
        if i == 4:
            set_nan(weight.grad, (0, 0))
        guard.step(loss)
    assert_same_state(pre[5], pre[4])
    assert scaler.get_scale() == 2.0**9  # GradScaler backed off, as it always does on overflow
    rows = [(r["kind"], r["step"], r["action"]) for r in nanguard.read_incidents(tmp_path)]
    assert rows == [("amp_overflow", 4, "scaler_skip")]


def test_a_skip_under_grad_scaler_leaves_the_scaler_exactly_as_it_was(tmp_path: Path) -> None:
    setup = make_setup(scheduler=False)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=3)
    guard = nanguard.Guard(setup.model, setup.optimizer, loop_scheduler=setup.scheduler,
                           run_dir=tmp_path, scaler=scaler,
                           policy=nanguard.Policy(check_every_steps=5))
    before, after = [], []
    for i, (x, y, _) in enumerate(setup.batches[:8]):
        loss = nn.functional.cross_entropy(setup.model(x), y)
        if i == 5:
            loss = loss * math.nan
        scaler.scale(loss).backward()
        before.append(scaler.state_dict())
        guard.step(loss)
        after.append(scaler.state_dict())
    assert after[5] == before[5]
    assert after[4] != before[4]  # an applied step moves the growth tracker
    rows = [(r["kind"], r["step"], r["action"]) for r in nanguard.read_incidents(tmp_path)]
    assert rows == [("nonfinite_loss", 5, "skip")]


def test_healthy_steps_under_a_grad_scaler_equal_the_plain_scaler_loop(tmp_path: Path) -> None:
    """The guard steps the optimizer itself when every gradient is finite (no second read of found_inf), and
    still ends bit for bit where the textbook unscale_ / clip / scaler.step / scaler.update loop ends,
    the scaler's growth included."""
    states = []
    scales = []
    for guarded_run in (False, True):
        setup = make_setup(scheduler=False)
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8, growth_interval=3)
        guard = (nanguard.Guard(setup.model, setup.optimizer, loop_scheduler=setup.scheduler,
                                run_dir=tmp_path / "g", scaler=scaler,
                                policy=nanguard.Policy(max_grad_norm=1.0)) if guarded_run else None)
        for x, y, _ in setup.batches[:10]:
            loss = nn.functional.cross_entropy(setup.model(x), y)
            scaler.scale(loss).backward()
            if guard is not None:
                assert guard.step(loss).applied
                continue
            scaler.unscale_(setup.optimizer)
            torch.nn.utils.clip_grad_norm_(setup.model.parameters(), 1.0)
            scaler.step(setup.optimizer)
            scaler.update()
            setup.optimizer.zero_grad(set_to_none=True)
        states.append(state_of(setup))
        scales.append(scaler.get_scale())
    assert_same_state(states[1], states[0])
    assert scales[1] == scales[0] == 2.0**11  # grew three times in ten healthy steps
