"""Resume from disk is exact: a training process killed with SIGKILL at a random step, then resumed from
the newest clean snapshot on disk, reaches the same final weights as a run that was never interrupted."""

from __future__ import annotations

import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import nanguard

SCRIPT = Path(__file__).with_name("resume_script.py")


def run(*args: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(SCRIPT), *map(str, args)], capture_output=True, text=True,
                          timeout=300)


@pytest.mark.parametrize("kill_at", [random.randint(6, 27), 10], ids=["random_step", "right_after_a_snapshot"])
def test_sigkill_then_resume_reaches_the_same_weights_as_an_uninterrupted_run(tmp_path: Path, kill_at: int) -> None:
    whole = run(tmp_path / "whole", tmp_path / "whole.pt")
    assert whole.returncode == 0, whole.stderr

    killed = run(tmp_path / "killed", tmp_path / "unused.pt", "--kill-at", kill_at)
    assert killed.returncode == -9, f"kill at {kill_at}: {killed.stderr}"
    assert not (tmp_path / "unused.pt").exists()
    resumed = run(tmp_path / "killed", tmp_path / "resumed.pt", "--resume")
    assert resumed.returncode == 0, f"kill at {kill_at}: {resumed.stderr}"
    newest_before_kill = kill_at // 5 * 5  # snapshot N is written at the end of step N - 1, N = 5, 10, ...
    assert f"resumed at step {newest_before_kill}" in resumed.stdout, (kill_at, resumed.stdout)

    expected = torch.load(tmp_path / "whole.pt", weights_only=True)
    actual = torch.load(tmp_path / "resumed.pt", weights_only=True)
    assert actual["step"] == expected["step"] == 30
    for part in ("model", "scheduler"):
        for key, value in expected[part].items():
            assert torch.equal(torch.as_tensor(actual[part][key]), torch.as_tensor(value)), (kill_at, part, key)
    for index, state in expected["optimizer"]["state"].items():
        for key, value in state.items():
            assert torch.equal(actual["optimizer"]["state"][index][key], value), (kill_at, index, key)
    assert torch.equal(actual["rng"], expected["rng"]), kill_at
    resumes = [a for a in nanguard.read_actions(tmp_path / "killed") if a["action"] == "resume"]
    assert [a["step"] for a in resumes] == [newest_before_kill]


def test_resume_without_a_snapshot_is_a_fresh_start(tmp_path: Path) -> None:
    model = torch.nn.Linear(2, 2)
    guard = nanguard.Guard(model, torch.optim.SGD(model.parameters(), lr=0.1), run_dir=tmp_path)
    assert guard.resume() is None
    assert guard.step_count == 0
