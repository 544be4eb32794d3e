"""Ultralytics' built-in NaN recovery alone vs nanguard's guard, on real YOLO11n trainings with real faults.

Run (from the repository root; about 3-4 minutes on 2 CPU cores)::

    .venv/bin/python benchmarks/yolo_vs_builtin.py [--epochs 5] [--repeats 3]

Same seed, same data set, same faults (dataset and fault code imported from ``examples/demo_yolo.py``),
YOLO11n from ``yolo11n.yaml``, 64 px, batch 4 (4 batches per epoch), CPU, offline. Two fault scenarios:

* ``three faults``: the demo's, a NaN weight in epoch 0, a NaN gradient mid-run, a NaN weight later;
* ``mid-run faults``: the last two only (the case Ultralytics' epoch-level recovery is built for).

Per scenario and variant: whether training completed, the epochs Ultralytics re-ran (its
``recovering from last.pt`` warnings), the batches lost to recovery (Ultralytics: epochs re-run x batches per
epoch; nanguard: from its journal, the steps undone by rollbacks, ``from_step - to_step``, plus skipped
steps), the wall time of ``model.train``, the audit of ``weights/last.pt`` and ``weights/best.pt``, and the
final val mAP50-95 (last row of ``results.csv``).

Overhead: fault-free trainings, unguarded, guarded with the default policy (``check_every_steps=100``,
Ultralytics' clip at 10) and guarded with the demo's policy (a state check and clean snapshot every epoch),
``--repeats`` times each, interleaved (the order rotates), medians. The loop time runs
from ``on_train_start`` to ``on_train_end``: it includes the epoch-level costs (validation, saving, and the
guard's epoch-end state scan and checkpoint audits and pins). The per-step time runs from
``on_train_batch_start`` to ``on_train_batch_end`` (forward, backward, the optimizer step or the guard's),
median over all batches of all repeats. Goal: loop ratio <= 1.02.
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import sys
import tempfile
import time
from pathlib import Path
from types import ModuleType
from typing import Any

REPO = Path(__file__).resolve().parents[1]


def load_demo() -> ModuleType:
    """``examples/demo_yolo.py`` as a module (examples/ is not a package)."""
    spec = importlib.util.spec_from_file_location("nanguard_demo_yolo", REPO / "examples" / "demo_yolo.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is created
    spec.loader.exec_module(module)
    return module


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--epochs", type=int, default=5, help="epochs per training (at least 4)")
    parser.add_argument("--repeats", type=int, default=3, help="fault-free trainings per variant for the overhead")
    args = parser.parse_args(argv)
    demo = load_demo()

    from rich.console import Console
    from rich.table import Table

    console = Console(highlight=False, soft_wrap=True, width=150)
    with tempfile.TemporaryDirectory(prefix="nanguard-yolo-bench-") as tmp:
        root = Path(tmp)
        demo.setup_offline(root / "yolo_config")
        data = demo.make_dataset(root / "data")
        faults = demo.make_faults(args.epochs)
        scenarios = {"three faults": faults, "mid-run faults": faults[1:]}
        started = time.perf_counter()

        # warm-up: label cache, first-call costs of torch and Ultralytics, out of every timed run
        demo.train(root / "runs", data, "warmup", guarded=False, faults=[], epochs=1)

        fault_rows: list[tuple[str, str, Any, int]] = []
        for scenario, scenario_faults in scenarios.items():
            for guarded in (False, True):
                name = f"{scenario.replace(' ', '-')}-{'guarded' if guarded else 'plain'}"
                result = demo.train(root / "runs", data, name, guarded=guarded, faults=scenario_faults,
                                    epochs=args.epochs)
                lost = (demo.guard_lost_batches(result.save_dir) if guarded
                        else result.reruns * result.batches_per_epoch)
                fault_rows.append((scenario, "nanguard" if guarded else "Ultralytics alone", result, lost))
                console.print(f"{scenario:15} {'nanguard' if guarded else 'Ultralytics alone':18} "
                              f"done in {result.wall_s:.1f} s")

        from nanguard.policy import Policy

        variants: dict[str, Any] = {
            "unguarded": None,
            "guarded, default policy": Policy(max_grad_norm=10.0),
            "guarded, check every epoch": demo.demo_policy(),
        }
        loop: dict[str, list[float]] = {name: [] for name in variants}
        epoch_level: dict[str, list[float]] = {name: [] for name in variants}
        steps: dict[str, list[float]] = {name: [] for name in variants}
        names = list(variants)
        for repeat in range(args.repeats):
            for variant in names[repeat % len(names):] + names[:repeat % len(names)]:  # rotated order
                policy = variants[variant]
                name = f"clean-{names.index(variant)}-{repeat}"
                result = demo.train(root / "runs", data, name, guarded=policy is not None, faults=[],
                                    epochs=args.epochs, policy=policy)
                if result.loop_s is None or not result.completed:
                    console.print(f"[red]fault-free run {name} did not complete: {result.error}[/]")
                    return 1
                loop[variant].append(result.loop_s)
                epoch_level[variant].append(result.loop_s - sum(result.batch_times))
                steps[variant].extend(result.batch_times)
            console.print(f"overhead repeat {repeat + 1}/{args.repeats} done")
        total = time.perf_counter() - started

    table = Table(title=f"YOLO11n, {args.epochs} epochs, same seed and faults: Ultralytics alone vs nanguard")
    for column in ("scenario", "variant", "completed", "epochs re-run", "batches lost", "wall s", "last.pt",
                   "best.pt", "mAP50-95"):
        table.add_column(column)
    for scenario, variant, result, lost in fault_rows:
        table.add_row(
            scenario, variant, "yes" if result.completed else "no (" + (result.error or "")[:40] + ")",
            str(result.reruns), str(lost), f"{result.wall_s:.1f}", result.verdicts["last.pt"].split(" (")[0],
            result.verdicts["best.pt"].split(" (")[0],
            "n/a" if result.map50_95 is None else f"{result.map50_95:.4f}",
        )
    console.print(table)

    overhead = Table(title=f"fault-free overhead, {args.repeats} rotated repeats per variant, medians "
                           f"(ratio: against unguarded)")
    for column in ("variant", "training loop s", "ratio", "epoch-level s (loop - batches)", "per step ms",
                   "ratio"):
        overhead.add_column(column)
    base_loop, base_step = statistics.median(loop["unguarded"]), statistics.median(steps["unguarded"])
    for variant in variants:
        med_loop, med_step = statistics.median(loop[variant]), statistics.median(steps[variant])
        overhead.add_row(variant, f"{med_loop:.2f}", f"{med_loop / base_loop:.3f}x",
                         f"{statistics.median(epoch_level[variant]):.2f}", f"{med_step * 1e3:.1f}",
                         f"{med_step / base_step:.3f}x")
    console.print(overhead)
    for variant in variants:
        console.print(f"loop times (s), {variant}: {[round(t, 2) for t in loop[variant]]}")
    console.print(f"goal: training loop ratio <= 1.02x; benchmark took {total:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
