"""The examples keep their promises: each runs end to end as ``make demo`` or a user would run it.

``examples/demo.py`` runs once per session (a subprocess, about 10 s, most of it importing torch twice),
with all four faults injected and its run folder in a temporary directory; several tests read its output
and its journal. ``examples/quickstart_plain.py`` runs once on its own.
"""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import pytest

from nanguard import read_incidents

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
TIMEOUT_S = 300


@dataclass(frozen=True)
class DemoRun:
    returncode: int
    output: str
    run_dir: Path


def _run_example(script: str, *args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(EXAMPLES / script), *args],
        capture_output=True, text=True, timeout=TIMEOUT_S, check=False, cwd=cwd,
    )


def _load_demo_module() -> ModuleType:
    spec = importlib.util.spec_from_file_location("nanguard_demo", EXAMPLES / "demo.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is created
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory: pytest.TempPathFactory) -> DemoRun:
    runs_dir = tmp_path_factory.mktemp("demo_runs")
    done = _run_example("demo.py", "--runs-dir", str(runs_dir), cwd=runs_dir)
    run_dirs = [p for p in runs_dir.iterdir() if p.is_dir()]
    assert len(run_dirs) == 1, f"expected one fresh run folder in {runs_dir}, got {run_dirs}\n{done.stdout}"
    return DemoRun(done.returncode, done.stdout + done.stderr, run_dirs[0])


@pytest.fixture(scope="module")
def demo() -> ModuleType:
    return _load_demo_module()


def test_demo_catches_every_injected_fault_and_ends_clean(demo_run: DemoRun) -> None:
    out = demo_run.output
    assert demo_run.returncode == 0, out
    for label in "abcd":
        injected = re.search(rf"inject \({label}\).*\n(?:.*WARNING.*\n)*\s+caught: ", out)
        assert injected, f"fault ({label}) was not injected or not caught:\n{out}"
    assert "NOT CAUGHT" not in out, out
    assert "faults caught by nanguard: 4 of 4;" in out, out
    assert out.count("weights, buffers and optimizer state untouched") == 3, out  # the three skipped steps
    assert "rolled back to the clean snapshot of step" in out, out
    assert "guarded run: all final weights, buffers and optimizer state are finite" in out, out
    assert "DEMO PASSED" in out and "DEMO FAILED" not in out, out


def test_demo_guarded_accuracy_stays_within_a_few_points_of_the_fault_free_run(
    demo_run: DemoRun, demo: ModuleType
) -> None:
    found = re.search(r"guarded accuracy vs fault-free: ([+-]\d+\.\d+) points", demo_run.output)
    assert found, demo_run.output
    assert float(found.group(1)) >= -demo.MAX_ACCURACY_DROP
    accuracies = [float(a) for a in re.findall(r"test accuracy (\d+\.\d+)%", demo_run.output)]
    assert len(accuracies) == 3, demo_run.output  # fault-free, guarded, unguarded
    assert accuracies[0] > 90.0 and accuracies[1] > 90.0, demo_run.output


def test_demo_unguarded_run_ends_with_nan_weights_and_collapsed_accuracy(demo_run: DemoRun) -> None:
    found = re.search(r"unguarded run: ends with non-finite weights and optimizer state \((\d+) tensors\) "
                      r"and (\d+\.\d+)% accuracy", demo_run.output)
    assert found, demo_run.output
    assert int(found.group(1)) > 0
    assert float(found.group(2)) < 20.0  # ten classes: NaN logits leave chance level at best


def test_demo_journal_records_each_fault_at_its_step_with_the_action_taken(
    demo_run: DemoRun, demo: ModuleType
) -> None:
    incidents = read_incidents(demo_run.run_dir)
    recorded = {(row["step"], row["kind"]): row for row in incidents}
    for fault in demo.FAULTS:
        row = recorded.get((fault.step, fault.expected_kind))
        assert row is not None, f"no {fault.expected_kind} at step {fault.step} in {incidents}"
        assert row["action"] == fault.expected_action.value
    weight = recorded[(demo.NAN_WEIGHT_STEP, "nonfinite_model")]
    assert weight["tensors"] == [demo.NAN_WEIGHT_PARAM]
    grad = recorded[(demo.NAN_GRAD_STEP, "nonfinite_grad")]
    assert grad["tensors"] == [demo.NAN_GRAD_PARAM]


def test_demo_ends_with_the_incident_table_of_the_nanguard_command(demo_run: DemoRun) -> None:
    out = demo_run.output
    table = out[out.index(f"$ python -m nanguard incidents {demo_run.run_dir}"):]
    for kind in ("nonfinite_grad", "nonfinite_loss", "loss_spike", "nonfinite_model"):
        assert kind in table, out
    assert re.search(r"\d+ incidents; kinds: ", table), out


def test_quickstart_trains_with_a_toml_policy_and_records_no_incidents(tmp_path: Path) -> None:
    done = _run_example("quickstart_plain.py", cwd=tmp_path)
    out = done.stdout + done.stderr
    assert done.returncode == 0, out
    assert "policy from nanguard.toml: check_every_steps=25" in out, out
    found = re.search(r"trained (\d+) steps: loss (\d+\.\d+) -> (\d+\.\d+); skipped steps: 0; "
                      r"incidents in the journal: 0", out)
    assert found, out
    assert float(found.group(3)) < float(found.group(2)) / 2, out  # it learns
    code = (EXAMPLES / "quickstart_plain.py").read_text(encoding="utf-8").split('"""', 2)[2]  # past the docstring
    assert [code.count(f"# nanguard: {i}/3") for i in (1, 2, 3)] == [1, 1, 1]


def test_checkpoints_example_audits_without_running_code_and_refuses_the_unsafe_load(tmp_path: Path) -> None:
    proc = _run_example("checkpoints.py", cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "optimizer.state.0.exp_avg_sq: nan x1" in proc.stdout
    assert "the shell command ran: False" in proc.stdout
    assert "CHECKPOINTS EXAMPLE PASSED" in proc.stdout


def test_yolo_demo_catches_the_three_faults_and_ends_with_clean_last_and_best(tmp_path: Path) -> None:
    """``examples/demo_yolo.py --quick``: a real guarded YOLO11n training (4 epochs) with a NaN weight in
    epoch 0, a NaN gradient mid-run and a NaN weight later, beside the same faults unguarded; about 40 s."""
    pytest.importorskip("ultralytics")
    done = _run_example("demo_yolo.py", "--quick", "--runs-dir", str(tmp_path), cwd=tmp_path)
    out = done.stdout + done.stderr
    assert done.returncode == 0, out
    for label in "123":
        assert re.search(rf"fault \({label}\) .*: caught at epoch \d+, batch \d+", out), out
    assert "NOT CAUGHT" not in out, out
    assert "faults caught by nanguard: 3 of 3" in out, out
    assert "guarded last.pt: clean" in out and "guarded best.pt: clean" in out, out
    assert re.search(r"\d+ incidents; kinds: ", out), out
    assert "YOLO DEMO PASSED" in out and "YOLO DEMO FAILED" not in out, out
