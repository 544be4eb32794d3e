"""Tests of ``nanguard rollback`` / ``nanguard undo`` on real Ultralytics runs (tiny YOLO11n, offline, CPU).

Each test that changes files works on a copy of the session's 4-epoch ``save_period=1`` run; a resumed
training really continues from the chosen epoch.
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from nanguard.cli import app
from nanguard.errors import ExitCode
from nanguard.journal import read_actions
from nanguard.runs import RollbackRefused, RunLocked, plan_rollback, run_lock
from nanguard.runs.results_csv import trim_results
from tests.ckpt.test_safety import ShellCommand
from tests.cli_checks import assert_one_line_error
from tests.conftest import copy_tree

runner = CliRunner()


@pytest.fixture()
def run(yolo_periodic_run: Path, tmp_path: Path) -> Path:
    """A private copy of the 4-epoch run folder."""
    return copy_tree(yolo_periodic_run, tmp_path / "run")


def tree_hashes(root: Path) -> dict[str, str]:
    return {
        path.relative_to(root).as_posix(): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(root.rglob("*"))
        if path.is_file()
    }


def csv_epochs(path: Path) -> list[int]:
    with path.open(newline="") as handle:
        return [int(float(row["epoch"].strip())) for row in csv.DictReader(handle, skipinitialspace=True)]


def train_args(path: Path) -> dict[str, Any]:
    from nanguard.ckpt import load_checkpoint

    args = load_checkpoint(path)["train_args"]
    assert isinstance(args, dict)
    return args


def test_dry_run_changes_no_byte_and_prints_the_plan(run: Path) -> None:
    before = tree_hashes(run)
    result = runner.invoke(app, ["rollback", str(run), "--to", "epoch 1", "--dry-run"])
    assert result.exit_code == 0, result.output
    assert f"yolo train resume model={run / 'weights' / 'last.pt'}" in result.stdout
    assert "YOLO(" in result.stdout and "resume=True" in result.stdout
    assert "dry run: nothing changed" in result.stdout
    assert tree_hashes(run) == before
    assert not (run / ".nanguard").exists()


def test_latest_clean_skips_stripped_and_final_checkpoints(run: Path) -> None:
    result = runner.invoke(app, ["rollback", str(run), "--dry-run", "--json"])
    assert result.exit_code == 0, result.output
    plan = json.loads(result.stdout)
    assert Path(plan["target"]).name == "epoch2.pt"
    assert (plan["target_epoch"], plan["resume_epoch"], plan["epochs"]) == (2, 3, 4)
    assert (plan["results_rows_kept"], plan["results_rows_dropped"]) == (3, 1)
    problems = {Path(c["path"]).name: c["problem"] for c in plan["candidates"]}
    assert "stripped by Ultralytics" in problems["last.pt"]
    assert "final epoch" in problems["epoch3.pt"]
    assert problems["epoch0.pt"] is None


def test_rollback_then_resume_really_continues_from_the_chosen_epoch(run: Path, yolo_dataset: Path) -> None:
    from ultralytics import YOLO

    from nanguard.ckpt import audit

    result = runner.invoke(app, ["rollback", str(run), "--to", "epoch 1"])
    assert result.exit_code == 0, result.output
    last = run / "weights" / "last.pt"
    assert f"yolo train resume model={last}" in result.stdout
    verdict = audit(last)
    assert (verdict.status.value, verdict.epoch) == ("clean", 1)
    assert csv_epochs(run / "results.csv") == [1, 2]
    # The copy's checkpoint named the fixture's folder as save_dir; the rollback pointed it here.
    assert Path(train_args(last)["save_dir"]).resolve() == run.resolve()
    actions = read_actions(run)
    assert [a["action"] for a in actions] == ["disk_rollback"]
    assert actions[0]["detail"]["target_epoch"] == 1 and actions[0]["detail"]["results_rows_dropped"] == 2

    seen: dict[str, int] = {}

    def on_train_start(trainer: Any) -> None:
        seen["start_epoch"] = trainer.start_epoch

    model = YOLO(str(last))
    model.add_callback("on_train_start", on_train_start)
    model.train(resume=True, data=str(yolo_dataset), device="cpu", workers=0, plots=False)
    assert seen["start_epoch"] == 2
    assert csv_epochs(run / "results.csv") == [1, 2, 3, 4]  # no duplicate rows from the undone epochs
    assert audit(last).epoch == -1  # the resumed run finished and stripped last.pt


def test_undo_restores_byte_identical_files(run: Path) -> None:
    before = tree_hashes(run)
    result = runner.invoke(app, ["rollback", str(run), "--to", "epoch0"])
    assert result.exit_code == 0, result.output
    changed = {name for name, digest in tree_hashes(run).items() if before.get(name) != digest}
    assert {"weights/last.pt", "results.csv"} <= changed  # best.pt: the finished run's stripped one, kept
    assert {"weights/last.pt", "weights/best.pt", "results.csv"} <= {
        p.relative_to(b).as_posix() for b in (run / ".nanguard" / "backups").iterdir() for p in b.rglob("*.*")
    }
    result = runner.invoke(app, ["undo", str(run)])
    assert result.exit_code == 0, result.output
    after = {name: digest for name, digest in tree_hashes(run).items() if not name.startswith(".nanguard/")}
    assert after == before
    assert [a["action"] for a in read_actions(run)] == ["disk_rollback", "disk_undo"]
    again = runner.invoke(app, ["undo", str(run)])
    assert again.exit_code == int(ExitCode.BAD_INPUT), again.output
    assert "no backup left to undo" in again.stderr


@pytest.mark.parametrize("to", ["weights/last.pt", "best"])
def test_stripped_checkpoint_is_refused(yolo_periodic_run: Path, to: str) -> None:
    target = str(yolo_periodic_run / to) if "/" in to else to
    before = tree_hashes(yolo_periodic_run)
    result = runner.invoke(app, ["rollback", str(yolo_periodic_run), "--to", target])
    assert result.exit_code == int(ExitCode.BAD_INPUT), result.output
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert "was stripped by Ultralytics after the final epoch (no optimizer state); it cannot be resumed" in lines[0]
    assert ("last.pt" if "/" in to else "best.pt") in lines[0]
    assert tree_hashes(yolo_periodic_run) == before


def test_a_held_lock_refuses_a_second_rollback(run: Path) -> None:
    before = tree_hashes(run)
    with run_lock(run, "rollback"):
        result = runner.invoke(app, ["rollback", str(run), "--to", "epoch 1"])
        assert result.exit_code == int(ExitCode.LOCKED) == 5, result.output
        assert "held by pid" in result.stderr
        with pytest.raises(RunLocked):
            run_lock(run, "again").__enter__()
    assert {k: v for k, v in tree_hashes(run).items() if not k.startswith(".nanguard/")} == before
    assert not (run / ".nanguard" / "lock").exists()
    result = runner.invoke(app, ["rollback", str(run), "--to", "epoch 1"])
    assert result.exit_code == 0, result.output
    assert not (run / ".nanguard" / "lock").exists()  # released after a rollback too


def test_lr_scale_scales_lr0_in_the_written_last_pt(run: Path) -> None:
    lr0 = train_args(run / "weights" / "epoch1.pt")["lr0"]
    result = runner.invoke(app, ["rollback", str(run), "--to", "epoch 1", "--lr-scale", "0.1", "--json"])
    assert result.exit_code == 0, result.output
    assert math.isclose(train_args(run / "weights" / "last.pt")["lr0"], lr0 * 0.1)
    assert math.isclose(json.loads(result.stdout)["lr0_after"], lr0 * 0.1)
    bad = runner.invoke(app, ["rollback", str(run), "--lr-scale", "0", "--dry-run"])
    assert bad.exit_code == int(ExitCode.BAD_INPUT), bad.output


def test_dirty_target_needs_force(run: Path) -> None:
    from nanguard.ckpt import load_checkpoint, save_checkpoint

    epoch1 = run / "weights" / "epoch1.pt"
    ckpt = load_checkpoint(epoch1)
    next(ckpt["ema"].parameters()).data.view(-1)[0] = float("nan")
    save_checkpoint(ckpt, epoch1)
    result = runner.invoke(app, ["rollback", str(run), "--to", "epoch 1"])
    assert result.exit_code == int(ExitCode.DIRTY), result.output
    assert "is dirty" in result.stderr and "--force" in result.stderr
    plan = plan_rollback(run)  # latest-clean skips it
    assert plan.target.name == "epoch2.pt"
    forced = runner.invoke(app, ["rollback", str(run), "--to", "epoch 1", "--force"])
    assert forced.exit_code == 0, forced.output


def test_missing_weights_folder_and_epoch_are_refused(tmp_path: Path, run: Path) -> None:
    with pytest.raises(RollbackRefused, match="no weights folder"):
        plan_rollback(tmp_path)
    result = runner.invoke(app, ["rollback", str(run), "--to", "epoch 9"])
    assert result.exit_code == int(ExitCode.BAD_INPUT), result.output
    assert "no checkpoint of epoch 9" in result.stderr


def test_trim_results_keeps_rows_through_the_target_and_the_last_of_repeats() -> None:
    text = "epoch,time,x\r\n1,0.1,a\r\n2,0.2,b\r\n3,0.3,c\r\n2,0.1,B\r\n3,0.2,C\r\n4,0.3,D\r\n"
    trimmed, kept, dropped = trim_results(text, 1)  # epoch index 1 -> rows 1 and 2 (1-based)
    assert trimmed == "epoch,time,x\r\n1,0.1,a\r\n2,0.1,B\r\n"
    assert (kept, dropped) == (2, 4)
    padded = "                  epoch,      x\n                      1,      a\n                      2,      b\n"
    assert trim_results(padded, 0) == ("                  epoch,      x\n                      1,      a\n", 1, 1)


def test_tainted_target_needs_force(run: Path) -> None:
    import os
    import time

    from nanguard.journal import IncidentRecord, Journal

    journal = Journal(run)
    run_id = journal.start_run(policy={})
    journal.record_incident(run_id, IncidentRecord(kind="nonfinite_loss", step=9, action="stop"))
    journal.close()
    epoch1 = run / "weights" / "epoch1.pt"
    later = time.time() + 5
    os.utime(epoch1, (later, later))  # written after the non-finite incident
    recorded = runner.invoke(app, ["audit", str(epoch1), "--record", str(run)])
    assert recorded.exit_code == 0, recorded.output
    result = runner.invoke(app, ["rollback", str(run), "--to", "epoch 1"])
    assert result.exit_code == int(ExitCode.DIRTY), result.output
    assert "tainted in the journal" in result.stderr
    assert plan_rollback(run, to="epoch 1", force=True).forced


# ---- issue #10: killed commands, second writers, nothing created on failure ------------------------------

PY = sys.executable
HOLD_LOCK = """
import sys, time
from nanguard.runs import run_lock
lock = run_lock(sys.argv[1], "test holder")
print("held", flush=True)
time.sleep(120)
"""


def _project_hashes(run: Path) -> dict[str, str]:
    return {k: v for k, v in tree_hashes(run).items() if not k.startswith(".nanguard/")}


def _env() -> dict[str, str]:
    src = str(Path(__file__).resolve().parents[1] / "src")
    return {**os.environ, "PYTHONPATH": os.pathsep.join([src, os.environ.get("PYTHONPATH", "")])}


def test_a_lock_whose_holder_was_sigkilled_blocks_nothing(run: Path) -> None:
    holder = subprocess.Popen([PY, "-c", HOLD_LOCK, str(run)], stdout=subprocess.PIPE, env=_env())
    try:
        assert holder.stdout is not None and holder.stdout.readline() == b"held\n"
        refused = runner.invoke(app, ["undo", str(run)])
        assert_one_line_error(refused, ExitCode.LOCKED, str(run / ".nanguard" / "lock"), f"pid {holder.pid}",
                              "test holder")
    finally:
        holder.kill()
        holder.wait()
    assert (run / ".nanguard" / "lock").exists()  # the stale file is still there, and blocks nothing
    result = runner.invoke(app, ["rollback", str(run), "--to", "epoch 1"])
    assert result.exit_code == 0, result.output
    assert runner.invoke(app, ["undo", str(run)]).exit_code == 0


def _classify(run: Path, before: dict[str, str], after: dict[str, str]) -> str:
    """``before`` or ``rolled back`` (with its backup manifest and journal row); fails on anything else."""
    from nanguard.journal import Journal, journal_path

    if journal_path(run).is_file():
        Journal(run).close()  # as the next command would: a kill while it was first created leaves it partial
    assert not (run / ".nanguard" / "intent.json").exists()
    assert not list((run / "weights").glob(".*.tmp")), "a temp file of a killed write was left"
    now = _project_hashes(run)
    rows = read_actions(run) if journal_path(run).is_file() else []
    actions = [a["action"] for a in rows]
    live = [b for b in (run / ".nanguard" / "backups").glob("*/manifest.json")
            if not json.loads(b.read_text())["undone_at"]] if (run / ".nanguard" / "backups").is_dir() else []
    if now == before:
        assert "disk_rollback" not in actions and not live, actions
        return "before"
    assert actions.count("disk_rollback") == 1 and len(live) == 1, actions
    written = next(a for a in rows if a["action"] == "disk_rollback")["detail"]["written"]
    # torch.save names its archive after the temp file, so a rewritten last.pt is checked against its row.
    assert now == {**after, **written}, "the folder is neither as before nor fully rolled back"
    return "rolled back"


@pytest.mark.slow
def test_rollback_killed_at_random_moments_is_all_or_nothing_after_the_next_command(run: Path, tmp_path: Path) -> None:
    """Real ``nanguard rollback`` processes SIGKILLed at seeded random moments of their life: each folder is as
    before or fully rolled back (backup + journal row), at once or after the next command's recovery, and a
    rolled-back results.csv never holds a row past the target (a resume cannot duplicate one)."""
    import random

    before = _project_hashes(run)
    command = [PY, "-m", "nanguard", "rollback", "--to", "epoch 1", "--lr-scale", "0.5"]
    reference = copy_tree(run, tmp_path / "reference")
    started = time.monotonic()
    done = subprocess.run([*command, str(reference)], env=_env(), capture_output=True)
    duration = time.monotonic() - started
    assert done.returncode == 0, done.stderr
    after = _project_hashes(reference)
    rng = random.Random(10)
    seen: dict[str, int] = {}
    for attempt in range(12):
        folder = copy_tree(run, tmp_path / f"try{attempt}")
        proc = subprocess.Popen([*command, str(folder)], env=_env(), stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        # Kill anywhere in the command's life, most often after the lock, where the files change.
        lock = folder / ".nanguard" / "lock"
        if attempt % 4:
            while proc.poll() is None and not lock.exists():
                time.sleep(0.002)
            time.sleep(rng.uniform(0, 0.6))
        else:
            time.sleep(rng.uniform(0, duration))
        proc.kill()
        proc.wait()
        pending = (folder / ".nanguard" / "intent.json").exists()
        if pending:  # the next command reverts it, says so in one line, and then does its own job
            again = runner.invoke(app, ["rollback", str(folder), "--to", "epoch 1", "--lr-scale", "0.5"])
            assert again.exit_code == 0, again.output
            said = ("killed before it finished", "had finished", "had changed nothing yet")
            assert any(words in again.stdout for words in said), again.stdout
            state = "recovered: " + _classify(folder, before, after)
        else:
            state = _classify(folder, before, after)
        seen[state] = seen.get(state, 0) + 1
        if state.endswith("rolled back"):
            assert csv_epochs(folder / "results.csv") == [1, 2]
    assert len(seen) >= 2, seen  # the kills landed in more than one phase


def test_rollback_and_undo_are_refused_while_nanguard_run_supervises_the_folder(run: Path, tmp_path: Path) -> None:
    script = tmp_path / "sleeper.py"
    script.write_text("import time\nprint('ready', flush=True)\ntime.sleep(120)\n")
    out = (tmp_path / "run.out").open("wb")
    proc = subprocess.Popen([PY, "-m", "nanguard", "run", "--run-dir", str(run), "--", PY, str(script)],
                            stdout=out, stderr=subprocess.STDOUT, env=_env(), cwd=tmp_path)
    try:
        deadline = time.monotonic() + 30
        while b"ready" not in (tmp_path / "run.out").read_bytes():
            assert time.monotonic() < deadline and proc.poll() is None, (tmp_path / "run.out").read_text()
            time.sleep(0.05)
        before = _project_hashes(run)
        for args in (["rollback", str(run), "--to", "epoch 1"], ["undo", str(run)],
                     ["rollback", str(run), "--to", "epoch 1", "--dry-run"]):
            refused = runner.invoke(app, args)
            assert_one_line_error(refused, ExitCode.LOCKED, f"pid {proc.pid}", "nanguard run")
        assert _project_hashes(run) == before
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
        out.close()
    assert runner.invoke(app, ["rollback", str(run), "--to", "epoch 1"]).exit_code == 0  # free once it ended


def test_undo_on_a_folder_that_is_not_a_run_creates_nothing(tmp_path: Path) -> None:
    folder = tmp_path / "not-a-run"
    folder.mkdir()
    result = runner.invoke(app, ["undo", str(folder)])
    assert_one_line_error(result, ExitCode.BAD_INPUT, "no backup left to undo")
    assert list(folder.iterdir()) == []


def test_dry_run_fails_exactly_where_the_real_rollback_fails_on_an_unusable_journal(run: Path) -> None:
    import sqlite3

    from nanguard.journal import Journal, journal_path

    Journal(run).close()
    with sqlite3.connect(journal_path(run)) as db:
        db.execute("PRAGMA user_version=99")  # a journal from a newer nanguard
    before = tree_hashes(run)
    dry = runner.invoke(app, ["rollback", str(run), "--to", "epoch 1", "--dry-run"])
    real = runner.invoke(app, ["rollback", str(run), "--to", "epoch 1"])
    assert_one_line_error(real, ExitCode.BAD_INPUT, "journal schema version 99")
    assert (dry.exit_code, dry.stderr) == (real.exit_code, real.stderr)

    def files(hashes: dict[str, str]) -> dict[str, str]:  # SQLite's own -wal/-shm index files aside
        return {k: v for k, v in hashes.items() if not k.endswith(("-wal", "-shm"))}

    assert files(tree_hashes(run)) == files(before)

def test_unsafe_target_is_refused_even_with_force(run: Path, tmp_path: Path) -> None:
    """The rollback target is what a resume hands to Ultralytics: a pickle that calls code is refused with
    --force too (exit 3, one line naming the file and the global), nothing changes, the payload never runs."""
    from nanguard.ckpt import load_checkpoint, save_checkpoint

    marker = tmp_path / "pwned"
    epoch1 = run / "weights" / "epoch1.pt"
    ckpt = load_checkpoint(epoch1)
    ckpt["payload"] = ShellCommand(marker)
    save_checkpoint(ckpt, epoch1)
    before = tree_hashes(run)
    for extra in ([], ["--force"]):
        result = runner.invoke(app, ["rollback", str(run), "--to", "epoch 1", *extra])
        assert result.exit_code == int(ExitCode.UNSAFE), result.output
        lines = result.stderr.splitlines()
        assert len(lines) == 1 and str(epoch1) in lines[0] and "system" in lines[0], result.output
    assert plan_rollback(run).target.name == "epoch2.pt"  # latest-clean skips it
    assert tree_hashes(run) == before
    assert not marker.exists()


def _fifo(path: Path) -> None:
    path.unlink(missing_ok=True)
    os.mkfifo(path)


HOSTILE_RUN_FILES: dict[str, tuple[str, Any]] = {
    "results.csv not UTF-8": ("results.csv", bytes(range(256)) * 4),
    "results.csv field over the csv limit": ("results.csv", b"epoch,x\n1,\"" + b"9" * 300_000 + b"\"\n"),
    "intent.json a FIFO": (".nanguard/intent.json", _fifo),
    "intent.json nested past the decoder": (".nanguard/intent.json", b"[" * 100_000 + b"]" * 100_000),
    "lock a FIFO": (".nanguard/lock", _fifo),
    "last.pt a folder": ("weights/last.pt", lambda p: (p.unlink(), p.mkdir())),
    "results.csv a folder": ("results.csv", lambda p: (p.unlink(), p.mkdir())),
    "best.pt a symlink loop": ("weights/best.pt", lambda p: (p.unlink(), p.symlink_to(p.name))),
}


@pytest.mark.parametrize("damage", HOSTILE_RUN_FILES, ids=list(HOSTILE_RUN_FILES))
def test_rollback_and_undo_refuse_a_hostile_run_file_in_one_line_without_blocking_or_changing_anything(
    run: Path, damage: str
) -> None:
    name, content = HOSTILE_RUN_FILES[damage]
    path = run / name
    (run / ".nanguard").mkdir(exist_ok=True)  # so undo gets past "no backup" to the file
    if callable(content):
        content(path)
    else:
        path.write_bytes(content)
    before = tree_hashes(run)
    commands = [["rollback", "--dry-run"], ["rollback", "--to", "epoch 1"]]
    if name != "results.csv" or path.is_dir():
        commands.append(["undo"])
    for args in commands:
        result = runner.invoke(app, [args[0], str(run), *args[1:]])
        assert_one_line_error(result, ExitCode.BAD_INPUT, str(path))
        assert tree_hashes(run) == before
