"""Tests of ``nanguard rollback`` / ``nanguard undo`` on real Ultralytics runs (tiny YOLO11n, offline, CPU).

Each test that changes files works on a copy of the session's 4-epoch ``save_period=1`` run; a resumed
training really continues from the chosen epoch.
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
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
        assert "locked by pid" in result.stderr
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
