"""The step API for trainers that own their optimizer step, and the bugs the old single-object guard had."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from torch import nn

import nanguard
from nanguard.guard import StepNotKnown
from nanguard.journal import read_actions, read_incidents, read_runs
from tests.training import assert_same_state, make_setup, set_nan, state_of


def adamw_state(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    return [t.clone() for s in optimizer.state.values() for t in s.values() if isinstance(t, torch.Tensor)]


def test_a_skip_makes_the_trainers_own_optimizer_step_a_true_noop(tmp_path: Path) -> None:
    setup = make_setup(steps=4)
    guard = nanguard.Guard(setup.model, setup.optimizer, run_dir=tmp_path, loop_scheduler=setup.scheduler)
    for i, (x, y, _) in enumerate(setup.batches):
        before = state_of(setup)
        loss = nn.functional.cross_entropy(setup.model(x), y)
        loss.backward()
        if i == 3:
            setup.model[0].weight.grad[0, 0] = float("nan")
        verdict = guard.before_optimizer_step(loss, epoch=0, batch_index=i)
        assert verdict.known and verdict.apply is (i != 3)
        setup.optimizer.step()  # the trainer's own step, whatever the verdict
        result = guard.after_optimizer_step(verdict)
        setup.optimizer.zero_grad()
        if i == 3:  # weights, buffers, moments and AdamW's step count untouched: every gradient was None
            assert all(p.grad is None for p in setup.model.parameters())
            assert_same_state(state_of(setup), before)
            assert (result.action, result.applied) == (nanguard.Action.SKIP, False)
    guard.close()


def test_after_optimizer_step_needs_this_steps_verdict(tmp_path: Path) -> None:
    setup = make_setup(steps=2)
    guard = nanguard.Guard(setup.model, setup.optimizer, run_dir=tmp_path, loop_scheduler=setup.scheduler)
    x, y, _ = setup.batches[0]
    loss = nn.functional.cross_entropy(setup.model(x), y)
    loss.backward()
    verdict = guard.before_optimizer_step(loss)
    with pytest.raises(RuntimeError, match="not finished"):
        guard.before_optimizer_step(loss)
    guard.after_optimizer_step(verdict)
    with pytest.raises(RuntimeError, match="verdict of this step"):
        guard.after_optimizer_step(verdict)
    with pytest.raises(ValueError, match="no loss for this step"):
        guard.before_optimizer_step()
    guard.observe_loss(loss)
    with pytest.raises(ValueError, match="do one of them"):
        guard.before_optimizer_step(loss)
    guard.close()


def test_a_disabled_grad_scaler_is_no_scaler_and_a_nan_gradient_leaves_adam_untouched(tmp_path: Path) -> None:
    """nanoGPT builds GradScaler(enabled=False) on the CPU and with bf16 and passes it around as usual."""
    setup = make_setup(steps=6)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    guard = nanguard.Guard(setup.model, setup.optimizer, run_dir=tmp_path, scaler=scaler,
                           loop_scheduler=setup.scheduler)
    assert guard.scaler is None
    for i, (x, y, _) in enumerate(setup.batches):
        loss = nn.functional.cross_entropy(setup.model(x), y)
        scaler.scale(loss).backward()
        if i in (3, 4):
            setup.model[3].weight.grad[0, 0] = float("nan")
        before = adamw_state(setup.optimizer)
        result = guard.step(loss, epoch=0, batch_index=i)
        if i in (3, 4):  # a skip, twice: no NaN in the moments, no AttributeError from the scaler
            assert (result.action, result.applied) == (nanguard.Action.SKIP, False)
            assert all(torch.equal(a, b) for a, b in zip(adamw_state(setup.optimizer), before, strict=True))
    assert not guard.scan_state()
    assert [r["kind"] for r in read_incidents(tmp_path)] == ["nonfinite_grad", "nonfinite_grad"]
    guard.close()


def test_a_loop_that_unscales_itself_is_not_unscaled_twice(tmp_path: Path) -> None:
    setup = make_setup(steps=4)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    guard = nanguard.Guard(setup.model, setup.optimizer, run_dir=tmp_path, scaler=scaler,
                           loop_scheduler=setup.scheduler)
    reference = make_setup(steps=4)
    for i, ((x, y, _), (rx, ry, _)) in enumerate(zip(setup.batches, reference.batches, strict=True)):
        loss = nn.functional.cross_entropy(setup.model(x), y)
        scaler.scale(loss).backward()
        scaler.unscale_(setup.optimizer)  # nanoGPT: unscale, then (here: the guard's) clip
        verdict = guard.before_optimizer_step(loss, epoch=0, batch_index=i)
        scaler.step(setup.optimizer)
        scaler.update()
        guard.after_optimizer_step(verdict)
        setup.optimizer.zero_grad(set_to_none=True)
        ref_loss = nn.functional.cross_entropy(reference.model(rx), ry)
        ref_loss.backward()
        reference.optimizer.step()
        reference.optimizer.zero_grad(set_to_none=True)
        assert verdict.grad_norm is not None and verdict.grad_norm < 100  # the unscaled norm, not x1024
    assert_same_state(
        {k: v for k, v in state_of(setup).items() if k != "lr"},
        {k: v for k, v in state_of(reference).items() if k != "lr"},
    )
    guard.close()


def test_request_rollback_is_carried_out_in_the_sync_free_mode(tmp_path: Path) -> None:
    setup = make_setup(steps=12)
    guard = nanguard.Guard(setup.model, setup.optimizer, run_dir=tmp_path, loop_scheduler=setup.scheduler,
                           policy=nanguard.Policy(sync_free=True, check_every_steps=5))
    for i, (x, y, _) in enumerate(setup.batches):
        if i == 7:
            guard.request_rollback("validation got worse")
        loss = nn.functional.cross_entropy(setup.model(x), y)
        loss.backward()
        result = guard.step(loss, epoch=0, batch_index=i)
        if i == 7:
            assert result.known and result.action is nanguard.Action.ROLLBACK
    rollbacks = [a for a in read_actions(tmp_path) if a["action"] == "rollback"]
    assert [(a["step"], a["reason"], a["detail"]["to_step"]) for a in rollbacks] == [
        (7, "validation got worse", 5)]
    guard.close()


def test_step_results_say_whether_they_are_known(tmp_path: Path) -> None:
    setup = make_setup(steps=8)
    guard = nanguard.Guard(setup.model, setup.optimizer, run_dir=tmp_path, loop_scheduler=setup.scheduler,
                           policy=nanguard.Policy(sync_free=True, check_every_steps=5))
    results = []
    for i, (x, y, _) in enumerate(setup.batches):
        loss = nn.functional.cross_entropy(setup.model(x), y)
        loss.backward()
        results.append(guard.step(loss, epoch=0, batch_index=i))
    assert results[0].known and results[0].applied  # the first applied step runs eagerly
    assert not results[6].known
    with pytest.raises(StepNotKnown):
        _ = results[6].action
    guard.close()


def test_close_scans_the_state_and_a_dirty_end_restores_the_newest_clean_snapshot(tmp_path: Path) -> None:
    """A NaN running_var after the last periodic check: no step shows it, but close() does."""
    setup = make_setup(steps=13)
    guard = nanguard.Guard(setup.model, setup.optimizer, run_dir=tmp_path, loop_scheduler=setup.scheduler,
                           policy=nanguard.Policy(check_every_steps=5))
    clean_at_10 = None
    for i, (x, y, _) in enumerate(setup.batches):
        if i == 10:
            clean_at_10 = state_of(setup)
        loss = nn.functional.cross_entropy(setup.model(x), y)
        loss.backward()
        guard.step(loss, epoch=0, batch_index=i)
    set_nan(setup.model[1].running_var)
    guard.close()
    assert [r["status"] for r in read_runs(tmp_path)] == ["dirty"]
    row = read_incidents(tmp_path)[-1]
    assert (row["kind"], row["action"]) == ("nonfinite_model", "restore")
    assert "1.running_var" in row["tensors"]
    assert clean_at_10 is not None
    assert_same_state(state_of(setup), clean_at_10)


def test_training_stopped_leaves_the_newest_clean_state_in_the_model(tmp_path: Path) -> None:
    setup = make_setup(steps=30)
    guard = nanguard.Guard(setup.model, setup.optimizer, run_dir=tmp_path, loop_scheduler=setup.scheduler,
                           policy=nanguard.Policy(check_every_steps=5, max_rollbacks=1))
    with pytest.raises(nanguard.TrainingStopped, match="clean state of step"):
        for i, (x, y, _) in enumerate(setup.batches):
            if i >= 12:
                set_nan(setup.model[0].weight, (0, 0))  # a fault that comes back after every rollback
            loss = nn.functional.cross_entropy(setup.model(x), y)
            loss.backward()
            guard.step(loss, epoch=0, batch_index=i)
    assert not guard.scan_state()  # whatever the user saves in the except handler is clean
    assert all(math.isfinite(p.detach().sum().item()) for p in setup.model.parameters())
    assert [r["status"] for r in read_runs(tmp_path)] == ["stopped"]


def test_sync_free_fault_in_the_last_window_is_not_rewound_at_close(tmp_path: Path) -> None:
    """The final flush finds the fault; nothing would be replayed, so no rollback claims the data was rewound."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    data = torch.utils.data.TensorDataset(torch.randn(64, 4), torch.randint(0, 2, (64,)))
    loader = torch.utils.data.DataLoader(data, batch_size=8)
    guard = nanguard.Guard(model, optimizer, run_dir=tmp_path,
                           policy=nanguard.Policy(sync_free=True, check_every_steps=5))
    steps = 0
    for batch in guard.batches(loader, epochs=2):
        x, y = batch.data
        if steps == 15:  # after the last periodic check (the flush at the end of step 14)
            set_nan(optimizer.state[model[2].weight]["exp_avg"], (0, 0))  # a moment, found only by a scan
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        guard.step(loss)
        steps += 1
    guard.close()
    assert steps == 16  # the loop ran to its end; nothing was replayed
    assert [a["action"] for a in read_actions(tmp_path) if a["action"] == "rollback"] == []
    assert [r["status"] for r in read_runs(tmp_path)] == ["dirty"]
    assert not guard.scan_state()


def test_a_scheduler_the_loop_steps_is_refused_when_batches_would_be_replayed(tmp_path: Path) -> None:
    setup = make_setup(steps=2)
    guard = nanguard.Guard(setup.model, setup.optimizer, run_dir=tmp_path)
    with pytest.raises(ValueError, match="loop_scheduler="):
        guard.batches([1, 2])
    guard.close()


def test_a_loop_scheduler_is_rewound_by_a_rollback_not_stepped_twice(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.9)
    data = torch.utils.data.TensorDataset(torch.randn(40, 4), torch.randint(0, 2, (40,)))
    loader = torch.utils.data.DataLoader(data, batch_size=4)
    guard = nanguard.Guard(model, optimizer, run_dir=tmp_path, loop_scheduler=scheduler,
                           policy=nanguard.Policy(check_every_steps=4, rollback_skip="faulted"))
    for batch in guard.batches(loader, epochs=1):
        x, y = batch.data
        if batch.index == 6 and not guard.incidents:
            set_nan(model[0].weight, (0, 0))
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        guard.step(loss)
        scheduler.step()  # the loop's own scheduler, once per batch it fed
    guard.close()
    # 10 batches, one skipped after the rollback: the schedule stepped once per batch trained, never more.
    assert scheduler.last_epoch == 9


def test_guard_state_loaded_from_a_checkpoint_is_the_base_of_the_next_rollback(tmp_path: Path) -> None:
    setup = make_setup(steps=12)
    first = nanguard.Guard(setup.model, setup.optimizer, run_dir=tmp_path / "a", loop_scheduler=setup.scheduler,
                           policy=nanguard.Policy(check_every_steps=5))
    for i, (x, y, _) in enumerate(setup.batches[:7]):
        loss = nn.functional.cross_entropy(setup.model(x), y)
        loss.backward()
        first.step(loss, epoch=0, batch_index=i)
    saved = first.state_dict()
    first.close()
    resumed = nanguard.Guard(setup.model, setup.optimizer, run_dir=tmp_path / "b", loop_scheduler=setup.scheduler,
                             policy=nanguard.Policy(check_every_steps=5))
    resumed.load_state_dict(saved)
    at_load = state_of(setup)
    set_nan(setup.model[0].weight, (0, 0))
    x, y, _ = setup.batches[7]
    loss = nn.functional.cross_entropy(setup.model(x), y)
    loss.backward()
    result = resumed.step(loss, epoch=0, batch_index=7)
    assert result.action is nanguard.Action.ROLLBACK
    assert resumed.step_count == 7 and resumed.loss_stats.count == saved["loss_stats"]["count"]
    assert_same_state(state_of(setup), at_load)  # not the model at the new guard's construction
    resumed.close()
