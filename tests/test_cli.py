"""Tests of the ``nanguard`` command line: output, JSON, exit codes, one-line errors, no torch import."""

from __future__ import annotations

import json
import math
import os
import re
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from nanguard import __version__
from nanguard.cli import EXIT_CODE_MEANINGS, app
from nanguard.errors import ExitCode
from nanguard.journal import IncidentRecord, Journal, journal_path, read_incidents
from tests.cli_checks import assert_one_line_error, run_cli

runner = CliRunner()
DOCS = Path(__file__).resolve().parents[1] / "docs" / "cli.md"

NAN, INF = float("nan"), float("inf")
TENSORS = [f"model.{i}.conv.weight" for i in range(12)]


def _journal(run_dir: Path, incidents: list[IncidentRecord]) -> Path:
    journal = Journal(run_dir)
    run_id = journal.start_run(policy={"on_nonfinite": "skip"})
    for incident in incidents:
        journal.record_incident(run_id, incident)
    journal.close()
    return run_dir


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    return _journal(
        tmp_path / "train",
        [
            IncidentRecord(
                kind="nonfinite_loss", step=120, action="skip", epoch=1, batch_index=20, loss=NAN, grad_norm=INF,
                tensors=TENSORS, sample_ids=["img_0001.jpg", "img_0002.jpg", "img_0003.jpg", "img_0004.jpg"],
            ),
            IncidentRecord(kind="loss_spike", step=130, action="clip", epoch=1, batch_index=30, loss=12.5,
                           grad_norm=3.25, value=12.5, threshold=5.0),
            IncidentRecord(kind="nonfinite_grad", step=140, action="skip", loss=2.0, grad_norm=-INF,
                           tensors=["fc.weight"], rank=1),
        ],
    )


def test_version() -> None:
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0, result.output
    assert result.stdout == f"nanguard {__version__}\n"


def test_python_dash_m_nanguard_runs_the_cli() -> None:
    done = subprocess.run([sys.executable, "-m", "nanguard", "--version"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout == f"nanguard {__version__}\n"


def test_help_lists_every_exit_code() -> None:
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0, result.output
    assert "incidents" in result.stdout
    for code in ExitCode:
        assert re.search(rf"^\s*{int(code)}\s+{code.name}:", result.stdout, re.MULTILINE), result.output


def test_docs_exit_code_table_matches_exit_codes() -> None:
    rows = re.findall(r"^\| (\d+) \| `(\w+)` \| (.+?) \|$", DOCS.read_text(), re.MULTILINE)
    assert [(int(code), name) for code, name, _ in rows] == [(int(code), code.name) for code in ExitCode]
    assert set(EXIT_CODE_MEANINGS) == set(ExitCode)


def test_help_and_incidents_do_not_import_torch(run_dir: Path) -> None:
    script = (
        "import sys\n"
        "from typer.testing import CliRunner\n"
        "from nanguard.cli import app\n"
        "for args in (['--help'], ['incidents', sys.argv[1]], ['incidents', sys.argv[1], '--json']):\n"
        "    result = CliRunner().invoke(app, args)\n"
        "    assert result.exit_code == 0, result.output\n"
        "assert 'torch' not in sys.modules, 'the CLI imported torch'\n"
    )
    done = subprocess.run([sys.executable, "-c", script, str(run_dir)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr


def test_incidents_lists_every_journal_row(run_dir: Path) -> None:
    result = runner.invoke(app, ["incidents", str(run_dir)])
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    rows = {line.split()[0]: line.split() for line in lines if re.match(r"^\s*\d+\s+\d+\s", line)}
    assert rows.keys() == {"1", "2", "3"}, result.output
    assert rows["1"][:7] == ["1", "120", "1", "20", "0", "nonfinite_loss", "skip"]
    assert rows["2"][:9] == ["2", "130", "1", "30", "0", "loss_spike", "clip", "12.5", "3.25"]
    assert rows["3"][:9] == ["3", "140", "-", "-", "1", "nonfinite_grad", "skip", "2", "-inf"]
    assert "fc.weight" in result.stdout
    assert lines[-1] == "3 incidents; kinds: nonfinite_loss 1, loss_spike 1, nonfinite_grad 1; actions: skip 2, clip 1"


def test_incidents_prints_nonfinite_values_as_nan_and_inf(run_dir: Path) -> None:
    result = runner.invoke(app, ["incidents", str(run_dir)])
    assert result.exit_code == 0, result.output
    first = next(line for line in result.stdout.splitlines() if line.split()[:2] == ["1", "120"])
    assert first.split()[7:9] == ["nan", "inf"], result.output


def test_incidents_abbreviates_long_lists_in_table_but_not_in_json(run_dir: Path) -> None:
    table = runner.invoke(app, ["incidents", str(run_dir)])
    assert table.exit_code == 0, table.output
    assert "model.0.conv.weight, model.1.conv.weight, model.2.conv.weight, … +9 more" in table.stdout
    assert "model.3.conv.weight" not in table.stdout
    assert "img_0001.jpg, img_0002.jpg, img_0003.jpg, … +1 more" in table.stdout
    as_json = runner.invoke(app, ["incidents", str(run_dir), "--json"])
    assert as_json.exit_code == 0, as_json.output
    first = json.loads(as_json.stdout)[0]
    assert first["tensors"] == TENSORS
    assert first["sample_ids"] == ["img_0001.jpg", "img_0002.jpg", "img_0003.jpg", "img_0004.jpg"]


def test_json_output_is_valid_json_with_nonfinite_values(run_dir: Path) -> None:
    result = runner.invoke(app, ["incidents", str(run_dir), "--json"])
    assert result.exit_code == 0, result.output

    def reject(token: str) -> None:
        raise AssertionError(f"non-standard JSON token {token}")

    printed = json.loads(result.stdout, parse_constant=reject)
    expected = read_incidents(run_dir)
    for row in expected:
        for key in ("loss", "grad_norm"):
            if row[key] is not None and not math.isfinite(row[key]):
                row[key] = str(row[key])
    assert printed == expected
    assert [(row["loss"], row["grad_norm"]) for row in printed] == [("nan", "inf"), (12.5, 3.25), (2.0, "-inf")]


def test_journal_without_incidents_prints_no_incidents_exit_0(tmp_path: Path) -> None:
    run_dir = _journal(tmp_path / "clean", [])
    result = runner.invoke(app, ["incidents", str(run_dir)])
    assert result.exit_code == 0, result.output
    assert result.stdout == "no incidents\n"
    as_json = runner.invoke(app, ["incidents", str(run_dir), "--json"])
    assert as_json.exit_code == 0, as_json.output
    assert json.loads(as_json.stdout) == []


def test_missing_run_dir_is_one_line_exit_2(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-run"
    result = runner.invoke(app, ["incidents", str(missing)])
    assert_one_line_error(result, ExitCode.BAD_INPUT, str(missing), "no such run folder")


def test_run_dir_without_journal_is_one_line_exit_2(tmp_path: Path) -> None:
    result = runner.invoke(app, ["incidents", str(tmp_path)])
    assert_one_line_error(result, ExitCode.BAD_INPUT, "no nanguard journal", str(journal_path(tmp_path)))


def test_non_sqlite_journal_is_one_line_exit_2_and_left_unchanged(tmp_path: Path) -> None:
    path = journal_path(tmp_path)
    path.parent.mkdir()
    garbage = b"this is a training log, not a SQLite database\n" * 200
    path.write_bytes(garbage)
    result = runner.invoke(app, ["incidents", str(tmp_path)])
    assert_one_line_error(result, ExitCode.BAD_INPUT, str(path), "not a readable nanguard journal")
    assert path.read_bytes() == garbage
    assert sorted(p.name for p in path.parent.iterdir()) == ["journal.db"]


def test_debug_adds_the_traceback_and_keeps_the_exit_code(tmp_path: Path) -> None:
    result = runner.invoke(app, ["--debug", "incidents", str(tmp_path / "missing")])
    assert result.exit_code == ExitCode.BAD_INPUT, result.output
    assert "Traceback (most recent call last)" in result.stderr
    assert "JournalError" in result.stderr
    assert result.stderr.splitlines()[-1].startswith("nanguard: error: "), result.output


@pytest.mark.parametrize(("args", "named"), [
    (["run", "--policy", "{fifo}", "--", "true"], "{fifo}: is a FIFO (named pipe), not a regular file"),
    (["yolo", "--policy", "{fifo}", "train", "model=yolo11n.pt"], "{fifo}: is a FIFO"),
    (["yolo", "--policy", "/dev/zero", "train"], "/dev/zero: is a character device, not a regular file"),
    (["run", "--run-dir", "{file}", "--", "true"], "{file}: is a regular file, not a folder"),
    (["run", "--checkpoint-dir", "{fifo}", "--", "true"], "{fifo}: is a FIFO (named pipe), not a folder"),
    (["status", "{file}"], "{file}: is a regular file, not a folder"),
    (["incidents", "{fifo}"], "{fifo}: is a FIFO (named pipe), not a folder"),
    (["rollback", "{file}"], "{file}: is a regular file, not a folder"),
    (["undo", "/dev/null"], "/dev/null: is a character device, not a folder"),
    (["report", "{dir}", "-o", "{fifo}"], "{fifo}: is a FIFO (named pipe), not a regular file"),
    (["report", "{dir}", "-o", "{file}/x.html"], "{file}: is a regular file, not a folder"),
    (["audit", "{fifo}"], "{fifo}: is a FIFO (named pipe), not a regular file or a folder"),
    (["audit", "--record", "{file}", "{file}"], "{file}: is a regular file, not a folder"),
    (["inspect", "/dev/zero"], "/dev/zero: is a character device, not a regular file or a folder"),
])
def test_every_path_argument_refuses_the_wrong_kind_without_blocking(tmp_path: Path, args: list[str],
                                                                     named: str) -> None:
    """A FIFO, a device, a file where a folder is expected or a folder where a file is expected: one line
    naming the path and what it is, exit 2, nothing run, written or created (run_cli's timeout fails a block)."""
    fifo, file = tmp_path / "pipe", tmp_path / "plain.txt"
    os.mkfifo(fifo)
    file.write_text("not a folder\n")
    values = {"fifo": str(fifo), "file": str(file), "dir": str(tmp_path)}
    before = sorted(tmp_path.rglob("*"))
    result = run_cli([arg.format(**values) for arg in args], cwd=tmp_path, timeout=60)
    assert_one_line_error(result, ExitCode.BAD_INPUT, named.format(**values))
    assert sorted(tmp_path.rglob("*")) == before and file.read_text() == "not a folder\n"


# Rows a damaged or hostile journal can hold: each is a column of the wrong type, a JSON column that is not
# JSON or not the shape nanguard writes, a time no clock can show, a text far beyond any name nanguard writes.
BAD_JOURNAL_ROWS = {
    "tensors not JSON": "UPDATE incidents SET tensors = '{{not json'",
    "tensors a number": "UPDATE incidents SET tensors = '5'",
    "tensors of numbers": "UPDATE incidents SET tensors = '[1, 2]'",
    "sample_ids an object": "UPDATE incidents SET sample_ids = '{\"a\": 1}'",
    "step as text": "UPDATE incidents SET step = 'abc'",
    "epoch as text": "UPDATE incidents SET epoch = 'x'",
    "loss_text not a non-finite name": "UPDATE incidents SET loss_text = 'hello'",
    "loss a blob": "UPDATE incidents SET loss = x'00ff'",
    "kind of 1 MB": "UPDATE incidents SET kind = printf('%.*c', 1000000, 'k')",
    "wall_time as text": "UPDATE incidents SET wall_time = 'x'",
    "wall_time past year 9999": "UPDATE incidents SET wall_time = 1e308",
    "detail not JSON": "UPDATE actions SET detail = 'nope'",
    "detail a list": "UPDATE actions SET detail = '[1, 2]'",
    "policy not JSON": "UPDATE runs SET policy = 'x'",
    "pid as text": "UPDATE runs SET pid = 'x', status = 'running'",
    "started_at as text": "UPDATE runs SET started_at = 'x'",
    "checkpoint findings not JSON": "INSERT INTO checkpoints (path, status, findings, tainted, wall_time) "
                                    "VALUES ('/x.pt', 'clean', 'nope', 0, 1.0)",
    "checkpoint path a blob": "INSERT INTO checkpoints (path, status, findings, tainted, wall_time) "
                              "VALUES (x'00', 'clean', '[]', 0, 1.0)",
    "metrics of text": "INSERT INTO metrics (run_id, step, epoch, batch_index, loss, applied, wall_time, lr) "
                       "VALUES (1, 'x', 'y', 'z', 'w', 'a', 'b', 'c')",
    "metrics loss_text garbage": "INSERT INTO metrics (run_id, step, loss_text, applied, wall_time) "
                                 "VALUES (1, 1, 'zzz', 1, 1.0)",
}


@pytest.mark.parametrize("damage", BAD_JOURNAL_ROWS, ids=list(BAD_JOURNAL_ROWS))
def test_every_journal_command_refuses_a_row_of_the_wrong_shape_in_one_line(run_dir: Path, damage: str) -> None:
    journal = Journal(run_dir)
    journal.record_action(1, step=120, action="skip", reason="nonfinite_loss", detail={"step": 120})
    journal.close()
    with sqlite3.connect(journal_path(run_dir)) as db:
        db.execute(BAD_JOURNAL_ROWS[damage])
    db.close()
    before = journal_path(run_dir).read_bytes()
    for args in (["incidents"], ["incidents", "--json"], ["status", "--json"], ["status"],
                 ["plan", "--epochs", "3"], ["report", "-o", str(run_dir / "r.html")]):
        result = runner.invoke(app, [args[0], str(run_dir), *args[1:]])
        if args[0] == "incidents" and result.exit_code == 0:
            continue  # a damaged table other than incidents is not read by `incidents`
        assert_one_line_error(result, ExitCode.BAD_INPUT, str(journal_path(run_dir)), "row")
    assert journal_path(run_dir).read_bytes() == before
    assert not (run_dir / "r.html").exists()
