"""Exact rollback: a run that faults and rolls back ends with bit-for-bit the weights of a run that never faulted.

A small plain-PyTorch classifier (Linear, BatchNorm, ReLU, Dropout, Linear; AdamW; a StepLR scheduler; a
shuffled DataLoader; deterministic algorithms on the CPU) trains for three epochs from the same seed, with
its batches drawn through ``guard.batches(loader, epochs=...)`` so that a rollback can rewind the data:

1. a fault-free run;
2. a NaN written into one weight at step ``NAN_WEIGHT_STEP``, with ``rollback_skip="none"``: the guard
   detects it, restores the clean snapshot (model, optimizer, scheduler, RNG streams, data position) and
   replays the same batches;
3. a corrupt sample (a NaN input) in one batch, with ``rollback_skip="faulted"``: the guard rolls back and
   never feeds that batch again; next to a run that leaves that batch out from the start;
4. a NaN weight again, with the default ``rollback_skip="window"``: every batch from the snapshot to the
   incident is skipped; next to a run that leaves that window out from the start.

It prints three comparisons (2 vs 1, 3 vs its reference, 4 vs its reference). For each: the largest absolute
difference over the final model state (parameters and BatchNorm buffers) and the optimizer state (AdamW
moments, step counts, learning rates), which must be exactly 0.0; the steps lost to each rollback (the
journal's ``from_step - to_step``); and the run's incident rows from ``nanguard.read_incidents``. It exits
1 when a difference is not zero.

The policy sets ``lr_backoff_on=()``: by default a rollback also halves the learning rate for a probation
window, which changes the replay on purpose; here the replay must match exactly. The corrupt batch uses
``max_skips_in_window=1`` so that its NaN loss is answered with a rollback at once (by default a single
NaN loss is only skipped in place, which leaves the dropout RNG one batch ahead of a run without it).

Run it (a few seconds) with::

    .venv/bin/python examples/rollback_exact.py
"""

from __future__ import annotations

import logging
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

import nanguard
from nanguard.data import Batch

SEED = 0
EPOCHS, BATCHES_PER_EPOCH, BATCH_SIZE, FEATURES, CLASSES = 3, 10, 16, 8, 3
CHECK_EVERY_STEPS = 5  # a clean snapshot every 5 steps (the default is 100; this run has only 30 steps)
NAN_WEIGHT_STEP = 23  # comparison 1: a NaN lands in a weight just before this step's forward
BAD_BATCH = (1, 4)  # comparison 2: (epoch, batch index) of the batch holding a corrupt sample
WINDOW_NAN_STEP = 17  # comparison 3: a NaN weight again, with the default window skip

Fault = Callable[["Run", Batch, Tensor], Tensor]


@dataclass
class Run:
    name: str
    run_dir: Path
    model: nn.Sequential
    optimizer: torch.optim.AdamW
    scheduler: torch.optim.lr_scheduler.StepLR
    loader: DataLoader[tuple[Tensor, ...]]
    guard: nanguard.Guard


def make_run(name: str, root: Path, **policy: Any) -> Run:
    """The same model, optimizer, scheduler and shuffled data every time: everything starts from SEED."""
    torch.manual_seed(SEED)
    model = nn.Sequential(nn.Linear(FEATURES, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Dropout(0.2),
                          nn.Linear(32, CLASSES))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=7, gamma=0.7)
    data_gen = torch.Generator().manual_seed(1234)
    x = torch.randn(BATCHES_PER_EPOCH * BATCH_SIZE, FEATURES, generator=data_gen)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0.5).long()
    loader = DataLoader(TensorDataset(x, y), batch_size=BATCH_SIZE, shuffle=True)
    settings: dict[str, Any] = {"check_every_steps": CHECK_EVERY_STEPS, "lr_backoff_on": (),
                                "rollback_skip": "none", **policy}
    run_dir = root / name
    guard = nanguard.Guard(model, optimizer, run_dir=run_dir, scheduler=scheduler,
                           policy=nanguard.Policy(**settings))
    return Run(name, run_dir, model, optimizer, scheduler, loader, guard)


def train(run: Run, fault: Fault | None = None, *, leave_out: frozenset[tuple[int, int]] = frozenset()) -> Run:
    """The training loop; ``fault`` may change the input or the state, ``leave_out`` batches are never fed."""
    run.model.train()
    for batch in run.guard.batches(run.loader, epochs=EPOCHS):
        if (batch.epoch, batch.index) in leave_out:
            continue  # the reference runs: as if the batch had never been in the data
        x, y = batch.data
        if fault is not None:
            x = fault(run, batch, x)
        loss = nn.functional.cross_entropy(run.model(x), y)
        loss.backward()
        run.guard.step(loss)  # replaces optimizer.step(); scheduler.step(); optimizer.zero_grad()
    run.guard.close()
    return run


def nan_weight_at(step: int) -> Fault:
    """Write a NaN into one weight of the last layer once, just before the forward of ``step``."""
    done: list[bool] = []

    def fault(run: Run, batch: Batch, x: Tensor) -> Tensor:
        if not done and run.guard.step_count == step:
            done.append(True)
            head = run.model[4]
            assert isinstance(head, nn.Linear)
            with torch.no_grad():
                head.weight[1, 2] = float("nan")
        return x
    return fault


def corrupt_sample_in(position: tuple[int, int]) -> Fault:
    """A sample with a NaN feature in the batch at ``position``, every time that batch is fed."""
    def fault(run: Run, batch: Batch, x: Tensor) -> Tensor:
        if (batch.epoch, batch.index) == position:
            x = x.clone()
            x[3, 1] = float("nan")
        return x
    return fault


def final_state(run: Run) -> dict[str, Tensor]:
    """Model state (parameters, BatchNorm buffers) and optimizer state (moments, steps, learning rates)."""
    state = {f"model.{k}": v.detach().clone() for k, v in run.model.state_dict().items()}
    names = {id(p): n for n, p in run.model.named_parameters()}
    for param, param_state in run.optimizer.state.items():
        for key, value in param_state.items():
            state[f"optimizer.{names[id(param)]}.{key}"] = torch.as_tensor(value).detach().clone()
    lrs = [group["lr"] for group in run.optimizer.param_groups]
    state["optimizer.lr"] = torch.tensor(lrs, dtype=torch.float64)
    return state


def max_abs_difference(a: dict[str, Tensor], b: dict[str, Tensor]) -> tuple[float, str]:
    """The largest |a - b| over every tensor (NaN when either holds a NaN) and the tensor it is in."""
    if a.keys() != b.keys():
        raise SystemExit(f"the two runs have different state: {sorted(a.keys() ^ b.keys())}")
    worst, where = 0.0, "-"
    for key in a:
        if a[key].shape != b[key].shape:
            return float("inf"), key
        diff = (a[key].double() - b[key].double()).abs()
        value = float(diff.max()) if diff.numel() else 0.0
        if diff.isnan().any():
            return float("nan"), key
        if value > worst:
            worst, where = value, key
    return worst, where


def rollbacks(run: Run) -> list[dict[str, Any]]:
    return [a for a in nanguard.read_actions(run.run_dir) if a["action"] == "rollback"]


def print_incidents(run: Run) -> None:
    rows = nanguard.read_incidents(run.run_dir)
    print(f"  incidents of {run.name!r} ({len(rows)}):")
    print(f"    {'kind':<18} {'step':>4} {'epoch':>5} {'batch':>5}  {'action':<9} rolled_back")
    for row in rows:
        print(f"    {row['kind']:<18} {row['step']:>4} {row['epoch']!s:>5} {row['batch_index']!s:>5}  "
              f"{row['action']:<9} {row['rolled_back']}")


def compare(title: str, faulty: Run, reference: Run) -> bool:
    """Print one comparison; return whether the final states are identical."""
    got, want = final_state(faulty), final_state(reference)
    diff, where = max_abs_difference(got, want)
    parts = {part: max_abs_difference({k: v for k, v in got.items() if k.startswith(part)},
                                      {k: v for k, v in want.items() if k.startswith(part)})[0]
             for part in ("model.", "optimizer.")}
    print(f"\n{title}")
    print(f"  {faulty.name!r} vs {reference.name!r}: {len(got)} tensors compared")
    print(f"  max |difference| = {diff!r}  (model state: {parts['model.']!r}, optimizer state: "
          f"{parts['optimizer.']!r}" + (f"; largest in {where})" if diff != 0.0 else ")"))
    for action in rollbacks(faulty):
        detail = action["detail"]
        lost = detail["from_step"] - detail["to_step"]
        print(f"  rollback: from step {detail['from_step']} to step {detail['to_step']}: steps lost = {lost}; "
              f"data rewound: {detail['data_rewound']}; skipped windows (epoch, first, last): "
              f"{detail['skipped_windows']}; level {detail['level']}; lr factor {detail['lr_factor']}")
    if not rollbacks(faulty):
        print("  rollback: NONE (the fault was not rolled back)")
    print_incidents(faulty)
    return diff == 0.0 and bool(rollbacks(faulty))


def main() -> int:
    logging.getLogger("nanguard").setLevel(logging.ERROR)  # the journal rows below say it all
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory(prefix="nanguard-rollback-") as tmp:
        root = Path(tmp)
        clean = train(make_run("fault-free", root))
        nan_weight = train(make_run("nan-weight", root), nan_weight_at(NAN_WEIGHT_STEP))
        bad_batch = train(make_run("bad-batch", root, rollback_skip="faulted", max_skips_in_window=1),
                          corrupt_sample_in(BAD_BATCH))
        without_bad = train(make_run("bad-batch-left-out", root), leave_out=frozenset({BAD_BATCH}))
        window = train(make_run("nan-weight-window", root, rollback_skip="window"), nan_weight_at(WINDOW_NAN_STEP))
        skipped = [tuple(w) for a in rollbacks(window) for w in a["detail"]["skipped_windows"]]
        window_out = frozenset((e, i) for e, first, last in skipped for i in range(first, last + 1))
        without_window = train(make_run("window-left-out", root), leave_out=window_out)

        results = [
            compare(f"1) NaN in a weight at step {NAN_WEIGHT_STEP}, rollback replays every batch "
                    "(rollback_skip='none') vs the fault-free run", nan_weight, clean),
            compare(f"2) corrupt sample in batch {BAD_BATCH[1]} of epoch {BAD_BATCH[0]}, rollback skips that batch "
                    "(rollback_skip='faulted') vs a run that leaves it out from the start", bad_batch, without_bad),
            compare(f"3) NaN in a weight at step {WINDOW_NAN_STEP}, rollback skips the window since the snapshot "
                    "(rollback_skip='window') vs a run that leaves that window out from the start",
                    window, without_window),
        ]
    if all(results):
        print("\nROLLBACK EXACT: every faulty run ended bit-for-bit where its reference did")
        return 0
    print(f"\nROLLBACK NOT EXACT: comparisons {[i + 1 for i, ok in enumerate(results) if not ok]} differ")
    return 1


if __name__ == "__main__":
    sys.exit(main())
