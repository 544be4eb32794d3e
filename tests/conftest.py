"""Session fixtures shared by the whole suite: checkpoints written by real Ultralytics, Lightning and HF
Trainer runs, and the offline Ultralytics setup (``YOLO_OFFLINE``, a private ``YOLO_CONFIG_DIR`` with a
local font).

Each framework trains once per session (tiny models, a few CPU steps, no network).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch


@pytest.fixture(scope="session")
def yolo_offline(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Ultralytics configured for offline CPU runs; yields its config folder. Set before ultralytics is imported."""
    import matplotlib

    config = tmp_path_factory.mktemp("yolo_config")
    font = Path(matplotlib.__file__).parent / "mpl-data" / "fonts" / "ttf" / "DejaVuSans.ttf"
    for folder in (config, config / "Ultralytics"):
        folder.mkdir(exist_ok=True)
        shutil.copy(font, folder / "Arial.ttf")  # check_font finds it locally and downloads nothing
    env = {
        "YOLO_OFFLINE": "1",
        "YOLO_CONFIG_DIR": str(config),
        "YOLO_VERBOSE": "false",
        "YOLO_AUTOINSTALL": "false",
        "ULTRALYTICS_SKIP_REQUIREMENTS_CHECKS": "1",
    }
    with pytest.MonkeyPatch.context() as mp:
        for key, value in env.items():
            mp.setenv(key, value)
        yield config


def make_yolo_dataset(root: Path, *, n_train: int = 8, n_val: int = 4, size: int = 64) -> Path:
    """A tiny synthetic detection dataset (one bright box per image) and its data.yaml; returns the yaml."""
    import cv2

    rng = np.random.default_rng(0)
    for split, count in (("train", n_train), ("val", n_val)):
        (root / "images" / split).mkdir(parents=True)
        (root / "labels" / split).mkdir(parents=True)
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


def train_yolo(project: Path, data: Path, *, epochs: int, inject_nan: bool = False) -> Path:
    """Train YOLO11n from its yaml on CPU; returns the run's ``weights`` folder.

    With ``inject_nan``, one parameter of the live model becomes NaN after the first batch: a real
    divergence in epoch 0 that Ultralytics 8.4 scrubs to zeros when it saves.
    """
    from ultralytics import YOLO

    model = YOLO("yolo11n.yaml")
    if inject_nan:
        def poison(trainer: Any) -> None:
            if trainer.epoch == 0:
                next(trainer.model.parameters()).data.fill_(float("nan"))

        model.add_callback("on_train_batch_end", poison)
    model.train(
        data=str(data), epochs=epochs, imgsz=32, batch=4, nbs=4, device="cpu", workers=0, plots=False,
        amp=False, project=str(project), name="run", exist_ok=True, save_period=1, warmup_epochs=0,
        val=True, verbose=False, seed=0, deterministic=False, cache=False, mosaic=0.0,
    )
    return project / "run" / "weights"


@pytest.fixture(scope="session")
def yolo_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The data.yaml of a tiny synthetic dataset."""
    return make_yolo_dataset(tmp_path_factory.mktemp("yolo_data"))


@pytest.fixture(scope="session")
def yolo_clean_run(yolo_offline: Path, yolo_dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Weights folder of a healthy 2-epoch run: ``epoch0.pt``/``epoch1.pt`` mid-training, ``last.pt`` stripped."""
    return train_yolo(tmp_path_factory.mktemp("yolo_clean"), yolo_dataset, epochs=2)


@pytest.fixture(scope="session")
def yolo_scrubbed_run(yolo_offline: Path, yolo_dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Weights folder of a 1-epoch run that went NaN in epoch 0 and was saved by Ultralytics' scrubbing."""
    return train_yolo(tmp_path_factory.mktemp("yolo_nan"), yolo_dataset, epochs=1, inject_nan=True)


@pytest.fixture(scope="session")
def lightning_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The ``.ckpt`` written by ``ModelCheckpoint`` during a real 2-epoch Lightning fit."""
    from tests.ckpt.models import fit_lightning

    return fit_lightning(tmp_path_factory.mktemp("lightning"))


@pytest.fixture(scope="session")
def hf_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A ``checkpoint-N`` folder written by a real HF Trainer run of a tiny random BERT."""
    pytest.importorskip("accelerate", reason="HF Trainer needs accelerate")
    from tests.ckpt.models import train_hf

    return train_hf(tmp_path_factory.mktemp("hf"))


@pytest.fixture()
def small_state(tmp_path: Path) -> dict[str, Any]:
    """A small model's state dict and AdamW state after one real step."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.Flatten(),
                                torch.nn.Linear(4, 2))
    optimizer = torch.optim.AdamW(model.parameters())
    model(torch.randn(2, 3, 3, 3)).sum().backward()
    optimizer.step()
    return {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "epoch": 1}


@pytest.fixture(scope="session")
def marker_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder where a malicious pickle would drop its marker file."""
    return tmp_path_factory.mktemp("markers")


def copy_tree(src: Path, dst: Path) -> Path:
    """Copy a checkpoint file or folder; returns the copy."""
    if src.is_dir():
        shutil.copytree(src, dst)
    else:
        shutil.copy(src, dst)
    return dst


os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(scope="session")
def yolo_periodic_run(yolo_offline: Path, yolo_dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Run folder (the one holding ``weights/``) of a finished healthy 4-epoch run with ``save_period=1``:
    ``weights/epoch0.pt`` … ``epoch3.pt`` mid-training, ``last.pt``/``best.pt`` stripped, 4 rows in results.csv.

    Tests that change it must work on a copy (:func:`copy_tree`).
    """
    return train_yolo(tmp_path_factory.mktemp("yolo_periodic"), yolo_dataset, epochs=4).parent
