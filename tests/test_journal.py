"""The journal is a real SQLite database in WAL mode; an incident is committed before the step returns,
so a process killed right after it loses nothing; escalation ends in a stop with a report."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import nanguard
from nanguard.errors import ExitCode
from nanguard.journal import journal_path, read_actions
from tests.training import make_setup, train

REPO = Path(__file__).resolve().parents[1]


def test_incident_survives_sigkill_right_after_the_step(tmp_path: Path) -> None:
    script = textwrap.dedent(f"""
        import os, signal, sys
        sys.path.insert(0, {str(REPO)!r})
        import nanguard
        from tests.training import make_setup, train
        setup = make_setup()
        guard = nanguard.Guard(setup.model, setup.optimizer, run_dir={str(tmp_path)!r})
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
        with nanguard.Guard(setup.model, setup.optimizer, run_dir=tmp_path) as guard:
            train(setup, guard, poison_input=[fault])
    with sqlite3.connect(journal_path(tmp_path)) as db:
        assert db.execute("PRAGMA journal_mode").fetchone() == ("wal",)
        assert db.execute("SELECT id, status FROM runs").fetchall() == [(1, "finished"), (2, "finished")]
        assert db.execute("SELECT run_id, step FROM incidents").fetchall() == [(1, 2), (2, 5)]


def test_a_fault_that_keeps_coming_back_ends_in_a_stop_with_a_report(tmp_path: Path) -> None:
    setup = make_setup(steps=60)
    policy = nanguard.Policy(check_every_steps=5, max_skips_in_window=3, skip_window_steps=10, max_rollbacks=2)
    guard = nanguard.Guard(setup.model, setup.optimizer, run_dir=tmp_path, policy=policy)
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
    guard = nanguard.Guard(setup.model, setup.optimizer, run_dir=tmp_path, policy=policy)
    # Two bursts far apart: each escalates to a rollback; the probation that passed between them is progress.
    train(setup, guard, poison_input=[12, 13, 41, 42])
    actions = [(a["action"], a["step"]) for a in read_actions(tmp_path)]
    # The first rollback rewinds the step counter from 13 to 10 (this loop feeds batches itself), so
    # batches 41 and 42 are steps 37 and 38.
    assert actions == [("rollback", 13), ("probation_passed", 14), ("rollback", 38), ("probation_passed", 39)]
