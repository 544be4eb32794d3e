"""nanoGPT's loop (its disabled GradScaler, its clip, 4 micro-batches, its LR schedule) adopts the guard with the
edits docs/guard.md lists, and every micro-batch's loss is checked: a NaN in micro-batch 0 and a spike in
micro-batch 2 are both caught, named by micro-batch and loop step, and skipped."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest

import nanguard

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "nanogpt_train.py"


def load_example() -> ModuleType:
    spec = importlib.util.spec_from_file_location("nanogpt_train", EXAMPLE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_nanogpt_loop_catches_a_nan_and_a_spike_in_single_micro_batches(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    example = load_example()
    assert example.main(["--out-dir", str(tmp_path), "--nan-micro", "30:0", "--spike-micro", "60:2"]) == 0
    out = capsys.readouterr().out
    rows = nanguard.read_incidents(tmp_path)
    assert [(r["kind"], r["step"], r["action"]) for r in rows] == [
        ("nonfinite_loss", 30, "skip"), ("loss_spike", 60, "skip")]
    assert [(r["micro_batch"], r["loop_step"]) for r in rows] == [(0, 30), (2, 60)]
    assert "micro-batch 2): loss_spike -> skip" in out
    final = float(out.split("final loss ")[1].split()[0])
    assert final < 1.0  # it trained (from ~3.2) and the NaN never reached the weights
    runs = nanguard.journal.read_runs(tmp_path)
    assert [r["status"] for r in runs] == ["finished"]
