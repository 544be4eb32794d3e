"""The journal is a real SQLite database in WAL mode; an incident is committed before the step returns,
so a process killed right after it loses nothing; escalation ends in a stop with a report."""

from __future__ import annotations

import math
import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
import torch

import nanguard
from nanguard.errors import ExitCode
from nanguard.journal import journal_path, read_actions, read_metrics
from tests.training import make_setup, train

REPO = Path(__file__).resolve().parents[1]


def test_incident_survives_sigkill_right_after_the_step(tmp_path: Path) -> None:
    script = textwrap.dedent(f"""
        import os, signal, sys
        sys.path.insert(0, {str(REPO)!r})
        import nanguard
        from tests.training import make_setup, train
        setup = make_setup()
        guard = nanguard.Guard(setup.model, setup.optimizer, loop_scheduler=setup.scheduler, run_dir={str(tmp_path)!r})
        def die(i, s):
            if i == 4:  # the step after the incident: kill before anything else can flush or close
                os.kill(os.getpid(), signal.SIGKILL)
        train(setup, guard, poison_input=[3], before_forward={{4: die}})
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert proc.returncode == -9, proc.stderr
    (incident,) = nanguard.read_incidents(tmp_path)
    assert (incident["kind"], incident["step"], incident["action"]) == ("nonfinite_loss", 3, "skip")
    with sqlite3.connect(journal_path(tmp_path)) as db:
        assert db.execute("SELECT status FROM runs").fetchall() == [("running",)]  # it never closed


def test_journal_is_sqlite_in_wal_mode_and_runs_append(tmp_path: Path) -> None:
    for fault in (2, 5):
        setup = make_setup(steps=8)
        with nanguard.Guard(setup.model, setup.optimizer, loop_scheduler=setup.scheduler, run_dir=tmp_path) as guard:
            train(setup, guard, poison_input=[fault])
    with sqlite3.connect(journal_path(tmp_path)) as db:
        assert db.execute("PRAGMA journal_mode").fetchone() == ("wal",)
        assert db.execute("SELECT id, status FROM runs").fetchall() == [(1, "finished"), (2, "finished")]
        assert db.execute("SELECT run_id, step FROM incidents").fetchall() == [(1, 2), (2, 5)]


def test_a_fault_that_keeps_coming_back_ends_in_a_stop_with_a_report(tmp_path: Path) -> None:
    setup = make_setup(steps=60)
    policy = nanguard.Policy(check_every_steps=5, max_skips_in_window=3, skip_window_steps=10, max_rollbacks=2)
    guard = nanguard.Guard(setup.model, setup.optimizer, loop_scheduler=setup.scheduler,
                           run_dir=tmp_path, policy=policy)
    with pytest.raises(nanguard.TrainingStopped) as stopped:
        train(setup, guard, poison_input=range(20, 60))  # every batch from 20 on is bad
    err = stopped.value
    assert err.exit_code == ExitCode.STOPPED == 4
    assert "2 rollbacks did not get past the incident" in str(err)
    assert err.report[0] == "step 20 (epoch 0, batch 20): nonfinite_loss -> skip"
    actions = [(a["action"], a["step"], a["detail"].get("to_step"), a["detail"].get("level"))
               for a in read_actions(tmp_path)]
    # 3 skips in the window escalate to a rollback (to the snapshot at step 20); its probation fails at
    # once, so the next rollback goes one snapshot further back (15) with a stronger LR back-off; when that
    # fails too, stop.
    assert actions == [("rollback", 22, 20, 0), ("probation_failed", 20, None, 1), ("rollback", 22, 15, 1),
                       ("probation_failed", 15, None, 2), ("stop", 17, None, None)]
    factors = [a["detail"]["lr_factor"] for a in read_actions(tmp_path) if a["action"] == "rollback"]
    assert factors == [0.5, 0.25]
    with sqlite3.connect(journal_path(tmp_path)) as db:
        assert db.execute("SELECT status FROM runs").fetchall() == [("stopped",)]


def test_a_passed_probation_is_progress_and_resets_the_count(tmp_path: Path) -> None:
    setup = make_setup(steps=60)
    policy = nanguard.Policy(check_every_steps=5, max_skips_in_window=2, skip_window_steps=10, max_rollbacks=1,
                             lr_probation_steps=5)
    guard = nanguard.Guard(setup.model, setup.optimizer, loop_scheduler=setup.scheduler,
                           run_dir=tmp_path, policy=policy)
    # Two bursts far apart: each escalates to a rollback; the probation that passed between them is progress.
    train(setup, guard, poison_input=[12, 13, 41, 42])
    actions = [(a["action"], a["step"]) for a in read_actions(tmp_path)]
    # The first rollback rewinds the step counter from 13 to 10 (this loop feeds batches itself), so
    # batches 41 and 42 are steps 37 and 38.
    assert actions == [("rollback", 13), ("probation_passed", 14), ("rollback", 38), ("probation_passed", 39)]


def test_every_step_leaves_a_metrics_row_for_curves(tmp_path: Path) -> None:
    """One row per step with loss, gradient norm, clip threshold, applied LR and whether the update was applied;
    a non-finite loss is kept as NaN, not lost as NULL."""
    setup = make_setup(steps=12, scheduler=False)
    with nanguard.Guard(setup.model, setup.optimizer, loop_scheduler=setup.scheduler, run_dir=tmp_path,
                        policy=nanguard.Policy(max_grad_norm=0.5)) as guard:
        train(setup, guard, poison_input=[4])
    rows = read_metrics(tmp_path)
    assert [r["step"] for r in rows] == list(range(12))
    assert [r["batch_index"] for r in rows] == list(range(12))
    assert [r["applied"] for r in rows] == [i != 4 for i in range(12)]
    assert math.isnan(rows[4]["loss"])
    assert all(math.isfinite(r["loss"]) and r["grad_norm"] > 0 for i, r in enumerate(rows) if i != 4)
    assert {r["clip_threshold"] for r in rows if r["applied"]} == {0.5}
    assert rows[0]["lr"] == pytest.approx(1e-2)
    assert [r["loss"] for r in rows if r["applied"]] == [r.loss for r in setup.results if r.applied]


def test_metrics_show_the_rewound_steps_after_a_rollback(tmp_path: Path) -> None:
    """After an in-process rollback the step counter rewinds: the metrics table holds both the abandoned
    steps and their replacements, in the order they ran, with the rollback's LR back-off visible."""
    setup = make_setup(steps=20, scheduler=False)
    policy = nanguard.Policy(check_every_steps=5)

    def poison_weight(i: int, s: Any) -> None:
        with torch.no_grad():
            next(s.model.parameters())[0, 0] = float("nan")

    with nanguard.Guard(setup.model, setup.optimizer, loop_scheduler=setup.scheduler,
                        run_dir=tmp_path, policy=policy) as guard:
        train(setup, guard, before_forward={12: poison_weight})
    steps = [r["step"] for r in read_metrics(tmp_path)]
    rollback = next(a for a in read_actions(tmp_path) if a["action"] == "rollback")
    to_step = rollback["detail"]["to_step"]
    assert to_step <= 12 < rollback["step"] + 1
    assert steps[: rollback["step"] + 1] == list(range(rollback["step"] + 1))
    assert steps[rollback["step"] + 1] == to_step  # the next row is the first replayed step
    replayed = read_metrics(tmp_path)[rollback["step"] + 1:]
    assert replayed[0]["lr"] == pytest.approx(1e-2 * rollback["detail"]["lr_factor"])


def test_a_journal_that_cannot_be_opened_leaves_no_connection_or_files_behind(tmp_path: Path) -> None:
    from nanguard.errors import JournalError
    from nanguard.journal import Journal

    Journal(tmp_path).close()
    db = sqlite3.connect(journal_path(tmp_path))
    db.execute("PRAGMA user_version=99")  # a journal from a newer nanguard
    db.close()
    before = sorted(p.name for p in journal_path(tmp_path).parent.iterdir())
    with pytest.raises(JournalError, match="schema version 99") as refused:
        Journal(tmp_path)
    assert refused.value is not None  # the exception (and so any frame it holds) is still alive here
    assert sorted(p.name for p in journal_path(tmp_path).parent.iterdir()) == before  # no -wal/-shm left open

