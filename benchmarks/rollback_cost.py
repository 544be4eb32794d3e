"""What exact rollback costs: snapshot overhead, time from detection to training again, and steps lost.

Run (from the repository root)::

    .venv/bin/python benchmarks/rollback_cost.py              # the full run: about 2-3 minutes on 2 cores
    .venv/bin/python benchmarks/rollback_cost.py --quick      # fewer steps and repeats (about a minute)
    .venv/bin/python benchmarks/rollback_cost.py --json       # results on stdout as JSON instead of the table

Three measurements, all on the CPU, every model trained with AdamW through ``guard.batches(loader)`` and
``guard.step(loss)``:

1. **Snapshot overhead** (goal <= 1% of training time). An MLP of about 4.2M parameters (1024 -> 4x1024 ->
   10, batch 64) guarded with the default ``Policy()``: a state scan and an in-memory snapshot every
   ``check_every_steps`` = 100 steps. The guard's ``check_state`` (scan + snapshot) is timed directly with
   ``time.perf_counter_ns`` through thin wrappers, beside the time of every training step (forward,
   backward, ``guard.step``). Share = median check time / (100 x median step time without a check); the
   share of the totals is printed beside it. The first snapshots of a run allocate their buffers; once the
   ring of ``snapshot_ring_size`` = 3 is full every capture reuses the oldest one's buffers.
2. **Detection -> training again** (goal <= 2 s at 100M parameters). MLPs of about 10M (5x1400 wide) and
   100M (6x4096 wide) parameters, batch 2. After a clean snapshot that holds the AdamW moments, a NaN is
   written into a weight; the next step's NaN loss is detected by ``guard.step``, which restores model,
   optimizer, RNG streams and the data position and returns ``ROLLBACK``. Timed per incident: that whole
   ``guard.step`` call (detection scan + rollback + journal rows), the rollback alone
   (``guard.recovery.rollback``), and the time from entering that call until the next step's update is
   applied (which adds one ordinary training step: data, forward, backward, update). A plain training step
   is printed for scale. Median of several incidents.
3. **Steps lost per incident vs the snapshot interval** (goal: never more than one interval). A small
   BatchNorm MLP, ``check_every_steps`` = 10, 50, 100; faults injected at random steps (seeded): a NaN
   weight (seen by the next forward), a NaN Adam second moment (turns the weight NaN at the update, seen one
   step later), a NaN BatchNorm running variance (unused in training mode: only the periodic scan finds
   it), and five NaN batches in a row (skipped, then the fifth escalates to a rollback). Steps lost per
   rollback are read from the journal: ``from_step - to_step``.

``torch.set_num_threads`` is set explicitly (``--threads``, default 2) and printed. Nanguard's own warnings
are silenced; every rollback is checked in the journal.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _models  # this script's folder, added above

import nanguard
from nanguard.policy import Action

SEED = 0
GOAL_OVERHEAD_SHARE = 0.01
GOAL_ROLLBACK_S_100M = 2.0
INTERVALS = (10, 50, 100)
FAULT_KINDS = ("nan_weight", "nan_adam_moment", "nan_bn_buffer_silent", "nan_batches_x5")


# ------------------------------------------------------------------------------------------------- helpers
def mlp(in_features: int, width: int, depth: int, classes: int = 10) -> nn.Sequential:
    """The reference MLP of ``_models`` as a plain ``nn.Sequential`` (this script indexes its layers)."""
    return _models.MLP(in_features, width, depth, classes).net

def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def loader_for(samples: int, features: int, batch: int, classes: int = 10) -> DataLoader[tuple[Tensor, ...]]:
    gen = torch.Generator().manual_seed(1234)
    x = torch.randn(samples, features, generator=gen)
    y = torch.randint(0, classes, (samples,), generator=gen)
    return DataLoader(TensorDataset(x, y), batch_size=batch, shuffle=True)


@contextmanager
def timed_calls(obj: Any, name: str, into: list[int]) -> Iterator[None]:
    """Wrap ``obj.name`` (an instance attribute shadows the method) and append each call's duration in ns."""
    original = getattr(obj, name)

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        t0 = time.perf_counter_ns()
        try:
            return original(*args, **kwargs)
        finally:
            into.append(time.perf_counter_ns() - t0)

    setattr(obj, name, wrapper)
    try:
        yield
    finally:
        delattr(obj, name)


def ms(ns: float) -> float:
    return ns / 1e6


# ------------------------------------------------------------------------------- 1. snapshot overhead
@dataclass
class OverheadResult:
    params: int
    steps: int
    interval: int
    checks: int
    median_step_ms: float
    median_check_ms: float
    median_scan_ms: float
    median_snapshot_ms: float
    max_check_ms: float
    share_median: float
    share_totals: float
    check_ms_each: list[float] = field(default_factory=list)


def snapshot_overhead(run_dir: Path, *, steps: int, warmup: int) -> OverheadResult:
    torch.manual_seed(SEED)
    model = mlp(1024, 1024, 4)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.01)
    loader = loader_for(64 * 16, 1024, 64)
    policy = nanguard.Policy()  # the defaults: check_every_steps=100, snapshots in memory only
    guard = nanguard.Guard(model, optimizer, run_dir=run_dir, policy=policy)
    check_ns: list[int] = []
    scan_ns: list[int] = []
    snap_ns: list[int] = []
    step_ns: list[int] = []
    step_check_ns: list[int] = []  # the check time inside each timed step (0 for most)
    with timed_calls(guard, "check_state", check_ns), timed_calls(guard, "scan_state", scan_ns), \
            timed_calls(guard.recovery, "snapshot", snap_ns):
        for batch in guard.batches(loader):
            x, y = batch.data
            checks_before = len(check_ns)
            t0 = time.perf_counter_ns()
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            guard.step(loss)
            elapsed = time.perf_counter_ns() - t0
            if guard.step_count > warmup:
                step_ns.append(elapsed)
                step_check_ns.append(sum(check_ns[checks_before:]))
            if guard.step_count >= warmup + steps:
                break
    guard.close()
    rows = nanguard.read_incidents(run_dir)
    if rows:
        raise RuntimeError(f"the overhead run had incidents: {rows}")
    plain = [s - c for s, c in zip(step_ns, step_check_ns, strict=True)]
    timed_checks = [c for c in step_check_ns if c]
    median_step = statistics.median(plain)
    median_check = statistics.median(timed_checks)
    interval = policy.check_every_steps
    return OverheadResult(
        params=n_params(model), steps=len(step_ns), interval=interval, checks=len(timed_checks),
        median_step_ms=ms(median_step), median_check_ms=ms(median_check),
        median_scan_ms=ms(statistics.median(scan_ns)), median_snapshot_ms=ms(statistics.median(snap_ns)),
        max_check_ms=ms(max(timed_checks)), share_median=median_check / (interval * median_step),
        share_totals=sum(timed_checks) / sum(plain), check_ms_each=[round(ms(c), 2) for c in timed_checks],
    )


# ---------------------------------------------------------------------- 2. detection -> training again
@dataclass
class RollbackTiming:
    label: str
    params: int
    incidents: int
    plain_step_ms: float
    detect_step_ms: float  # the guard.step call that detects and rolls back
    rollback_ms: float  # guard.recovery.rollback alone
    to_next_update_ms: float  # entering that call -> the next step's update applied
    detect_step_ms_each: list[float] = field(default_factory=list)
    steps_lost_each: list[int] = field(default_factory=list)


def rollback_timing(label: str, run_dir: Path, *, width: int, depth: int, repeats: int) -> RollbackTiming:
    torch.manual_seed(SEED)
    model = mlp(width, width, depth)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, weight_decay=0.01)
    loader = loader_for(64, width, 2)
    # A clean check every 2 steps keeps a snapshot with the AdamW moments; a short probation and no LR back-off
    # let one run take several incidents in a row, each rolled back to the snapshot just before it.
    policy = nanguard.Policy(check_every_steps=2, rollback_skip="none", lr_backoff_on=(), lr_probation_steps=1,
                             max_rollbacks=repeats + 1)
    guard = nanguard.Guard(model, optimizer, run_dir=run_dir, policy=policy)
    first_layer = model[0]
    assert isinstance(first_layer, nn.Linear)
    injected: set[int] = set()
    rollback_ns: list[int] = []
    detect_ns: list[int] = []
    to_next_ns: list[int] = []
    plain_ns: list[int] = []
    pending: int | None = None  # perf_counter_ns when the detecting guard.step was entered
    with timed_calls(guard.recovery, "rollback", rollback_ns):
        for batch in guard.batches(loader):
            step = guard.step_count
            # Steps 3, 5, 7, ...: a NaN in a weight, once per step number; the snapshot of step - 1 is clean.
            if step >= 3 and step % 2 == 1 and step not in injected and len(injected) < repeats:
                injected.add(step)
                with torch.no_grad():
                    first_layer.weight[0, 0] = float("nan")
            x, y = batch.data
            t_step = time.perf_counter_ns()
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            t_guard = time.perf_counter_ns()
            result = guard.step(loss)
            t_end = time.perf_counter_ns()
            if result.action is Action.ROLLBACK:
                detect_ns.append(t_end - t_guard)
                pending = t_guard
            elif result.applied:
                if pending is not None:
                    to_next_ns.append(t_end - pending)
                    pending = None
                elif step % 2 == 0 and step >= 2:  # an ordinary step without a check at its end
                    plain_ns.append(t_end - t_step)
            if len(to_next_ns) >= repeats:
                break
    guard.close()
    lost = [a["detail"]["from_step"] - a["detail"]["to_step"]
            for a in nanguard.read_actions(run_dir) if a["action"] == "rollback"]
    if len(lost) != repeats:
        raise RuntimeError(f"{label}: expected {repeats} rollbacks, the journal has {len(lost)}")
    result_row = RollbackTiming(
        label=label, params=n_params(model), incidents=repeats, plain_step_ms=ms(statistics.median(plain_ns)),
        detect_step_ms=ms(statistics.median(detect_ns)), rollback_ms=ms(statistics.median(rollback_ns)),
        to_next_update_ms=ms(statistics.median(to_next_ns)),
        detect_step_ms_each=[round(ms(d), 1) for d in detect_ns], steps_lost_each=lost,
    )
    del guard, model, optimizer
    gc.collect()
    return result_row


# ------------------------------------------------------------------- 3. steps lost vs the interval
@dataclass
class StepsLost:
    interval: int
    rollbacks: int
    max_lost: int
    mean_lost: float
    max_by_kind: dict[str, int]
    within_one_interval: bool


Fault = Callable[[nn.Sequential, torch.optim.Optimizer], None]


def _linear(model: nn.Sequential, index: int) -> nn.Linear:
    layer = model[index]
    assert isinstance(layer, nn.Linear)
    return layer


def _fault(kind: str) -> Fault:
    def nan_weight(model: nn.Sequential, optimizer: torch.optim.Optimizer) -> None:
        _linear(model, 3).weight[0, 0] = float("nan")

    def nan_adam_moment(model: nn.Sequential, optimizer: torch.optim.Optimizer) -> None:
        optimizer.state[_linear(model, 0).weight]["exp_avg_sq"][0, 0] = float("nan")

    def nan_bn_buffer(model: nn.Sequential, optimizer: torch.optim.Optimizer) -> None:
        bn = model[1]
        assert isinstance(bn, nn.BatchNorm1d) and bn.running_var is not None
        bn.running_var[0] = float("nan")

    return {"nan_weight": nan_weight, "nan_adam_moment": nan_adam_moment,
            "nan_bn_buffer_silent": nan_bn_buffer}[kind]


def steps_lost_run(run_dir: Path, *, interval: int, kind: str, injections: int, rng: random.Random) -> list[int]:
    """One run with ``injections`` faults of ``kind`` at random steps; steps lost of each rollback."""
    torch.manual_seed(SEED)
    model = nn.Sequential(nn.Linear(32, 64), nn.BatchNorm1d(64), nn.ReLU(), nn.Linear(64, 4))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    loader = loader_for(32 * 20, 32, 32, classes=4)
    policy = nanguard.Policy(check_every_steps=interval, rollback_skip="none", lr_probation_steps=1,
                             spike_warmup_steps=10**6)  # spikes from random data are not what this measures
    guard = nanguard.Guard(model, optimizer, run_dir=run_dir, policy=policy)
    # Fault steps: each at least two intervals past the previous one (its rollback and probation are over),
    # at a uniformly random phase within the interval.
    targets: list[int] = []
    start = interval
    for _ in range(injections):
        targets.append(start + rng.randrange(2 * interval))
        start = targets[-1] + 2 * interval + 6
    seen: set[int] = set()
    end = targets[-1] + interval + 6
    for batch in guard.batches(loader):
        step = guard.step_count
        x, y = batch.data
        first_time = step not in seen
        seen.add(step)
        if first_time and kind == "nan_batches_x5":
            if any(t <= step < t + 5 for t in targets):
                x = x.clone()
                x[0, 0] = float("nan")  # transient: a replay of the same step reads a good batch
        elif first_time and step in targets:
            with torch.no_grad():
                _fault(kind)(model, optimizer)
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        guard.step(loss)
        if guard.step_count >= end:
            break
    guard.close()
    lost = [a["detail"]["from_step"] - a["detail"]["to_step"]
            for a in nanguard.read_actions(run_dir) if a["action"] == "rollback"]
    if len(lost) != injections:
        raise RuntimeError(f"interval {interval}, {kind}: {injections} faults but {len(lost)} rollbacks")
    return lost


def steps_lost(root: Path, *, injections: int) -> list[StepsLost]:
    rng = random.Random(SEED)
    rows = []
    for interval in INTERVALS:
        by_kind = {kind: steps_lost_run(root / f"lost-{interval}-{kind}", interval=interval, kind=kind,
                                        injections=injections, rng=rng) for kind in FAULT_KINDS}
        every = [n for lost in by_kind.values() for n in lost]
        rows.append(StepsLost(interval=interval, rollbacks=len(every), max_lost=max(every),
                              mean_lost=statistics.fmean(every),
                              max_by_kind={k: max(v) for k, v in by_kind.items()},
                              within_one_interval=max(every) <= interval))
    return rows


# ------------------------------------------------------------------------------------------------ report
def print_table(results: dict[str, Any]) -> None:
    print(f"torch {torch.__version__}, CPU, torch.set_num_threads({results['threads']}); "
          f"total {results['seconds']:.0f} s{' (--quick)' if results['quick'] else ''}\n")
    o = OverheadResult(**results["overhead"])
    print(f"1) Snapshot overhead, default Policy (check_every_steps={o.interval}, snapshots in memory), "
          f"MLP {o.params / 1e6:.1f}M params, AdamW, batch 64, {o.steps} timed steps, {o.checks} checks")
    print(f"   median step {o.median_step_ms:.2f} ms | median check {o.median_check_ms:.2f} ms "
          f"(scan {o.median_scan_ms:.2f} + snapshot {o.median_snapshot_ms:.2f}); each check: {o.check_ms_each} ms")
    verdict = "MET" if o.share_median <= GOAL_OVERHEAD_SHARE else "MISSED"
    print(f"   share of training time: {100 * o.share_median:.3f}% (median-based), "
          f"{100 * o.share_totals:.3f}% (totals)   goal <= {100 * GOAL_OVERHEAD_SHARE:.0f}%: {verdict}\n")
    print("2) Detection -> training again, in process (median over incidents; NaN weight, AdamW moments in the "
          "snapshot, batch 2)")
    header = (f"   {'model':<6} {'params':>8} {'n':>2} {'plain step':>11} {'detect+rollback':>16} "
              f"{'rollback alone':>15} {'-> next update':>15}  goal")
    print(header)
    for row in results["rollback"]:
        r = RollbackTiming(**row)
        goal = ""
        if r.label == "100M":
            goal = f"<= {GOAL_ROLLBACK_S_100M:.0f} s: " + (
                "MET" if r.detect_step_ms <= 1000 * GOAL_ROLLBACK_S_100M else "MISSED")
        print(f"   {r.label:<6} {r.params / 1e6:>7.1f}M {r.incidents:>2} {r.plain_step_ms:>8.0f} ms "
              f"{r.detect_step_ms:>13.0f} ms {r.rollback_ms:>12.0f} ms {r.to_next_update_ms:>12.0f} ms  {goal}")
    print("   (detect+rollback: the guard.step call that finds the NaN and rolls back; -> next update: from "
          "entering that call until the next step's update is applied, one ordinary step included)\n")
    print(f"3) Steps lost per incident vs snapshot interval ({', '.join(FAULT_KINDS)}; "
          f"{results['injections']} faults of each kind per interval)")
    kind_heads = "".join(f" {k:>{len(k)}}" for k in FAULT_KINDS)
    print(f"   {'interval':>8} {'rollbacks':>9} {'max lost':>8} {'mean lost':>9}  max lost by kind:{kind_heads}  "
          "goal <= interval")
    for row in results["steps_lost"]:
        s = StepsLost(**row)
        kinds = "".join(f" {s.max_by_kind[k]:>{len(k)}}" for k in FAULT_KINDS)
        print(f"   {s.interval:>8} {s.rollbacks:>9} {s.max_lost:>8} {s.mean_lost:>9.1f}  {'':<16}{kinds}  "
              f"{'MET' if s.within_one_interval else 'MISSED'}")
    print("   (steps lost = from_step - to_step of each rollback in the journal)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0] if __doc__ else None)
    parser.add_argument("--json", action="store_true", help="print the results as JSON instead of the table")
    parser.add_argument("--quick", action="store_true", help="fewer steps, incidents and faults")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default 2)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    logging.getLogger("nanguard").setLevel(logging.ERROR)
    if not args.json:
        print(f"torch.set_num_threads({torch.get_num_threads()})", flush=True)
    started = time.perf_counter()
    steps, warmup, repeats, injections = (200, 5, 2, 3) if args.quick else (500, 10, 3, 6)
    with tempfile.TemporaryDirectory(prefix="nanguard-rollback-bench-") as tmp:
        root = Path(tmp)
        overhead = snapshot_overhead(root / "overhead", steps=steps, warmup=warmup)
        timings = [rollback_timing("10M", root / "rb-10M", width=1400, depth=5, repeats=repeats),
                   rollback_timing("100M", root / "rb-100M", width=4096, depth=6, repeats=repeats)]
        lost = steps_lost(root, injections=injections)
    results: dict[str, Any] = {
        "threads": torch.get_num_threads(), "quick": args.quick, "torch": torch.__version__,
        "seconds": time.perf_counter() - started, "injections": injections, "overhead": asdict(overhead),
        "rollback": [asdict(t) for t in timings], "steps_lost": [asdict(s) for s in lost],
    }
    if args.json:
        json.dump(results, sys.stdout, indent=2)
        print()
    else:
        print_table(results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
