"""A guarded YOLO training that meets a NaN weight, then ``nanguard status``, ``nanguard plan`` and ``nanguard report``
on its run folder: offline, on the CPU, in about 30 s.

1. Writes the tiny synthetic dataset of ``examples/yolo_guarded.py`` (8 train and 4 val images) and trains
   ``YOLO("yolo11n.yaml")`` guarded for 4 epochs (imgsz 32, batch 4, ``nbs=4``: two optimizer steps per epoch).
2. After epoch 1, batch 0 a callback writes NaN into one weight. The next step's loss is NaN; the guard finds the
   weight, rolls back in process to its last clean snapshot, backs the LR off and trains on. The journal records
   the incidents, the rollback, every step's loss, gradient norm and LR, and the checkpoint verdicts.
3. Runs ``nanguard status RUN``, ``nanguard plan RUN`` and ``nanguard report RUN -o RUN/report.html`` (the report's
   PNGs land beside it) and prints where the report is. Exits 1 when a command fails or a plot is missing.

Run it with::

    .venv/bin/python examples/report_yolo.py             # in a new temporary folder, kept: open its report.html
    .venv/bin/python examples/report_yolo.py out/report  # in out/report
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the dataset and offline setup of yolo_guarded.py
from yolo_guarded import make_dataset, offline

FAULT_EPOCH, FAULT_BATCH = 1, 0


class NanWeight:
    """Callbacks that write NaN into the first weight once, after epoch ``FAULT_EPOCH``, batch ``FAULT_BATCH``."""

    def __init__(self) -> None:
        self.batch_index = -1

    def on_train_epoch_start(self, trainer: Any) -> None:
        self.batch_index = -1

    def on_train_batch_start(self, trainer: Any) -> None:
        self.batch_index += 1

    def on_train_batch_end(self, trainer: Any) -> None:
        import torch

        if (trainer.epoch, self.batch_index) == (FAULT_EPOCH, FAULT_BATCH):
            with torch.no_grad():
                weight = next(trainer.model.parameters())
                weight[(0,) * weight.dim()] = float("nan")  # by index: on CUDA it may be channels-last


def train(work: Path) -> Path:
    """Train guarded in ``work`` with the fault; returns the run folder."""
    offline(work / "yolo_config")
    data = work / "data" / "data.yaml"
    if not data.is_file():
        make_dataset(work / "data")

    from ultralytics import YOLO

    from nanguard.integrations.ultralytics import guard
    from nanguard.policy import Policy

    model = YOLO("yolo11n.yaml")
    guarded = guard(model, policy=Policy(max_grad_norm=10.0))  # Ultralytics' own clip norm
    fault = NanWeight()
    for event in ("on_train_epoch_start", "on_train_batch_start", "on_train_batch_end"):
        model.add_callback(event, getattr(fault, event))
    model.train(data=str(data), epochs=4, imgsz=32, batch=4, nbs=4, device="cpu", workers=0, plots=False,
                amp=False, project=str(work / "runs"), name="report", exist_ok=True, save_period=1,
                warmup_epochs=0, mosaic=0.0, seed=0, verbose=False)
    return Path(guarded.trainer.save_dir)


def nanguard(*args: str) -> int:
    print(f"\n$ nanguard {' '.join(args)}", flush=True)
    return subprocess.run([sys.executable, "-m", "nanguard", *args], check=False).returncode


def main() -> int:
    work = Path(sys.argv[1]).resolve() if len(sys.argv) > 1 else Path(tempfile.mkdtemp(prefix="nanguard_report_"))
    work.mkdir(parents=True, exist_ok=True)
    run = train(work)
    report = run / "report.html"
    codes = [nanguard("status", str(run)), nanguard("plan", str(run)), nanguard("report", str(run), "-o", str(report))]
    pngs = sorted(run.glob("report_*.png"))
    if any(codes) or not report.is_file() or len(pngs) != 4:
        print(f"\nFAILED: exit codes {codes}, report written: {report.is_file()}, PNGs: {len(pngs)}")
        return 1
    print(f"\nOK: open {report} in a browser (self-contained); PNGs: {', '.join(p.name for p in pngs)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
