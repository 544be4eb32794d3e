"""On a CUDA device, a guarded YOLO11n training with Ultralytics' mixed precision (its GradScaler) meets the
demo's real faults — a NaN weight in epoch 0, a NaN gradient mid-run, a NaN weight later — and still ends
with every checkpoint clean and each fault in the journal. Under AMP a NaN gradient at a finite loss is the
scaler's ordinary overflow, so the guard lets GradScaler skip that update and lower its scale. Skipped on
machines without CUDA (CI has none); run it where a GPU is lent:
``.venv/bin/pytest tests/integration/test_gpu_yolo_amp.py``."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

REPO = Path(__file__).resolve().parents[2]


def _demo() -> ModuleType:
    spec = importlib.util.spec_from_file_location("nanguard_demo_yolo_gpu", REPO / "examples" / "demo_yolo.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_guarded_amp_training_on_cuda_survives_real_faults_with_clean_checkpoints(tmp_path: Path) -> None:
    pytest.importorskip("ultralytics")
    demo = _demo()
    demo.setup_offline(tmp_path / "yolo_config")
    data = demo.make_dataset(tmp_path / "data", n_train=64, n_val=16, size=128)
    epochs = 4
    faults = demo.make_faults(epochs)
    result = demo.train(tmp_path / "runs", data, "amp", guarded=True, faults=faults, epochs=epochs, device="0",
                        imgsz=128, batch=16, amp=True)
    assert result.completed, result.error
    assert result.injected == faults
    assert result.verdicts["last.pt"].startswith("clean"), result.verdicts
    assert result.verdicts["best.pt"].startswith("clean"), result.verdicts
    from nanguard import read_incidents

    incidents = read_incidents(result.save_dir)
    for fault in faults:
        # Under AMP a NaN gradient at a finite loss is recorded as the scaler's overflow (amp_overflow).
        kinds = fault.expected_kinds() | ({"amp_overflow"} if fault.kind == "grad" else set())
        assert any((i["epoch"], i["batch_index"]) == fault.caught_at() and i["kind"] in kinds for i in incidents), (
            fault, [(i["epoch"], i["batch_index"], i["kind"], i["action"]) for i in incidents])
