"""Rollback is exact: after a fault, going back to a clean snapshot and replaying the same batches reaches
the same weights bit for bit as a run that never failed; skipping a window equals skipping it from the
start; a fault that keeps coming back ends in a stop with a report; the journal keeps everything."""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

import nanguard
from nanguard.data import Batch
from nanguard.errors import ExitCode
from nanguard.journal import journal_path, read_actions
from tests.training import assert_same_state, set_nan

EPOCHS = 3
BATCHES_PER_EPOCH = 10


@pytest.fixture(autouse=True)
def deterministic() -> None:
    torch.use_deterministic_algorithms(True)
    yield
    torch.use_deterministic_algorithms(False)


@dataclass
class Run:
    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    loader: DataLoader[tuple[Tensor, ...]]
    guard: nanguard.Guard


def make_run(run_dir: Path, **policy: object) -> Run:
    """A model with BatchNorm and dropout (so RNG streams matter), AdamW, a scheduler, a shuffled loader."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Dropout(0.2), nn.Linear(32, 3))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=7, gamma=0.7)
    gen = torch.Generator().manual_seed(1234)
    x = torch.randn(BATCHES_PER_EPOCH * 16, 8, generator=gen)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0.5).long()
    loader = DataLoader(TensorDataset(x, y), batch_size=16, shuffle=True)
    settings: dict[str, object] = {"check_every_steps": 5, "spike_warmup_steps": 8, "lr_backoff_on": (),
                                   "rollback_skip": "none", "lr_probation_steps": 3, **policy}
    guard = nanguard.Guard(model, optimizer, run_dir=run_dir, scheduler=scheduler,
                           policy=nanguard.Policy(**settings))  # type: ignore[arg-type]
    return Run(model, optimizer, scheduler, loader, guard)


Fault = Callable[[Run, Batch, Tensor], Tensor]


def train(run: Run, fault: Fault | None = None, *, epochs: int = EPOCHS) -> Run:
    for batch in run.guard.batches(run.loader, epochs=epochs):
        x, y = batch.data
        if fault is not None:
            x = fault(run, batch, x)
        loss = nn.functional.cross_entropy(run.model(x), y)
        loss.backward()
        run.guard.step(loss)
    run.guard.close()
    return run


def full_state(run: Run) -> dict[str, Tensor]:
    state = {f"model.{k}": v.detach().clone() for k, v in run.model.state_dict().items()}
    for i, param_state in enumerate(run.optimizer.state.values()):
        for key, value in param_state.items():
            state[f"optimizer.{i}.{key}"] = value.detach().clone()
    state["lr"] = torch.tensor([g["lr"] for g in run.optimizer.param_groups], dtype=torch.float64)
    state["scheduler"] = torch.tensor(float(run.scheduler.last_epoch))
    state["rng"] = torch.get_rng_state()
    return state


def once_at_step(step: int, action: Callable[[Run], None]) -> Fault:
    done: list[bool] = []

    def fault(run: Run, batch: Batch, x: Tensor) -> Tensor:
        if not done and run.guard.step_count == step:
            done.append(True)
            action(run)
        return x
    return fault


@pytest.mark.parametrize("sync_free", [False, True], ids=["eager", "sync_free"])
def test_rollback_after_a_nan_weight_replays_to_the_same_weights_as_a_run_that_never_failed(
    tmp_path: Path, sync_free: bool
) -> None:
    clean = train(make_run(tmp_path / "clean", sync_free=sync_free))
    faulty = train(make_run(tmp_path / "faulty", sync_free=sync_free),
                   once_at_step(23, lambda run: set_nan(run.model[4].weight, (1, 2))))
    assert_same_state(full_state(faulty), full_state(clean))
    rollback = next(a for a in read_actions(tmp_path / "faulty") if a["action"] == "rollback")
    # The sync-free mode skips step 23 on the device; that skip flushes the ring at once, the flush scans the state
    # and finds the weight: both roll back at step 23, to step 20.
    detail = rollback["detail"]
    assert (rollback["step"], detail["to_step"], detail["data_rewound"]) == (23, 20, True)
    assert rollback["detail"]["skipped_windows"] == []
    passed = [a for a in read_actions(tmp_path / "faulty") if a["action"] == "probation_passed"]
    assert len(passed) == 1


def test_rollback_that_skips_a_bad_batch_equals_skipping_it_from_the_start(tmp_path: Path) -> None:
    def bad_batch(run: Run, batch: Batch, x: Tensor) -> Tensor:
        if (batch.epoch, batch.index) == (1, 4):
            x = x.clone()
            x[3, 1] = float("nan")  # a corrupt sample, seen once
        return x

    faulty = train(make_run(tmp_path / "faulty", max_skips_in_window=1, rollback_skip="faulted"), bad_batch)
    reference = make_run(tmp_path / "reference")
    reference.guard.recovery.skip.add_window(1, 4, 4)
    train(reference)
    assert_same_state(full_state(faulty), full_state(reference))
    rollback = next(a for a in read_actions(tmp_path / "faulty") if a["action"] == "rollback")
    assert rollback["detail"]["skipped_windows"] == [[1, 4, 4]]
    assert rollback["detail"]["to_step"] == 10  # the snapshot at the start of epoch 1, batch 0


def test_rollback_skips_the_whole_window_by_default(tmp_path: Path) -> None:
    run = train(make_run(tmp_path, rollback_skip="window"),
                once_at_step(17, lambda r: set_nan(r.model[0].weight, (0, 0))))
    rollback = next(a for a in read_actions(tmp_path) if a["action"] == "rollback")
    # The snapshot at step 15 was taken before epoch 1's batch 5; the fault showed at step 17 = batch 7.
    assert rollback["detail"]["to_step"] == 15
    assert rollback["detail"]["skipped_windows"] == [[1, 5, 7]]
    assert run.guard.step_count == EPOCHS * BATCHES_PER_EPOCH - 3  # three batches were never fed again
    assert all(torch.isfinite(t).all() for t in run.model.state_dict().values())


def test_a_fault_that_comes_back_after_every_rollback_ends_in_a_stop_with_a_report(tmp_path: Path) -> None:
    def nan_at_step_23(run: Run, batch: Batch, x: Tensor) -> Tensor:
        if run.guard.step_count == 23:  # every time training reaches step 23, whatever the data
            set_nan(run.model[4].weight, (0, 0))
        return x

    run = make_run(tmp_path, max_rollbacks=2, lr_probation_steps=3, rollback_skip="window",
                   lr_backoff_on=("rollback",))
    with pytest.raises(nanguard.TrainingStopped) as stopped:
        train(run, nan_at_step_23, epochs=6)
    assert stopped.value.exit_code == ExitCode.STOPPED
    assert "2 rollbacks did not get past the incident" in str(stopped.value)
    actions = [(a["action"], a["step"], a["detail"].get("to_step"), a["detail"].get("level"))
               for a in read_actions(tmp_path)]
    assert actions == [("rollback", 23, 20, 0), ("probation_failed", 23, None, 1), ("rollback", 23, 15, 1),
                       ("probation_failed", 23, None, 2), ("stop", 23, None, None)]
    second = [a for a in read_actions(tmp_path) if a["action"] == "rollback"][1]
    assert second["detail"]["lr_factor"] == pytest.approx(0.25)  # a stronger back-off at level 1
    with sqlite3.connect(journal_path(tmp_path)) as db:
        assert db.execute("SELECT status FROM runs").fetchall() == [("stopped",)]


def test_rollback_keeps_every_journal_row_and_marks_the_rolled_back_ones(tmp_path: Path) -> None:
    def nan_input(run: Run, batch: Batch, x: Tensor) -> Tensor:
        if (batch.epoch, batch.index) in {(0, 6), (0, 7)}:
            x = x.clone()
            x[0, 0] = float("nan")
        return x

    train(make_run(tmp_path, max_skips_in_window=2, rollback_skip="window"), nan_input)
    rows = [(r["kind"], r["step"], r["action"], r["rolled_back"]) for r in nanguard.read_incidents(tmp_path)]
    assert rows == [("nonfinite_loss", 6, "skip", 1), ("nonfinite_loss", 7, "rollback", 1)]
    rollback = next(a for a in read_actions(tmp_path) if a["action"] == "rollback")
    assert rollback["detail"]["incidents_rolled_back"] == 2
    assert rollback["detail"]["skipped_windows"] == [[0, 5, 7]]


def test_a_rollback_made_by_the_periodic_check_shows_in_the_step_result(tmp_path: Path) -> None:
    run = make_run(tmp_path)
    results = []

    def poison_buffer(run: Run, batch: Batch, x: Tensor) -> Tensor:
        if run.guard.step_count == 2 and not results:
            set_nan(run.model[1].running_var, (0,))  # unused in training mode: only the scan sees it
        return x

    for batch in run.guard.batches(run.loader, epochs=1):
        x, y = batch.data
        x = poison_buffer(run, batch, x)
        loss = nn.functional.cross_entropy(run.model(x), y)
        loss.backward()
        result = run.guard.step(loss)
        if result.action is nanguard.Action.ROLLBACK:
            results.append(result)
    (rolled,) = results
    assert (rolled.step, rolled.applied) == (4, False)
    assert [f.tensors for f in rolled.findings] == [("1.running_var",)]
