"""``examples/yolo_guarded.py`` keeps its promise: run as a user would (offline, in a fresh folder), it exits 0,
the injected NaN gradient shows as a skipped ``nonfinite_grad`` incident at epoch 1, batch 0 with its four image
files, and every ``weights/*.pt`` audits clean."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("ultralytics")

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "yolo_guarded.py"
TIMEOUT_S = 300


def test_yolo_example_skips_the_nan_gradient_and_keeps_checkpoints_clean(tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, str(EXAMPLE), str(tmp_path / "out")], capture_output=True, text=True,
                          timeout=TIMEOUT_S, check=False, cwd=tmp_path)
    out = done.stdout + done.stderr
    assert done.returncode == 0, out
    assert re.search(r"epoch 1  batch 0  nonfinite_grad -> skip  tensors \['model\.0\.conv\.weight'\]  images "
                     r"\['\d\.png', '\d\.png', '\d\.png', '\d\.png'\]", out), out
    assert "steps: ['continue', 'continue', 'skip', 'continue']" in out, out
    statuses = re.findall(r"^  (\w+)\s+(\S+\.pt)", out, flags=re.MULTILINE)
    assert {name for _, name in statuses} >= {"last.pt", "best.pt", "epoch0.pt", "epoch1.pt"}, out
    assert {status for status, _ in statuses} == {"clean"}, out
    assert "OK: the NaN gradient was skipped" in out, out
    assert (tmp_path / "out" / "runs" / "guarded" / ".nanguard" / "journal.db").is_file()
