"""logscan_train.py trains a tiny YOLO11n (guarded, or with ``--unguarded`` Ultralytics alone) so that
tests/test_scan_log.py can read its console log.

It is run as a subprocess with stdout and stderr redirected to a file, the way users get their logs
(``yolo train ... > train.log 2>&1``)::

    python tests/logscan_train.py DATA_YAML PROJECT [--epochs 3] [--nan-at EPOCH,BATCH] [--pace SECONDS]
        [--unguarded]

``--nan-at`` puts NaN into the input images of one batch (after Ultralytics' own preprocessing), once: a real
fault whose loss is NaN, which the guard skips and journals with that epoch and batch index (unguarded, the
NaN reaches the weights and Ultralytics' own recovery reloads ``last.pt`` and re-runs the epoch). ``--pace``
sleeps at the start of every batch; see :func:`main` for why. The environment (``YOLO_OFFLINE``,
``YOLO_CONFIG_DIR``) comes from the caller.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("data")
    parser.add_argument("project")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--nan-at", default=None, help="EPOCH,BATCH (0-based) whose input images become NaN")
    parser.add_argument("--pace", type=float, default=0.15)
    parser.add_argument("--unguarded", action="store_true", help="train with Ultralytics alone (no nanguard)")
    args = parser.parse_args()
    nan_at = tuple(int(v) for v in args.nan_at.split(",")) if args.nan_at else None

    from ultralytics import YOLO

    from nanguard.integrations.ultralytics import guard

    model = YOLO("yolo11n.yaml")
    if not args.unguarded:
        guard(model)
    state = {"batch": -1, "injected": False}

    def epoch_start(trainer: Any) -> None:
        state["batch"] = -1

    def batch_start(trainer: Any) -> None:
        state["batch"] += 1
        # Pacing: Ultralytics redraws the progress line at most every 0.1 s, and set_description (after the
        # batch's forward/backward/step) draws it only when 0.1 s passed since the last frame. Sleeping here,
        # before the batch's work, makes every batch's frame appear, so the log's first NaN batch is exact.
        time.sleep(args.pace)

    def wrap_preprocess(trainer: Any) -> None:
        original = trainer.preprocess_batch  # already the guard's wrapper (it records the image files)

        def preprocess(batch: dict[str, Any]) -> dict[str, Any]:
            batch = original(batch)
            if nan_at == (trainer.epoch, state["batch"]) and not state["injected"]:
                state["injected"] = True  # once: Ultralytics' own NaN recovery may re-run the epoch
                batch["img"][0].fill_(float("nan"))  # one image of this batch is NaN: a real input fault
            return batch

        trainer.preprocess_batch = preprocess

    model.add_callback("on_train_epoch_start", epoch_start)
    model.add_callback("on_train_batch_start", batch_start)
    model.add_callback("on_pretrain_routine_end", wrap_preprocess)
    model.train(
        data=args.data, epochs=args.epochs, imgsz=32, batch=4, nbs=4, device="cpu", workers=0, plots=False,
        amp=False, project=str(Path(args.project).resolve()), name="run", exist_ok=True, warmup_epochs=0,
        val=True, seed=0, deterministic=False, cache=False, mosaic=0.0,
    )


if __name__ == "__main__":
    main()
