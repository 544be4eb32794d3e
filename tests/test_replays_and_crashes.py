"""What a reader of the journal sees after in-process rollbacks and a killed process: ``status``,
``incidents`` and ``report`` say which incidents were on steps a rollback undid and ran again (``replay``, the
attempt), which micro-batch each loss came from, and that a run whose process died while "running" crashed.

The run is real: ``tests/replay_crash_script.py`` trains with two micro-batches per step, meets an infinite
loss in micro-batch 1 of step 3 and a NaN weight after step 7, rolls back to step 5 and SIGKILLs itself at
step 14."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from nanguard.cli import app

runner = CliRunner()
SCRIPT = Path(__file__).with_name("replay_crash_script.py")


@pytest.fixture(scope="module")
def killed_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run_dir = tmp_path_factory.mktemp("replay") / "run"
    done = subprocess.run([sys.executable, str(SCRIPT), str(run_dir)], capture_output=True, text=True, timeout=120)
    assert done.returncode == -signal.SIGKILL, done.stderr
    return run_dir


def invoke_json(*args: str) -> object:
    result = runner.invoke(app, [*args, "--json"])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


@pytest.mark.slow
def test_status_of_a_sigkilled_run_says_crashed_with_its_attempt(killed_run: Path) -> None:
    status = invoke_json("status", str(killed_run))
    assert isinstance(status, dict)
    assert status["state"] == "crashed"
    assert status["attempts"] == 1  # one in-process rollback
    assert status["incidents"] == 4 and status["incidents_replayed"] == 3
    text = runner.invoke(app, ["status", str(killed_run)]).stdout
    assert "crashed" in text and "3 of them on steps a rollback undid and ran again (attempt 1 now)" in text


@pytest.mark.slow
def test_incidents_name_the_micro_batch_and_the_replayed_steps(killed_run: Path) -> None:
    rows = invoke_json("incidents", str(killed_run))
    assert isinstance(rows, list)
    got = [(r["step"], r["kind"], r["micro_batch"], r["attempt"], r["replay"]) for r in rows]
    assert got == [
        (3, "nonfinite_loss", 1, 0, False),   # before the rollback's target: kept
        (8, "nonfinite_loss", 0, 0, True),    # step 8 was undone (back to step 5) and ran again in attempt 1
        (8, "nonfinite_loss", 1, 0, True),
        (8, "nonfinite_model", None, 0, True),
    ]
    text = runner.invoke(app, ["incidents", str(killed_run)], terminal_width=200).stdout
    header = text.splitlines()[0].split()
    assert header[:6] == ["id", "step", "epoch", "batch", "micro", "rank"]
    assert "3 on steps a rollback undid and ran again" in text


@pytest.mark.slow
def test_report_shows_micro_batch_and_attempt(killed_run: Path, tmp_path: Path) -> None:
    out = tmp_path / "report.html"
    result = runner.invoke(app, ["report", str(killed_run), "-o", str(out)])
    assert result.exit_code == 0, result.output
    html = out.read_text()
    assert "<th>micro-batch</th><th>attempt</th>" in html
