"""The guard's fault-free overhead on a YOLO11n training, at epoch lengths closer to real ones than the demo's.

Run (from the repository root)::

    .venv/bin/python benchmarks/yolo_overhead.py                                   # CPU, about 4 minutes
    python benchmarks/yolo_overhead.py --device 0 --amp --images 2048 --imgsz 320 --batch 32 --epochs 3

``benchmarks/yolo_vs_builtin.py`` measures faults and recovery on 4-batch epochs, where the guard's fixed
cost per epoch (the state check and snapshot at the epoch's end, the audit, hash and pin of the checkpoint
Ultralytics writes) is large next to the epoch itself. A real epoch has thousands of batches. This benchmark
separates the two costs so the ratio at any epoch length can be read off:

* the training loop (``on_train_start`` to ``on_train_end``: batches, validation, saving, the guard's epoch-end
  work), unguarded vs guarded with the default policy (``Policy(max_grad_norm=10.0)``: Ultralytics' own clip;
  state check every 100 steps and at each epoch end), ``--repeats`` rotated repeats, medians, and their ratio;
* the per-batch time (``on_train_batch_start`` to ``on_train_batch_end``), median over all batches, and ratio;
* the guard's epoch-level cost: (guarded loop - guarded batches) - (unguarded loop - unguarded batches), per
  epoch; and the loop ratio this implies for an epoch of ``--project-batches`` batches.

On a GPU the batch timer waits for the device (``torch.cuda.synchronize`` at both ends), so a batch's time is
its real time, not its launch time. Same seed, same generated data set (``examples/demo_yolo.py``'s), offline.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from yolo_vs_builtin import load_demo  # benchmarks/ is not a package: imported by path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--device", default="cpu", help="Ultralytics device: cpu, 0, ...")
    parser.add_argument("--amp", action="store_true", help="mixed precision (Ultralytics' GradScaler); CUDA only")
    parser.add_argument("--images", type=int, default=64, help="training images (batches per epoch = images/batch)")
    parser.add_argument("--imgsz", type=int, default=64)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=3, help="trainings per variant, order rotated")
    parser.add_argument("--project-batches", type=int, default=40_000,
                        help="batches per epoch for the projected ratio (our users' epochs: 40,000)")
    args = parser.parse_args(argv)
    demo = load_demo()

    import torch

    from nanguard.policy import Policy

    cuda = args.device not in ("cpu", "mps")
    with tempfile.TemporaryDirectory(prefix="nanguard-yolo-overhead-") as tmp:
        root = Path(tmp)
        demo.setup_offline(root / "yolo_config")
        data = demo.make_dataset(root / "data", n_train=args.images, n_val=max(args.images // 8, 4), size=args.imgsz)
        if cuda:
            _synchronize_batch_timer(demo, torch)

        def run(name: str, policy: Any) -> Any:
            result = demo.train(root / "runs", data, name, guarded=policy is not None, faults=[],
                                epochs=args.epochs, policy=policy, device=args.device, imgsz=args.imgsz,
                                batch=args.batch, amp=args.amp)
            if not result.completed or result.loop_s is None:
                raise SystemExit(f"training {name} did not complete: {result.error}")
            return result

        run("warmup", None)  # label cache, cuDNN autotuning, first-call costs: out of every timed run
        variants: dict[str, Any] = {"unguarded": None, "guarded": Policy(max_grad_norm=10.0)}
        loop: dict[str, list[float]] = {v: [] for v in variants}
        epoch_level: dict[str, list[float]] = {v: [] for v in variants}
        batches: dict[str, list[float]] = {v: [] for v in variants}
        names = list(variants)
        batches_per_epoch = 0
        for repeat in range(args.repeats):
            for variant in names[repeat % 2:] + names[:repeat % 2]:
                result = run(f"{variant}-{repeat}", variants[variant])
                batches_per_epoch = result.batches_per_epoch
                loop[variant].append(result.loop_s)
                epoch_level[variant].append((result.loop_s - sum(result.batch_times)) / args.epochs)
                batches[variant].extend(result.batch_times)
            print(f"repeat {repeat + 1}/{args.repeats}: "
                  + ", ".join(f"{v} loop {loop[v][-1]:.2f} s" for v in names), flush=True)

    device = torch.cuda.get_device_name(0) if cuda else "CPU"
    med = {v: statistics.median(loop[v]) for v in names}
    step = {v: statistics.median(batches[v]) for v in names}
    per_epoch = {v: statistics.median(epoch_level[v]) for v in names}
    guard_epoch_cost = per_epoch["guarded"] - per_epoch["unguarded"]
    print(f"\nYOLO11n on {device}, {args.images} images at {args.imgsz} px, batch {args.batch} "
          f"({batches_per_epoch} batches per epoch), amp={args.amp}, {args.epochs} epochs, "
          f"{args.repeats} rotated repeats, medians")
    print(f"{'':28}{'unguarded':>12}{'guarded':>12}{'ratio':>9}")
    print(f"{'training loop, s':28}{med['unguarded']:12.2f}{med['guarded']:12.2f}"
          f"{med['guarded'] / med['unguarded']:9.3f}")
    print(f"{'per batch, ms':28}{step['unguarded'] * 1e3:12.2f}{step['guarded'] * 1e3:12.2f}"
          f"{step['guarded'] / step['unguarded']:9.3f}")
    print(f"{'epoch-level (loop - batches), s':28}{per_epoch['unguarded']:12.3f}{per_epoch['guarded']:12.3f}")
    print(f"guard's epoch-level cost: {guard_epoch_cost * 1e3:.0f} ms per epoch")
    for n in (batches_per_epoch, 1_000, args.project_batches):
        unguarded = n * step["unguarded"] + per_epoch["unguarded"]
        guarded = n * step["guarded"] + per_epoch["guarded"]
        print(f"projected loop ratio at {n:>6} batches per epoch: {guarded / unguarded:.4f}")
    print("goal: <= 1.02")
    return 0


def _synchronize_batch_timer(demo: Any, torch: Any) -> None:
    """Make the demo's per-batch timer wait for the GPU at both ends, so it measures work, not launches."""
    injector = demo.FaultInjector
    start, end = injector._batch_start, injector._batch_end

    def batch_start(self: Any, trainer: Any) -> None:
        torch.cuda.synchronize()
        start(self, trainer)

    def batch_end(self: Any, trainer: Any) -> None:
        torch.cuda.synchronize()
        end(self, trainer)

    injector._batch_start, injector._batch_end = batch_start, batch_end


if __name__ == "__main__":
    started = time.perf_counter()
    code = main()
    print(f"benchmark took {time.perf_counter() - started:.0f} s")
    sys.exit(code)
