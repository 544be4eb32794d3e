"""Tests of ``nanguard audit`` and ``nanguard inspect`` on real checkpoints: output, JSON, exit codes, --record."""

from __future__ import annotations

import hashlib
import json
import os
import random
import time
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner, Result

from nanguard.cli import app
from nanguard.errors import ExitCode
from nanguard.journal import IncidentRecord, Journal, read_checkpoints
from tests.cli_checks import assert_one_line_error

runner = CliRunner()
DOCS = Path(__file__).resolve().parents[1] / "docs" / "cli.md"


class ShellCommand:
    """Unpickling this runs a shell command that creates a marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, ...]:
        return (os.system, (f"touch {self.marker}",))


def _state(nan: bool = False) -> dict[str, object]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU(), torch.nn.Linear(3, 2))
    state = model.state_dict()
    if nan:
        state["2.weight"][1, 2] = float("nan")
    return {"model": state, "epoch": 3}


def _clean(folder: Path, name: str = "clean.pt") -> Path:
    path = folder / name
    torch.save(_state(), path)
    return path


def _dirty(folder: Path, name: str = "dirty.pt") -> Path:
    path = folder / name
    torch.save(_state(nan=True), path)
    return path


def _evil(folder: Path, marker: Path, name: str = "evil.pt") -> Path:
    path = folder / name
    torch.save({"model": {"w": torch.ones(3)}, "payload": ShellCommand(marker)}, path)
    return path


def _truncated(folder: Path, name: str = "truncated.pt") -> Path:
    source = _clean(folder, "source.bin.tmp")
    path = folder / name
    path.write_bytes(source.read_bytes()[:200])
    source.unlink()
    return path


def _audit(*args: str | Path) -> Result:
    return runner.invoke(app, ["audit", *map(str, args)])


def test_clean_checkpoint_exits_0(tmp_path: Path) -> None:
    path = _clean(tmp_path)
    result = _audit(path)
    assert result.exit_code == ExitCode.OK, result.output
    assert result.stdout.split()[:5] == ["clean", str(path), "torch", "epoch", "3"], result.output
    assert len(result.stdout.splitlines()) == 1


def test_nan_in_one_weight_exits_1_and_names_the_location(tmp_path: Path) -> None:
    result = _audit(_dirty(tmp_path))
    assert result.exit_code == ExitCode.DIRTY, result.output
    assert result.stdout.startswith("dirty"), result.output
    assert "model.2.weight: nan x1" in result.stdout


def test_pickle_that_would_run_a_shell_command_exits_3_and_never_runs(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    result = _audit(_evil(tmp_path, marker))
    assert result.exit_code == ExitCode.UNSAFE, result.output
    assert result.stdout.startswith("unsafe"), result.output
    assert "system" in result.stdout
    assert not marker.exists()
    inspected = runner.invoke(app, ["inspect", str(tmp_path / "evil.pt")])
    assert inspected.exit_code == ExitCode.UNSAFE, inspected.output
    assert not marker.exists()


@pytest.mark.parametrize(
    "content", [b"", b"PK\x03\x04 not really a zip", random.Random(0).randbytes(4096)], ids=["empty", "zip", "random"]
)
def test_unreadable_file_exits_2_with_one_line_and_no_traceback(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "broken.pt"
    path.write_bytes(content)
    result = _audit(path)
    assert result.exit_code == ExitCode.BAD_INPUT, result.output
    assert len(result.output.splitlines()) == 1 and result.stdout.startswith("unreadable"), result.output
    assert "Traceback" not in result.output


def test_truncated_checkpoint_exits_2_with_one_line(tmp_path: Path) -> None:
    result = _audit(_truncated(tmp_path))
    assert result.exit_code == ExitCode.BAD_INPUT, result.output
    assert len(result.output.splitlines()) == 1 and result.stdout.startswith("unreadable"), result.output
    assert "Traceback" not in result.output


def test_missing_path_and_empty_folder_exit_2_with_one_error_line(tmp_path: Path) -> None:
    assert_one_line_error(_audit(tmp_path / "missing.pt"), ExitCode.BAD_INPUT, "missing.pt", "no such file or folder")
    empty = tmp_path / "empty"
    empty.mkdir()
    assert_one_line_error(_audit(empty), ExitCode.BAD_INPUT, str(empty), "no checkpoint")
    assert_one_line_error(runner.invoke(app, ["inspect", str(tmp_path / "missing.pt")]), ExitCode.BAD_INPUT,
                          "no such file")


def test_folder_with_a_mix_exits_with_the_worst_status(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    folder = tmp_path / "weights"
    folder.mkdir()
    _clean(folder)
    _dirty(folder)
    assert _audit(folder).exit_code == ExitCode.DIRTY
    _evil(folder, marker)
    result = _audit(folder)
    assert result.exit_code == ExitCode.UNSAFE, result.output
    _truncated(folder)
    result = _audit(folder)
    assert result.exit_code == ExitCode.BAD_INPUT, result.output
    lines = result.stdout.splitlines()
    assert [line.split()[0] for line in lines[:-1]] == ["clean", "dirty", "unsafe", "unreadable"], result.output
    assert lines[-1] == "4 checkpoints; clean 1, dirty 1, unsafe 1, unreadable 1"
    assert not marker.exists()
    precedence = "2 if any is unreadable, else 3 if any is unsafe, else 1 if any is dirty, else 0"
    assert precedence in " ".join(DOCS.read_text().split())
    assert precedence in " ".join(runner.invoke(app, ["audit", "--help"]).stdout.split())


def test_json_is_a_list_of_verdicts(tmp_path: Path) -> None:
    clean, dirty = _clean(tmp_path), _dirty(tmp_path)
    result = runner.invoke(app, ["audit", str(clean), str(dirty), "--json"])
    assert result.exit_code == ExitCode.DIRTY, result.output
    rows = json.loads(result.stdout)
    assert [(row["path"], row["status"], row["format"], row["epoch"]) for row in rows] == [
        (str(clean), "clean", "torch", 3), (str(dirty), "dirty", "torch", 3)
    ]
    assert rows[1]["findings"] == [
        {"location": "model.2.weight", "kind": "nan", "count": 1, "first_index": [1, 2], "area": "model", "numel": 6}
    ]


def test_record_stores_verdicts_and_marks_checkpoints_after_a_nonfinite_incident(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    weights = tmp_path / "weights"
    weights.mkdir()
    before = _clean(weights, "epoch0.pt")
    os.utime(before, (time.time() - 100, time.time() - 100))
    journal = Journal(run_dir)
    run_id = journal.start_run(policy={})
    # A skipped step never reached the state: it taints nothing. One that was not (here the run stopped) does.
    journal.record_incident(run_id, IncidentRecord(kind="nonfinite_grad", step=5, action="skip", loss=1.0))
    journal.record_incident(run_id, IncidentRecord(kind="nonfinite_loss", step=7, action="stop", loss=float("nan")))
    journal.close()
    after = _clean(weights, "epoch1.pt")
    os.utime(after, (time.time() + 100, time.time() + 100))
    result = runner.invoke(app, ["audit", str(weights), "--record", str(run_dir)])
    assert result.exit_code == ExitCode.OK, result.output
    lines = result.stdout.splitlines()
    assert "tainted" not in lines[0] and "tainted" in lines[1], result.output
    assert lines[-1] == "2 checkpoints; clean 2; tainted 1"
    rows = read_checkpoints(run_dir)
    assert [(Path(row["path"]).name, row["status"], row["tainted"]) for row in rows] == [
        ("epoch0.pt", "clean", False), ("epoch1.pt", "clean", True)
    ]
    assert all(len(row["sha256"]) == 64 and row["size"] == before.stat().st_size for row in rows)
    assert rows[1]["sha256"] == hashlib.sha256(after.read_bytes()).hexdigest() and rows[1]["parent_path"] is None
    assert "nonfinite_loss" in rows[1]["taint_reason"] and "nonfinite_grad" not in rows[1]["taint_reason"]


def test_record_creates_the_journal_and_stores_findings(tmp_path: Path) -> None:
    run_dir = tmp_path / "new-run"
    result = runner.invoke(app, ["audit", str(_dirty(tmp_path)), "--record", str(run_dir), "--json"])
    assert result.exit_code == ExitCode.DIRTY, result.output
    printed = json.loads(result.stdout)
    (row,) = read_checkpoints(run_dir)
    assert row["status"] == "dirty" and row["format"] == "torch" and row["epoch"] == 3 and not row["tainted"]
    assert row["findings"] == printed[0]["findings"] and row["sha256"] == printed[0]["sha256"]


def test_child_of_a_dirty_parent_is_tainted(tmp_path: Path) -> None:
    from nanguard.journal import CheckpointRecord

    journal = Journal(tmp_path)
    journal.record_checkpoint(CheckpointRecord(path="/w/a.pt", status="dirty"))
    child = journal.record_checkpoint(CheckpointRecord(path="/w/b.pt", status="clean", parent_path="/w/a.pt"))
    grandchild = journal.record_checkpoint(CheckpointRecord(path="/w/c.pt", status="clean", parent_path="/w/b.pt"))
    journal.close()
    assert child["tainted"] and child["taint_reason"] == "parent /w/a.pt is dirty"
    assert grandchild["tainted"] and grandchild["taint_reason"] == "parent /w/b.pt is tainted"


@pytest.mark.slow
def test_inspect_real_yolo_checkpoint(yolo_clean_run: Path) -> None:
    path = yolo_clean_run / "epoch1.pt"
    result = runner.invoke(app, ["inspect", str(path)])
    assert result.exit_code == ExitCode.OK, result.output
    fields = dict(line.split(":", 1) for line in result.stdout.splitlines()[1:])
    assert fields["format"].strip() == "ultralytics" and fields["epoch"].strip() == "1", result.output
    assert int(fields["tensors"]) > 0 and "model" in fields["top-level keys"]
    as_json = runner.invoke(app, ["inspect", str(path), "--json"])
    data = json.loads(as_json.stdout)
    assert data["verdict"]["format"] == "ultralytics" and data["verdict"]["epoch"] == 1
    assert data["tensor_count"] == int(fields["tensors"])


def test_inspect_load_loads_an_allowlisted_checkpoint_with_real_classes(tmp_path: Path) -> None:
    result = runner.invoke(app, ["inspect", str(_clean(tmp_path)), "--load"])
    assert result.exit_code == ExitCode.OK, result.output
    assert "loaded:" in result.stdout and "every global allowlisted" in result.stdout


def test_inspect_load_refuses_an_unsafe_checkpoint_and_trust_overrides_it(tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    path = _evil(tmp_path, marker)
    refused = runner.invoke(app, ["inspect", str(path), "--load"])
    assert refused.exit_code == ExitCode.UNSAFE, refused.output
    assert "loaded:         refused:" in refused.stdout and "posix.system" in refused.stdout, refused.output
    assert "Traceback" not in refused.output
    assert not marker.exists()
    # --trust is the explicit override: the file is loaded with its real classes, so its code runs.
    trusted = runner.invoke(app, ["inspect", str(path), "--trust"])
    assert trusted.exit_code == ExitCode.UNSAFE, trusted.output  # the verdict is still "unsafe"
    assert "with --trust" in trusted.stdout
    assert marker.exists()


class PlainRecord:
    """A plain-data class outside the load allowlist (pickled as ``__new__`` + state)."""

    def __init__(self) -> None:
        self.note = "plain"


def test_audit_judges_content_and_says_loading_needs_trust_for_unlisted_classes(tmp_path: Path) -> None:
    """A healthy file that rebuilds a class outside the allowlist as data is clean (exit 0), with one note
    naming the class; ``inspect --load`` refuses to import it (exit 3) and --trust loads it."""
    path = tmp_path / "plain.pt"
    torch.save({**_state(), "extra": PlainRecord()}, path)
    name = f"{__name__}.PlainRecord"
    result = _audit(path)
    assert result.exit_code == ExitCode.OK, result.output
    assert result.stdout.startswith("clean") and len(result.stdout.splitlines()) == 1, result.output
    assert f"classes outside the load allowlist: {name}; loading needs --trust" in result.stdout, result.output
    data = json.loads(runner.invoke(app, ["audit", str(path), "--json"]).stdout)[0]
    assert data["unlisted_globals"] == [name] and data["unsafe_globals"] == [] and data["content"] == "clean"
    refused = runner.invoke(app, ["inspect", str(path), "--load"])
    assert refused.exit_code == ExitCode.UNSAFE, refused.output
    assert "loaded:         refused:" in refused.stdout and "needs --trust" in refused.stdout, refused.output
    trusted = runner.invoke(app, ["inspect", str(path), "--trust"])
    assert trusted.exit_code == ExitCode.OK and "with --trust" in trusted.stdout, trusted.output


def test_unsafe_line_says_it_calls_code_and_what_the_content_is(tmp_path: Path) -> None:
    torch.save({"model": {"w": torch.tensor([float("nan")])}, "payload": ShellCommand(tmp_path / "m")},
               tmp_path / "evil.pt")
    result = _audit(tmp_path / "evil.pt")
    assert result.exit_code == ExitCode.UNSAFE, result.output
    assert "calls code: posix.system" in result.stdout and "content dirty" in result.stdout, result.output
    assert not (tmp_path / "m").exists()
