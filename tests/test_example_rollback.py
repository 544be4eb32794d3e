"""``examples/rollback_exact.py`` keeps its promise: run as a user would, it exits 0 and shows that each faulty
run that rolled back ends bit-for-bit where its reference run does, with the steps lost and incident rows."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "rollback_exact.py"
TIMEOUT_S = 300


def test_rollback_example_shows_three_exact_replays(tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, str(EXAMPLE)], capture_output=True, text=True, timeout=TIMEOUT_S,
                          check=False, cwd=tmp_path)
    out = done.stdout + done.stderr
    assert done.returncode == 0, out
    assert len(re.findall(r"^  max \|difference\| = 0\.0 ", out, flags=re.MULTILINE)) == 3, out
    assert "max |difference| = " in out and "NOT EXACT" not in out, out
    lost = [int(n) for n in re.findall(r"steps lost = (\d+);", out)]
    assert lost == [3, 4, 2], out  # each within one snapshot interval (5 steps)
    assert "skipped windows (epoch, first, last): [[1, 4, 4]]" in out, out
    assert re.search(r"nonfinite_model\s+23\s+2\s+3\s+rollback\s+True", out), out
    assert re.search(r"nonfinite_loss\s+14\s+1\s+4\s+rollback\s+True", out), out
    assert "ROLLBACK EXACT" in out, out
