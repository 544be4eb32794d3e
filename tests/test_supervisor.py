"""Tests of ``nanguard run``: the supervisor around real processes — a real tiny YOLO training that diverges,
and small Python children that fail, stall, ignore SIGTERM or spawn grandchildren.

Where signals matter the CLI runs as a real subprocess (``python -m nanguard run ...``) and the test reads the
status file (``.nanguard/supervisor.json``), the journal and the log it leaves. Nothing is mocked.
"""

from __future__ import annotations

import contextlib
import csv
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
import torch
from typer.testing import CliRunner

from nanguard.ckpt import Status, audit
from nanguard.cli import app
from nanguard.errors import ExitCode
from nanguard.journal import read_actions
from nanguard.supervise import (
    TRANSITIONS,
    State,
    SupervisorConfig,
    SupervisorInputError,
    prepare_restart,
    read_status,
)
from nanguard.supervise.state import IllegalTransition, StatusFile
from tests.cli_checks import assert_one_line_error

runner = CliRunner()
HERE = Path(__file__).resolve().parent
PY = sys.executable

# Small children. Each writes what the test must know (its pid, its grandchild's pid, the signal it got)
# into a file named by its first argument.
FAMILY = """
import os, signal, subprocess, sys, time
if sys.argv[2] == "stubborn":
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # the child and (inherited) the grandchild ignore SIGTERM
grandchild = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"])
with open(sys.argv[1] + ".tmp", "w") as f:
    f.write(f"{os.getpid()} {grandchild.pid}")
os.replace(sys.argv[1] + ".tmp", sys.argv[1])
print("ready", flush=True)
time.sleep(300)
"""

POLITE = """
import signal, sys, time
def stop(signum, frame):
    open(sys.argv[1], "w").write(signal.Signals(signum).name)
    print("child got", signal.Signals(signum).name, flush=True)
    sys.exit(0)
signal.signal(signal.SIGINT, stop)
signal.signal(signal.SIGTERM, stop)
print("ready", flush=True)
while True:
    time.sleep(0.05)
"""

FAILING = """
import sys
with open(sys.argv[1], "a") as f:
    f.write(" ".join(sys.argv[2:]) + "\\n")
print("failing with 3", flush=True)
sys.exit(3)
"""


def _script(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / f"{name}.py"
    path.write_text(text)
    return path


@contextlib.contextmanager
def supervisor(run_dir: Path, *args: str, env: dict[str, str] | None = None) -> Iterator[subprocess.Popen[bytes]]:
    """``python -m nanguard run --run-dir RUN_DIR ARGS...`` as a subprocess; output to files next to the run."""
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    out = (run_dir.parent / f"{run_dir.name}.out").open("wb")
    err = (run_dir.parent / f"{run_dir.name}.err").open("wb")
    # cwd without a nanguard.toml or pyproject.toml: the policy defaults, and no torch import in the supervisor
    proc = subprocess.Popen([PY, "-m", "nanguard", "run", "--run-dir", str(run_dir), *args], stdout=out,
                            stderr=err, env=env, cwd=run_dir.parent)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        out.close()
        err.close()


def _stderr(run_dir: Path) -> str:
    return (run_dir.parent / f"{run_dir.name}.err").read_text()


def _wait_for(predicate: Any, timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def _running_status(run_dir: Path) -> dict[str, Any]:
    return _wait_for(lambda: (s := read_status(run_dir)) and s["state"] == "running" and s["child_pid"] and s,
                     30, "the supervisor to report a running child")


def _group_members(pgid: int) -> list[int]:
    """Live (non-zombie) processes of process group ``pgid``."""
    members = []
    for proc in psutil.process_iter(["status"]):
        with contextlib.suppress(psutil.Error, ProcessLookupError, PermissionError):
            if os.getpgid(proc.pid) == pgid and proc.info["status"] != psutil.STATUS_ZOMBIE:
                members.append(proc.pid)
    return members


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _actions(run_dir: Path) -> list[str]:
    return [a["action"] for a in read_actions(run_dir)]


# ---- the real YOLO training ----------------------------------------------------------------------------------


def test_diverging_yolo_training_is_stopped_rolled_back_and_resumed_to_a_clean_finish(
    yolo_offline: Path, yolo_dataset: Path, tmp_path: Path
) -> None:
    """A real YOLO11n training gets NaN in a weight in epoch index 1. The supervisor sees the nan progress
    lines, stops it, rolls the run back on disk to epoch 0, resumes with Ultralytics' own resume command
    (the default), and the run finishes: exit 0, every checkpoint clean, epochs 1-3 in results.csv.

    ``--nan-lines 2``, not the default 3: an epoch here has only 4 batches and the fault lands after the
    first, so at most 3 nan frames can appear before Ultralytics' own epoch-end recovery (§6) would act; the
    child paces its batches so that each gets a frame (without a TTY frames are drawn at most every 0.1 s).
    """
    run_dir = tmp_path / "runs" / "a"
    plan = tmp_path / "fault-plan"
    plan.touch()
    env = {**os.environ, "YOLO_VERBOSE": "true",  # the progress lines are the supervisor's input
           "PATH": f"{Path(PY).parent}{os.pathsep}{os.environ.get('PATH', '')}"}  # `yolo` for the resume
    with supervisor(run_dir, "--nan-lines", "2", "--grace", "10", "--backoff", "0", "--",
                    PY, str(HERE / "supervised_yolo.py"), str(yolo_dataset), str(run_dir), "--epochs", "3",
                    "--fault-plan", str(plan), env=env) as proc:
        assert proc.wait(timeout=240) == 0, _stderr(run_dir)
    assert not plan.exists()  # the fault really happened
    log = (run_dir / ".nanguard" / "supervisor" / "train.log").read_text(errors="replace")
    assert "NaN injected" in log and "nan" in log
    assert "attempt 2 (restart 1 of 3)" in log and "yolo train resume model=" in log
    assert "Resuming training" in log
    actions = read_actions(run_dir)
    names = [a["action"] for a in actions]
    for name in ("supervisor_start", "supervisor_trigger", "supervisor_stop", "disk_rollback",
                 "supervisor_restart", "supervisor_exit"):
        assert name in names, names
    trigger = next(a for a in actions if a["action"] == "supervisor_trigger")
    assert trigger["detail"]["trigger"] in ("nan", "exit"), trigger  # exit: Ultralytics' recovery failed first
    rollback = next(a for a in actions if a["action"] == "disk_rollback")
    assert rollback["detail"]["target_epoch"] == 0
    assert names.index("supervisor_stop") < names.index("disk_rollback") < names.index("supervisor_restart")
    weights = sorted((run_dir / "weights").glob("*.pt"))
    assert {"last.pt", "best.pt", "epoch0.pt", "epoch1.pt", "epoch2.pt"} <= {p.name for p in weights}
    for path in weights:
        assert audit(path).status is Status.CLEAN, path
    with (run_dir / "results.csv").open(newline="") as handle:
        rows = list(csv.DictReader(handle, skipinitialspace=True))
    assert [int(float(row["epoch"])) for row in rows] == [1, 2, 3]
    assert not any("nan" in value for row in rows for value in row.values())
    status = read_status(run_dir)
    assert status is not None
    assert (status["state"], status["restarts"], status["attempt"], status["child_pid"]) == ("finished", 1, 2, None)
    assert status["resume_command"][:3] == ["yolo", "train", "resume"]
    assert not (run_dir / ".nanguard" / "supervisor.pid").exists()


# ---- process management with small children ----------------------------------------------------------------


def test_stall_trigger_stops_a_child_that_ignores_sigterm_with_sigkill_after_the_grace_period(tmp_path: Path) -> None:
    """No output for ``--stall-minutes 0.02`` (1.2 s) stops the child. It and its grandchild ignore SIGTERM,
    so the group is SIGKILLed once the 1.5 s grace period is over: gone within grace + slack."""
    run_dir, pids = tmp_path / "run", tmp_path / "pids"
    grace = 1.5
    with supervisor(run_dir, "--stall-minutes", "0.02", "--grace", str(grace), "--max-restarts", "0", "--",
                    PY, str(_script(tmp_path, "family", FAMILY)), str(pids), "stubborn") as proc:
        _wait_for(pids.exists, 30, "the child's pid file")
        child, grandchild = map(int, pids.read_text().split())
        _wait_for(lambda: (s := read_status(run_dir)) and s["state"] == "stopping", 30, "the stall trigger")
        stopping = time.monotonic()
        _wait_for(lambda: not _group_members(child), grace + 3.0, "the child's group to be gone")
        assert time.monotonic() - stopping <= grace + 3.0
        assert proc.wait(timeout=30) == ExitCode.STOPPED, _stderr(run_dir)
    assert not _alive(child) and not _alive(grandchild)
    stop = next(a for a in read_actions(run_dir) if a["action"] == "supervisor_stop")
    assert stop["detail"]["how"] == "killed" and stop["detail"]["returncode"] == -signal.SIGKILL
    assert stop["detail"]["seconds"] >= grace  # SIGTERM was ignored: SIGKILL came only after the grace period
    trigger = next(a for a in read_actions(run_dir) if a["action"] == "supervisor_trigger")
    assert trigger["detail"]["trigger"] == "stall"
    status = read_status(run_dir)
    assert status is not None and status["state"] == "failed" and status["last_trigger"].startswith("stall:")
    assert _stderr(run_dir).splitlines()[-1].startswith("nanguard: error: restart budget spent")


def test_supervisor_killed_with_sigkill_leaves_no_child_or_grandchild(tmp_path: Path) -> None:
    """SIGKILL to the supervisor: PR_SET_PDEATHSIG ends the child, the watchdog ends the rest of its group."""
    run_dir, pids = tmp_path / "run", tmp_path / "pids"
    with supervisor(run_dir, "--", PY, str(_script(tmp_path, "family", FAMILY)), str(pids), "stubborn") as proc:
        _wait_for(pids.exists, 30, "the child's pid file")
        child, grandchild = map(int, pids.read_text().split())
        assert _running_status(run_dir)["child_pid"] == child
        assert os.getpgid(grandchild) == child  # the grandchild is in the child's group, not the supervisor's
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
        _wait_for(lambda: not _group_members(child), 8, "no process of the child's group left")
    assert not _alive(child) and not _alive(grandchild)


@pytest.mark.parametrize(("sig", "code"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_sigint_and_sigterm_are_forwarded_to_the_child_and_the_supervisor_exits_128_plus_n(
    tmp_path: Path, sig: signal.Signals, code: int
) -> None:
    """Ctrl-C (SIGINT) or SIGTERM to the supervisor reaches the child's group as the same signal; the child
    ends, the supervisor exits 128+N and the status file says stopped."""
    run_dir, got = tmp_path / "run", tmp_path / "got"
    with supervisor(run_dir, "--", PY, str(_script(tmp_path, "polite", POLITE)), str(got)) as proc:
        child = _running_status(run_dir)["child_pid"]
        _wait_for(lambda: "ready" in (run_dir / ".nanguard" / "supervisor" / "train.log").read_text(), 30,
                  "the child to install its handlers")
        proc.send_signal(sig)
        assert proc.wait(timeout=30) == code, _stderr(run_dir)
    assert got.read_text() == sig.name
    assert not _alive(child)
    status = read_status(run_dir)
    assert status is not None and (status["state"], status["child_pid"]) == ("stopped", None)
    assert f"child got {sig.name}" in (run_dir / ".nanguard" / "supervisor" / "train.log").read_text()
    assert _actions(run_dir)[-1] == "supervisor_exit"
    assert not (run_dir / ".nanguard" / "supervisor.pid").exists()


def test_failed_exit_restarts_with_the_resume_command_until_the_budget_is_spent_then_exits_4(tmp_path: Path) -> None:
    """A child that exits 3 is restarted ``--max-restarts 2`` times with ``--resume-cmd`` (placeholders filled
    in), then the supervisor exits 4 (STOPPED) with one error line; the log has a marker per attempt."""
    run_dir, calls = tmp_path / "run", tmp_path / "calls"
    script = _script(tmp_path, "failing", FAILING)
    with supervisor(run_dir, "--max-restarts", "2", "--backoff", "0.05", "--resume-cmd",
                    f"{PY} {script} {calls} resumed {{run_dir}}", "--", PY, str(script), str(calls), "first") as proc:
        assert proc.wait(timeout=60) == ExitCode.STOPPED, _stderr(run_dir)
    assert calls.read_text().splitlines() == ["first", f"resumed {run_dir}", f"resumed {run_dir}"]
    log = (run_dir / ".nanguard" / "supervisor" / "train.log").read_text()
    assert log.count("=== nanguard run: attempt") == 6 and log.count("failing with 3") == 3  # start + end each
    assert _actions(run_dir).count("supervisor_restart") == 2
    assert _actions(run_dir).count("supervisor_trigger") == 3
    status = read_status(run_dir)
    assert status is not None
    assert (status["state"], status["restarts"], status["attempt"]) == ("failed", 2, 3)
    assert status["last_trigger"] == "exit: the command failed (exit status 3)"
    last = _stderr(run_dir).splitlines()[-1]
    assert last.startswith("nanguard: error: restart budget spent (2 restart(s))"), last


def test_second_run_on_the_same_run_dir_is_refused_with_exit_5(tmp_path: Path) -> None:
    """While one ``nanguard run`` supervises a folder, another on it exits 5 with one line, changing nothing."""
    run_dir, got = tmp_path / "run", tmp_path / "got"
    with supervisor(run_dir, "--", PY, str(_script(tmp_path, "polite", POLITE)), str(got)) as proc:
        first = _running_status(run_dir)
        result = runner.invoke(app, ["run", "--run-dir", str(run_dir), "--", PY, "-c", "print('second')"])
        assert_one_line_error(result, ExitCode.LOCKED, "supervisor.pid", f"pid {proc.pid}")
        assert read_status(run_dir)["pid"] == first["pid"] == proc.pid  # type: ignore[index]
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 143


@pytest.mark.parametrize(("args", "fragments"), [
    (["--max-restarts", "1"], ["put the training command after --"]),
    (["--", ], ["no command to run"]),
    (["--", "no-such-program-xyz"], ["no-such-program-xyz", "not found on PATH"]),
    (["--resume-cmd", "python train.py --resume {last}", "--", PY, "-c", "pass"], ["{last}", "--run-dir"]),
    (["--run-dir", "RUN", "--resume-cmd", "python t.py {ckpt}", "--", PY, "-c", "pass"], ["unknown placeholder"]),
    (["--run-dir", "RUN", "--nan-lines", "0", "--", PY, "-c", "pass"], ["--nan-lines must be an integer >= 1"]),
])
def test_bad_input_is_one_line_exit_2(tmp_path: Path, args: list[str], fragments: list[str]) -> None:
    """No ``--`` or no command, a program that is not there, a resume command whose run folder is unknown or
    with an unknown placeholder, a bad value: one line, exit 2, and no .nanguard folder anywhere."""
    args = [str(tmp_path / "run") if arg == "RUN" else arg for arg in args]
    with contextlib.chdir(tmp_path):
        result = runner.invoke(app, ["run", *args])
    assert_one_line_error(result, ExitCode.BAD_INPUT, *fragments)
    assert not any(tmp_path.rglob(".nanguard"))


# ---- in-process units ------------------------------------------------------------------------------------------


def test_every_state_is_reachable_and_final_states_have_no_way_out(tmp_path: Path) -> None:
    reachable, todo = {State.STARTING}, [State.STARTING]
    while todo:
        for nxt in TRANSITIONS[todo.pop()]:
            if nxt not in reachable:
                reachable.add(nxt)
                todo.append(nxt)
    assert reachable == set(State)
    assert all(not TRANSITIONS[s] for s in (State.FINISHED, State.FAILED, State.STOPPED))
    status = StatusFile(tmp_path, {"command": ["x"]})
    status.move(State.RUNNING, child_pid=1)
    with pytest.raises(IllegalTransition):
        status.move(State.WAITING)
    written = json.loads((tmp_path / "supervisor.json").read_text())
    assert written["state"] == "running" and written["child_pid"] == 1 and written["log"].endswith("train.log")


def test_supervisor_defaults_equal_the_policy_defaults(tmp_path: Path) -> None:
    """``nanguard run`` without a policy file uses SupervisorConfig's defaults (no torch import): they must be
    the documented Policy defaults."""
    from nanguard.policy import Policy

    assert SupervisorConfig(command=(PY,), run_dir=tmp_path) == SupervisorConfig.from_policy(
        Policy(), command=(PY,), run_dir=tmp_path)


def test_backoff_doubles_per_restart_and_is_capped(tmp_path: Path) -> None:
    config = SupervisorConfig(command=(PY,), run_dir=tmp_path, backoff_seconds=5.0, backoff_max_seconds=12.0)
    assert [config.backoff_for(n) for n in (1, 2, 3, 4)] == [5.0, 10.0, 12.0, 12.0]
    with pytest.raises(SupervisorInputError, match="--grace must be a number >= 0"):
        SupervisorConfig(command=(PY,), run_dir=tmp_path, grace_seconds=-1)


def test_checkpoint_dir_gives_the_newest_clean_checkpoint_to_the_resume_command(tmp_path: Path) -> None:
    """Another framework: the newest checkpoint is dirty, so ``{checkpoint}`` is the older clean one; nothing
    in the folder changes. With no clean checkpoint at all the original command runs again."""
    folder = tmp_path / "ckpts"
    folder.mkdir()
    clean, dirty = folder / "step100.pt", folder / "step200.pt"
    torch.save({"model": {"w": torch.ones(3)}, "step": 100}, clean)
    torch.save({"model": {"w": torch.tensor([1.0, float("nan"), 1.0])}, "step": 200}, dirty)
    os.utime(clean, (1_000_000, 1_000_000))  # older than the dirty one
    config = SupervisorConfig(command=(PY, "train.py"), run_dir=tmp_path, checkpoint_dir=folder,
                              resume_command=f"{PY} train.py --resume {{checkpoint}}")
    restart = prepare_restart(config)
    assert restart.command == [PY, "train.py", "--resume", str(clean)]
    assert (restart.source, restart.checkpoint, restart.original) == ("checkpoint_dir", clean, False)
    assert {Path(v["path"]).name: v["status"] for v in restart.detail["audited"]} == {
        "step100.pt": "clean", "step200.pt": "dirty"}
    clean.unlink()
    again = prepare_restart(config)
    assert (again.command, again.checkpoint, again.original) == ([PY, "train.py"], None, True)


@pytest.mark.slow
def test_a_guarded_child_writing_snapshots_is_not_refused_by_its_own_supervisor(tmp_path: Path) -> None:
    """The supervisor holds the run lock, its guarded child the Guard lock: they do not refuse each other."""
    from tests.test_snapshot import GUARDED_CHILD

    run_dir = tmp_path / "run"
    script = _script(tmp_path, "guarded", GUARDED_CHILD)
    with supervisor(run_dir, "--", PY, str(script), str(run_dir), "exit") as proc:
        assert proc.wait(timeout=120) == 0, _stderr(run_dir)
    assert read_status(run_dir)["state"] == "finished"  # type: ignore[index]
    assert list((run_dir / ".nanguard" / "snapshots").glob("*.pt"))
