"""A guarded Ultralytics YOLO training with one injected NaN gradient, offline, on the CPU, in seconds.

1. Writes a tiny synthetic detection dataset (8 train and 4 val images of 64x64 pixels, one bright box each)
   and its ``data.yaml``.
2. Builds ``YOLO("yolo11n.yaml")`` (from its yaml: nothing is downloaded), attaches nanguard with
   ``nanguard.integrations.ultralytics.guard(model)`` and trains 2 epochs (imgsz 32, batch 4, ``nbs=4``: two
   optimizer steps per epoch, ``save_period=1``).
3. A callback arms a one-shot ``register_hook`` at epoch 1, batch 0 that turns the gradient of the first
   weight into NaN. Unguarded, the optimizer would write NaN into the weights; guarded, the step is skipped
   before it is applied and the incident is journaled with the batch's image files.
4. Prints the incident rows from the journal (``<save_dir>/.nanguard/journal.db``) and the audit of every
   ``weights/*.pt``. Exits 1 when a checkpoint is not clean or the fault was not caught.

Offline: sets ``YOLO_OFFLINE`` and points ``YOLO_CONFIG_DIR`` at a fresh folder holding ``Arial.ttf`` (a copy
of matplotlib's DejaVuSans), before Ultralytics is imported, so that nothing is fetched from the network.

Run it (about 15 s on a CPU) with::

    .venv/bin/python examples/yolo_guarded.py            # in a temporary folder, removed afterwards
    .venv/bin/python examples/yolo_guarded.py out/yolo   # keeps the dataset and the run in out/yolo
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

NAN = float("nan")
FAULT_EPOCH, FAULT_BATCH = 1, 0


def offline(config_dir: Path) -> None:
    """Ultralytics without network: the offline flag, and a config folder with a local ``Arial.ttf``."""
    import matplotlib

    font = Path(matplotlib.__file__).parent / "mpl-data" / "fonts" / "ttf" / "DejaVuSans.ttf"
    for folder in (config_dir, config_dir / "Ultralytics"):
        folder.mkdir(parents=True, exist_ok=True)
        shutil.copy(font, folder / "Arial.ttf")  # Ultralytics' check_font finds it and downloads nothing
    os.environ.update({"YOLO_OFFLINE": "1", "YOLO_CONFIG_DIR": str(config_dir), "YOLO_VERBOSE": "false",
                       "YOLO_AUTOINSTALL": "false", "ULTRALYTICS_SKIP_REQUIREMENTS_CHECKS": "1"})


def make_dataset(root: Path, *, n_train: int = 8, n_val: int = 4, size: int = 64) -> Path:
    """A tiny synthetic detection dataset (one bright box per image) and its data.yaml; returns the yaml."""
    import cv2
    import numpy as np

    rng = np.random.default_rng(0)
    for split, count in (("train", n_train), ("val", n_val)):
        (root / "images" / split).mkdir(parents=True, exist_ok=True)
        (root / "labels" / split).mkdir(parents=True, exist_ok=True)
        for i in range(count):
            image = rng.integers(0, 60, (size, size, 3), dtype=np.uint8)
            x0, y0 = rng.integers(4, size // 2, 2)
            w, h = rng.integers(size // 6, size // 3, 2)
            image[y0 : y0 + h, x0 : x0 + w] = 230
            cv2.imwrite(str(root / "images" / split / f"{i}.png"), image)
            cx, cy = (x0 + w / 2) / size, (y0 + h / 2) / size
            (root / "labels" / split / f"{i}.txt").write_text(f"0 {cx:.4f} {cy:.4f} {w / size:.4f} {h / size:.4f}\n")
    data = root / "data.yaml"
    data.write_text(f"path: {root}\ntrain: images/train\nval: images/val\nnames:\n  0: box\n")
    return data


class NanGradient:
    """Callbacks that turn one weight's gradient into NaN once, at epoch ``FAULT_EPOCH``, batch ``FAULT_BATCH``."""

    def __init__(self) -> None:
        self.batch_index = -1

    def on_train_epoch_start(self, trainer: Any) -> None:
        self.batch_index = -1

    def on_train_batch_start(self, trainer: Any) -> None:
        import torch

        self.batch_index += 1
        if (trainer.epoch, self.batch_index) != (FAULT_EPOCH, FAULT_BATCH):
            return
        handle: Any = None

        def poison(grad: torch.Tensor) -> torch.Tensor:
            handle.remove()  # one shot: the next backward pass is healthy again
            return torch.full_like(grad, NAN)

        handle = next(trainer.model.parameters()).register_hook(poison)


def train(work: Path, *, kept: bool) -> int:
    """Train guarded in ``work``; print the incidents and the audits; return the exit status."""
    offline(work / "yolo_config")
    data = make_dataset(work / "data")

    from ultralytics import YOLO

    from nanguard import read_incidents
    from nanguard.ckpt import Status, audit
    from nanguard.integrations.ultralytics import guard

    model = YOLO("yolo11n.yaml")
    guarded = guard(model)  # the policy in the current folder, else the defaults (with Ultralytics' clip at 10)
    fault = NanGradient()
    model.add_callback("on_train_epoch_start", fault.on_train_epoch_start)
    model.add_callback("on_train_batch_start", fault.on_train_batch_start)
    model.train(data=str(data), epochs=2, imgsz=32, batch=4, nbs=4, device="cpu", workers=0, plots=False,
                amp=False, project=str(work / "runs"), name="guarded", exist_ok=True, save_period=1,
                warmup_epochs=0, mosaic=0.0, seed=0, verbose=False)
    save_dir = Path(guarded.trainer.save_dir)

    print(f"\nrun: {save_dir}")
    print(f"steps: {[r.action.value if r.action else None for r in guarded.results]}")
    print(f"journal: {save_dir / '.nanguard' / 'journal.db'}")
    incidents = read_incidents(save_dir)
    print(f"\nincidents ({len(incidents)}):")
    for row in incidents:
        files = [Path(f).name for f in row["sample_ids"] or []]
        print(f"  step {row['step']}  epoch {row['epoch']}  batch {row['batch_index']}  {row['kind']} -> "
              f"{row['action']}  tensors {row['tensors']}  images {files}")

    print("\ncheckpoints:")
    dirty = 0
    for path in sorted((save_dir / "weights").glob("*.pt")):
        verdict = audit(path)
        dirty += verdict.status is not Status.CLEAN
        print(f"  {verdict.status.value:<10} {path.name:<12} epoch {verdict.epoch}")

    caught = any((r["kind"], r["epoch"], r["batch_index"]) == ("nonfinite_grad", FAULT_EPOCH, FAULT_BATCH)
                 for r in incidents)
    if not caught:
        print("\nFAILED: the injected NaN gradient is not in the journal")
    if dirty:
        print(f"\nFAILED: {dirty} checkpoint(s) not clean")
    if caught and not dirty:
        print("\nOK: the NaN gradient was skipped; every checkpoint is clean")
        if kept:
            print(f"more: nanguard incidents {save_dir}")
    return 0 if caught and not dirty else 1


def main() -> int:
    if len(sys.argv) > 1:
        work = Path(sys.argv[1]).resolve()
        work.mkdir(parents=True, exist_ok=True)
        return train(work, kept=True)
    with tempfile.TemporaryDirectory(prefix="nanguard_yolo_") as tmp:
        return train(Path(tmp), kept=False)


if __name__ == "__main__":
    sys.exit(main())
