"""supervised_yolo.py trains a tiny YOLO11n that diverges once, for tests/test_supervisor.py to run under
``nanguard run``::

    python tests/supervised_yolo.py DATA_YAML RUN_DIR [--epochs 3] [--fault-plan FILE] [--fault-epoch 1]

``RUN_DIR`` becomes the Ultralytics run folder (``project`` = its parent, ``name`` = its name,
``exist_ok=True``, so the folder ``nanguard run`` already created is used, not ``RUN_DIR2``).

The fault is real: at the end of the first batch of epoch ``--fault-epoch`` (0-based) one weight of the live
model is filled with NaN, so every later loss of that epoch is NaN and Ultralytics prints ``nan`` in its
progress line. It happens only if the ``--fault-plan`` file exists, and the file is removed when the fault is
injected: the test's plan is "one fault", and a restarted run never meets it again. Nothing else is faked:
the supervisor has to see the NaN lines, stop the process, roll back and resume.

Each batch sleeps ``--pace`` seconds first: without a terminal Ultralytics redraws the progress line at most
every 0.1 s, so a fast batch may get no frame; pacing gives every batch its frame. The environment
(``YOLO_OFFLINE``, ``YOLO_CONFIG_DIR``) comes from the caller.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("data")
    parser.add_argument("run_dir")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--fault-plan", default=None, help="inject the fault once, only while this file exists")
    parser.add_argument("--fault-epoch", type=int, default=1)
    parser.add_argument("--pace", type=float, default=0.15)
    args = parser.parse_args()
    run_dir = Path(args.run_dir).resolve()
    plan = Path(args.fault_plan) if args.fault_plan else None

    from ultralytics import YOLO

    model = YOLO("yolo11n.yaml")
    state = {"batch": -1}

    def epoch_start(trainer: Any) -> None:
        state["batch"] = -1

    def batch_start(trainer: Any) -> None:
        state["batch"] += 1
        time.sleep(args.pace)

    def batch_end(trainer: Any) -> None:
        if plan is not None and plan.exists() and trainer.epoch == args.fault_epoch and state["batch"] == 0:
            plan.unlink()
            next(trainer.model.parameters()).data.fill_(float("nan"))
            print(f"supervised_yolo: NaN injected into a weight at epoch {trainer.epoch} batch 0", flush=True)

    model.add_callback("on_train_epoch_start", epoch_start)
    model.add_callback("on_train_batch_start", batch_start)
    model.add_callback("on_train_batch_end", batch_end)
    model.train(
        data=args.data, epochs=args.epochs, imgsz=32, batch=2, nbs=2, device="cpu", workers=0, plots=False,
        amp=False, project=str(run_dir.parent), name=run_dir.name, exist_ok=True, save_period=1, warmup_epochs=0,
        val=True, seed=0, deterministic=False, cache=False, mosaic=0.0,
    )


if __name__ == "__main__":
    main()
