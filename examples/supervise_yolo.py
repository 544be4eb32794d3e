"""``nanguard run`` around a YOLO training that diverges: stopped, rolled back on disk, resumed, finished clean.

1. Writes a tiny synthetic detection dataset and an offline Ultralytics setup (``YOLO_OFFLINE``, a config
   folder holding a local ``Arial.ttf``) in the output folder.
2. Runs, as a user would in a shell::

       nanguard run --run-dir OUT/runs/a --nan-lines 2 --backoff 0 -- \\
           python examples/supervise_yolo.py --train OUT/data/data.yaml OUT/runs/a --fault-plan OUT/fault-plan

   The training (this file with ``--train``: YOLO11n from its yaml, 3 epochs, imgsz 32, ``save_period=1``)
   puts NaN into one weight at the end of the first batch of epoch index 1, once (only while the fault-plan
   file exists). Ultralytics then prints ``nan`` losses; the supervisor sees two such progress lines, ends
   the process group, rolls the run back to ``weights/epoch0.pt`` (``nanguard.runs``), and restarts with
   ``yolo train resume model=OUT/runs/a/weights/last.pt``.
3. Prints the journal's actions and the audit of every ``weights/*.pt``; exits with the supervisor's status
   (0: finished), or 1 when a checkpoint is not clean.

Run it (about 30 s on a CPU) with::

    .venv/bin/python examples/supervise_yolo.py            # in a temporary folder, removed afterwards
    .venv/bin/python examples/supervise_yolo.py out/sup    # keeps everything in out/sup
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any


def offline_env(out: Path) -> dict[str, str]:
    """Ultralytics without network, and with its progress lines (the supervisor's input)."""
    import matplotlib

    font = Path(matplotlib.__file__).parent / "mpl-data" / "fonts" / "ttf" / "DejaVuSans.ttf"
    config = out / "yolo_config"
    for folder in (config, config / "Ultralytics"):
        folder.mkdir(parents=True, exist_ok=True)
        shutil.copy(font, folder / "Arial.ttf")  # check_font finds it and downloads nothing
    return {**os.environ, "YOLO_OFFLINE": "1", "YOLO_CONFIG_DIR": str(config), "YOLO_VERBOSE": "true",
            "YOLO_AUTOINSTALL": "false", "ULTRALYTICS_SKIP_REQUIREMENTS_CHECKS": "1",
            # the default resume command is `yolo train resume ...`: the `yolo` next to this Python
            "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}


def make_dataset(root: Path) -> Path:
    """8 train and 4 val images of 64x64 pixels, one bright box each; returns the data.yaml."""
    import cv2
    import numpy as np

    rng = np.random.default_rng(0)
    for split, count in (("train", 8), ("val", 4)):
        (root / "images" / split).mkdir(parents=True, exist_ok=True)
        (root / "labels" / split).mkdir(parents=True, exist_ok=True)
        for i in range(count):
            image = rng.integers(0, 60, (64, 64, 3), dtype=np.uint8)
            x0, y0 = rng.integers(4, 32, 2)
            w, h = rng.integers(10, 21, 2)
            image[y0 : y0 + h, x0 : x0 + w] = 230
            cv2.imwrite(str(root / "images" / split / f"{i}.png"), image)
            label = f"0 {(x0 + w / 2) / 64:.4f} {(y0 + h / 2) / 64:.4f} {w / 64:.4f} {h / 64:.4f}\n"
            (root / "labels" / split / f"{i}.txt").write_text(label)
    data = root / "data.yaml"
    data.write_text(f"path: {root}\ntrain: images/train\nval: images/val\nnames:\n  0: box\n")
    return data


def train(data: str, run_dir: Path, fault_plan: Path) -> None:
    """The supervised training: 3 epochs, one real NaN fault at epoch index 1 while ``fault_plan`` exists."""
    from ultralytics import YOLO

    model = YOLO("yolo11n.yaml")
    batch = {"index": -1}

    def epoch_start(trainer: Any) -> None:
        batch["index"] = -1

    def batch_start(trainer: Any) -> None:
        batch["index"] += 1
        time.sleep(0.15)  # without a terminal Ultralytics draws a frame at most every 0.1 s: one per batch

    def batch_end(trainer: Any) -> None:
        if fault_plan.exists() and trainer.epoch == 1 and batch["index"] == 0:
            fault_plan.unlink()  # once: the resumed run trains on normally
            next(trainer.model.parameters()).data.fill_(float("nan"))

    model.add_callback("on_train_epoch_start", epoch_start)
    model.add_callback("on_train_batch_start", batch_start)
    model.add_callback("on_train_batch_end", batch_end)
    model.train(data=data, epochs=3, imgsz=32, batch=2, nbs=2, device="cpu", workers=0, plots=False, amp=False,
                project=str(run_dir.parent), name=run_dir.name, exist_ok=True, save_period=1, warmup_epochs=0,
                mosaic=0.0, seed=0)


def main(out: Path) -> int:
    env = offline_env(out)
    data = make_dataset(out / "data")
    run_dir, plan = out / "runs" / "a", out / "fault-plan"
    plan.touch()
    code = subprocess.call(
        [sys.executable, "-m", "nanguard", "run", "--run-dir", str(run_dir), "--nan-lines", "2", "--backoff", "0",
         "--", sys.executable, str(Path(__file__).resolve()), "--train", str(data), str(run_dir),
         "--fault-plan", str(plan)],
        env=env, cwd=out,
    )
    from nanguard.ckpt import Status, audit
    from nanguard.journal import read_actions

    print(f"\nnanguard run exited {code}; journal actions:")
    for action in read_actions(run_dir):
        print(f"  {action['action']:<20} {action['reason']}")
    print("checkpoints:")
    clean = True
    for path in sorted((run_dir / "weights").glob("*.pt")):
        verdict = audit(path)
        clean &= verdict.status is Status.CLEAN
        print(f"  {verdict.status.value:<8} {path.name}")
    print(f"status file: {run_dir / '.nanguard' / 'supervisor.json'}")
    return code if clean else 1


if __name__ == "__main__":
    if len(sys.argv) == 6 and sys.argv[1] == "--train" and sys.argv[4] == "--fault-plan":
        train(sys.argv[2], Path(sys.argv[3]), Path(sys.argv[5]))
    elif len(sys.argv) > 1:
        Path(sys.argv[1]).mkdir(parents=True, exist_ok=True)
        sys.exit(main(Path(sys.argv[1]).resolve()))
    else:
        with tempfile.TemporaryDirectory(prefix="nanguard-supervise-") as tmp:
            sys.exit(main(Path(tmp)))
