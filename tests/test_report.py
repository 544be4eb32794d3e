"""Tests of ``nanguard status``, ``nanguard report`` and ``nanguard plan`` (nanguard.report).

Most run on one real guarded YOLO11n training (3 epochs, two optimizer steps each) in which a NaN is written into
a weight after epoch 1, batch 0: the next step's loss is NaN, the guard rolls back in process and backs the LR
off. The planner's arithmetic is checked on a journal written with a fake clock, so every time is known.
"""

from __future__ import annotations

import base64
import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from typer.testing import CliRunner

from nanguard.ckpt import Status, audit
from nanguard.cli import app
from nanguard.errors import ExitCode
from nanguard.journal import CheckpointRecord, IncidentRecord, Journal, MetricRecord, read_incidents
from tests.cli_checks import assert_one_line_error

runner = CliRunner()
CHROMIUM = Path("/usr/bin/chromium")
PLOTS = ("loss", "grad_norm", "lr", "timeline")


# ---- a real guarded run -----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def yolo_rollback_run(yolo_offline: Path, yolo_dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Run folder of a finished guarded 3-epoch YOLO run with an in-process rollback in epoch 1."""
    pytest.importorskip("ultralytics")
    from tests.test_yolo_guard import BatchCounter, train_guarded

    counter = BatchCounter()

    def after_batch(trainer: Any) -> None:
        if trainer.epoch == 1 and counter.index == 0:
            with torch.no_grad():
                next(trainer.model.parameters()).view(-1)[0] = float("nan")

    _, save_dir = train_guarded(tmp_path_factory.mktemp("report_run"), yolo_dataset,
                                [*counter.hooks(), ("on_train_batch_end", after_batch)], epochs=3)
    return save_dir


def invoke(*args: str) -> Any:
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    return result


def test_status_json_counts_epochs_incidents_and_the_last_clean_checkpoint(yolo_rollback_run: Path) -> None:
    data = json.loads(invoke("status", yolo_rollback_run, "--json").stdout)
    assert data["state"] == "finished"
    assert (data["epochs_done"], data["epochs_total"], data["batches"]) == (3, 3, 2)
    journal = Counter(row["epoch"] for row in read_incidents(yolo_rollback_run))
    assert {row["epoch"]: row["count"] for row in data["incidents_per_epoch"]} == dict(journal) == {1: 2}
    ckpt = data["last_clean_checkpoint"]
    assert Path(ckpt["path"]).is_file() and ckpt["epoch"] == 2
    assert audit(ckpt["path"]).status is Status.CLEAN
    [rollback] = data["rollbacks"]
    assert (rollback["kind"], rollback["from_step"], rollback["to_step"]) == ("in_process", 3, 2)
    assert [t["epoch"] for t in data["epoch_times"]] == [0, 1, 2]
    assert [t["clean"] for t in data["epoch_times"]] == [True, False, True]
    assert data["epoch_seconds"] > 0 and data["remaining_seconds"] == 0
    assert data["lr"]["backoff"]["factor"] == 0.5 and data["lr"]["probation"]["state"] == "on"
    assert data["supervisor"] is None and data["steps_recorded"] == 6


def test_status_dashboard_shows_progress_health_lr_and_processes(yolo_rollback_run: Path) -> None:
    out = invoke("status", yolo_rollback_run).stdout
    for part in ("progress", "3/3 done", "ETA", "finished", "nonfinite_model", "last clean checkpoint:",
                 "epoch2.pt (epoch 2)", "in-process rollback: step 3 → 2", "LR: ", "back-off: ×0.5", "probation: ON",
                 "supervisor: none"):
        assert part in out, out


@pytest.fixture()
def journal_copy(yolo_rollback_run: Path, tmp_path: Path) -> Path:
    """The run folder without its weights (status needs none), safe to change."""
    return Path(shutil.copytree(yolo_rollback_run, tmp_path / "run", ignore=shutil.ignore_patterns("weights")))


def test_status_shows_the_supervisor_and_whether_its_processes_are_alive(journal_copy: Path) -> None:
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    state = {"pid": os.getpid(), "child_pid": gone.pid, "state": "waiting", "attempt": 2, "restarts": 1,
             "max_restarts": 3, "log": "nanguard-run.log", "command": ["yolo", "train"],
             "resume_command": ["yolo", "train", "resume"], "started_at": time.time() - 5, "updated_at": time.time(),
             "last_trigger": "nan in 3 progress lines",
             "last_progress": {"epoch": 1, "batch": 0, "batches": 2, "epochs": 3}}  # 0-based, as the scanner gives
    (journal_copy / ".nanguard" / "supervisor.json").write_text(json.dumps(state))
    data = json.loads(invoke("status", journal_copy, "--json").stdout)
    supervisor = data["supervisor"]
    assert supervisor["state"] == "waiting" and supervisor["error"] is None
    procs = {p["role"]: p for p in supervisor["processes"]}
    assert procs["supervisor"]["alive"] is True and procs["supervisor"]["rss_bytes"] > 0
    assert procs["training"]["alive"] is False
    # Newer than the journal's last step: the supervisor's progress is shown (epoch 1, one batch of two done).
    assert (data["state"], data["progress_source"], data["epoch"], data["batch"]) == ("running", "supervisor", 1, 1)
    assert data["position"] == 1.5 and data["remaining_seconds"] == pytest.approx(1.5 * data["epoch_seconds"])
    out = invoke("status", journal_copy).stdout
    assert "supervisor: waiting, attempt 2, restarts 1/3, last trigger: nan in 3 progress lines" in out, out
    (journal_copy / ".nanguard" / "supervisor.json").write_text('{"pid": 12, "state": ')
    out = invoke("status", journal_copy).stdout
    assert "supervisor.json is malformed: unreadable (JSONDecodeError" in out, out
    assert json.loads(invoke("status", journal_copy, "--json").stdout)["supervisor"]["error"].startswith("unreadable")


def test_status_watch_refreshes_until_ctrl_c_and_exits_0(journal_copy: Path) -> None:
    proc = subprocess.Popen([sys.executable, "-m", "nanguard", "status", str(journal_copy), "--watch",
                             "--interval", "0.2"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(3.0)  # start-up, the first render and a few refreshes
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert "progress" in out and "Traceback" not in err


# ---- the report -------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def written_report(yolo_rollback_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("report") / "report.html"
    result = invoke("report", yolo_rollback_run, "-o", out)
    assert f"wrote {out}" in result.stdout
    return out


def test_report_is_one_self_contained_html_file_with_the_plots_embedded(written_report: Path) -> None:
    text = written_report.read_text(encoding="utf-8")
    images = re.findall(r'<img [^>]*src="data:image/png;base64,([^"]+)"', text)
    assert len(images) == len(PLOTS)
    for plot, encoded in zip(PLOTS, images, strict=True):
        assert base64.b64decode(encoded) == (written_report.parent / f"report_{plot}.png").read_bytes()
    # Nothing outside the file: no URL, no linked stylesheet or script, no src/href other than data: URIs.
    outside = re.sub(r"data:image/png;base64,[A-Za-z0-9+/=]+", "", text)  # base64 holds '/' too
    assert not re.search(r"https?:|//[a-z]|<link|url\(|@import", outside, re.IGNORECASE)
    assert all(ref.startswith("data:") for ref in re.findall(r'(?:src|href)="([^"]*)"', text))
    for part in ("<h2>Incidents (2)</h2>", "nonfinite_model", "<h2>Checkpoint verdicts", 'class="clean"', "rollback"):
        assert part in text


def test_report_pngs_are_real_plots(written_report: Path) -> None:
    from PIL import Image

    for plot in PLOTS:
        image = Image.open(written_report.parent / f"report_{plot}.png")
        assert image.format == "PNG" and image.size == (1100, 374)
        colours = image.convert("RGB").getcolors(maxcolors=1 << 16)
        assert colours is None or len(colours) > 50, plot  # lines, text, shading: not a blank canvas


def test_report_png_dir_puts_the_pngs_there(yolo_rollback_run: Path, tmp_path: Path) -> None:
    invoke("report", yolo_rollback_run, "-o", tmp_path / "r.html", "--png-dir", tmp_path / "pngs")
    assert sorted(p.name for p in (tmp_path / "pngs").iterdir()) == sorted(f"r_{p}.png" for p in PLOTS)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pngs", "r.html"]


def test_report_renders_in_headless_chromium_with_every_plot_loaded(written_report: Path, tmp_path: Path) -> None:
    if not CHROMIUM.exists():
        if os.environ.get("CI"):
            pytest.fail(f"{CHROMIUM} is missing; CI must install Debian's chromium")
        pytest.skip(f"{CHROMIUM} is missing (apt-get install chromium); CI fails here instead of skipping")
    flags = [str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=2000"]
    url = written_report.resolve().as_uri()
    dom = subprocess.run([*flags, "--dump-dom", url], capture_output=True, text=True, timeout=120)
    assert dom.returncode == 0, dom.stderr[-2000:]
    assert f'data-images-loaded="{len(PLOTS)}"' in dom.stdout, dom.stdout[:500]
    shot = tmp_path / "shot.png"
    done = subprocess.run([*flags, f"--screenshot={shot}", "--window-size=1280,2400", url], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0 and shot.stat().st_size > 20_000, done.stderr[-2000:]


def test_report_falls_back_to_results_csv_without_per_step_metrics(yolo_rollback_run: Path, tmp_path: Path) -> None:
    run = tmp_path / "unguarded"
    run.mkdir()
    for name in ("results.csv", "args.yaml"):
        shutil.copy(yolo_rollback_run / name, run / name)
    Journal(run).close()  # an empty journal: what `nanguard audit --record` leaves in an unguarded run
    invoke("report", run, "-o", tmp_path / "r.html")
    assert "Training losses per epoch from results.csv" in (tmp_path / "r.html").read_text()
    data = json.loads(invoke("status", run, "--json").stdout)
    assert data["epochs_done"] == 3 and {t["source"] for t in data["epoch_times"]} == {"results.csv"}
    assert data["lr"]["source"].startswith("results.csv")


# ---- the plan ---------------------------------------------------------------------------------------------------


class FakeRun:
    """Writes a journal whose every wall time is chosen: the writer's clock is replaced by :attr:`now`."""

    def __init__(self, run: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        self.run, self.now, self.step = run, 1000.0, 0
        monkeypatch.setattr("nanguard.journal.writer.time", SimpleNamespace(time=lambda: self.now))
        self.journal = Journal(run)
        self.run_id = 0

    def start(self, at: float, policy: dict[str, Any]) -> None:
        self.now = at
        self.run_id = self.journal.start_run(policy=policy)

    def steps(self, epoch: int, batches: range, every_s: float, *, loss: float = 1.0) -> None:
        rows = []
        for batch in batches:
            self.now += every_s
            rows.append(MetricRecord(step=self.step, epoch=epoch, batch_index=batch, loss=loss, grad_norm=1.0,
                                     clip_threshold=None, lr=0.01, applied=loss == loss, wall_time=self.now))
            self.step += 1
        self.journal.record_metrics(self.run_id, rows)

    def end(self, at: float) -> None:
        self.now = at
        self.journal.end_run(self.run_id, "finished")


@pytest.fixture()
def known_times(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """10 epochs of 10 steps, 6 s per step (60 s per epoch). Process 1 trains epochs 0-1 and ends at 1125; process 2
    starts at 1150, its first step at 1165 (a 40 s restart), trains epoch 2 and half of epoch 3, where step 35
    (epoch 3, batch 5) has a NaN loss at 1255. Clean checkpoints of epochs 0-2 are in the journal."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "args.yaml").write_text("task: detect\nepochs: 10\n")
    fake = FakeRun(run, monkeypatch)
    fake.start(1000.0, {"check_every_steps": 8})
    for epoch in (0, 1):
        fake.steps(epoch, range(10), 6.0)
        fake.journal.record_checkpoint(CheckpointRecord(path=str(run / f"epoch{epoch}.pt"), status="clean",
                                                        epoch=float(epoch), mtime=fake.now))
    fake.end(1125.0)
    fake.start(1150.0, {"check_every_steps": 8})
    fake.now = 1159.0
    fake.steps(2, range(10), 6.0)  # first step at 1165
    fake.journal.record_checkpoint(CheckpointRecord(path=str(run / "epoch2.pt"), status="clean", epoch=2.0,
                                                    mtime=fake.now))
    fake.steps(3, range(5), 6.0)
    fake.steps(3, range(5, 6), 6.0, loss=float("nan"))
    fake.journal.record_incident(fake.run_id, IncidentRecord(kind="nonfinite_loss", step=35, action="skip", epoch=3,
                                                             batch_index=5, loss=float("nan")))
    fake.journal.close()
    yield run


def test_plan_weighs_the_three_options_with_the_measured_times(known_times: Path) -> None:
    plan = json.loads(invoke("plan", known_times, "--json").stdout)
    assert plan["decision"]["position"] == pytest.approx(3.6) and plan["decision"]["wall_time"] == 1255.0
    assert plan["epoch_seconds"] == pytest.approx(60.0)  # epochs 0, 1 (60 s) and 2 (15 s to its first step + 54)
    assert plan["resume_overhead_s"] == pytest.approx(40.0)  # 1125 (process 1 ended) → 1165 (first step of 2)
    assert plan["rollback_target"]["epoch"] == 2 and "no weights folder" in plan["rollback_note"]
    options = {o["key"]: o for o in plan["options"]}
    # (b) roll back now: 40 s restart + redo epoch 3's first 0.6 (36 s); then epochs 3-9 (420 s).
    assert options["b"]["seconds_lost"] == pytest.approx(76.0)
    assert options["b"]["finish_seconds"] == pytest.approx(460.0) and options["b"]["eta"] == pytest.approx(1715.0)
    # (a) finish epoch 3 first (24 s more, all thrown away).
    assert options["a"]["seconds_lost"] == pytest.approx(100.0)
    assert options["a"]["finish_seconds"] == pytest.approx(484.0)
    # (c) in process: the window since the last check (step 35 % 8 + 1 = 4 steps of 6 s); the data is skipped.
    assert options["c"]["seconds_lost"] == pytest.approx(24.0)
    assert options["c"]["finish_seconds"] == pytest.approx(384.0)
    assert options["c"]["hours_lost"] == pytest.approx(24.0 / 3600)
    assert any("measured, median of 1 restart" in line for line in plan["assumptions"])
    text = invoke("plan", known_times).stdout
    for part in ("(a) |", "(b) |", "(c) |", "0.02 h (1m 16s)", "assumptions:", "resume overhead 40.0s: measured"):
        assert part in text, text


def test_epochs_redone_after_a_disk_rollback_count_once_with_the_redone_time(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Epoch 1 runs at 6 s per step, is rolled back on disk, and is redone by a new process at 3 s per step."""
    run = tmp_path / "run"
    run.mkdir()
    fake = FakeRun(run, monkeypatch)
    fake.start(1000.0, {})
    fake.steps(0, range(10), 6.0)
    fake.steps(1, range(10), 6.0)
    fake.end(1130.0)
    fake.journal.record_action(fake.run_id, step=0, action="disk_rollback", reason="test",
                               detail={"target_epoch": 0, "resume_epoch": 1, "results_rows_dropped": 1})
    fake.start(1200.0, {})
    fake.steps(1, range(10), 3.0)
    fake.steps(2, range(10), 3.0)
    fake.end(1300.0)
    fake.journal.close()
    data = json.loads(invoke("status", run, "--json", "--epochs", "3").stdout)
    times = {t["epoch"]: t["seconds"] for t in data["epoch_times"]}
    assert times == pytest.approx({0: 60.0, 1: 30.0, 2: 30.0})
    assert [r["kind"] for r in data["rollbacks"]] == ["disk"]
    from nanguard.report import gather_run

    [span] = gather_run(run, probe_processes=False).axis.spans
    assert (span.kind, span.x0, span.x1) == ("disk", 1.0, 2.0)


def test_plan_on_the_real_run_names_the_rollback_target_and_what_the_guard_did(yolo_rollback_run: Path) -> None:
    plan = json.loads(invoke("plan", yolo_rollback_run, "--json").stdout)
    assert Path(plan["rollback_target"]["path"]).name == "epoch0.pt" and plan["rollback_target"]["epoch"] == 0
    assert plan["decision"]["kind"].startswith("nonfinite") and plan["decision"]["epoch"] == 1
    c = next(o for o in plan["options"] if o["key"] == "c")
    assert "rolled back 2 step(s), step 3 → 2" in c["note"]
    b = next(o for o in plan["options"] if o["key"] == "b")
    assert c["seconds_lost"] < b["seconds_lost"]


# ---- bad input and imports ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("command", ["status", "report", "plan"])
def test_a_missing_run_folder_or_journal_is_one_line_exit_2_and_writes_nothing(command: str, tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    extra = ["-o", str(out / "r.html")] if command == "report" else []
    result = runner.invoke(app, [command, str(tmp_path / "nope"), *extra])
    assert_one_line_error(result, ExitCode.BAD_INPUT, "no such run folder")
    (tmp_path / "empty").mkdir()
    result = runner.invoke(app, [command, str(tmp_path / "empty"), *extra])
    assert_one_line_error(result, ExitCode.BAD_INPUT, "no nanguard journal")
    assert list(out.iterdir()) == []


def test_plan_without_a_known_epoch_count_is_one_line_exit_2(known_times: Path) -> None:
    (known_times / "args.yaml").unlink()
    result = runner.invoke(app, ["plan", str(known_times)])
    assert_one_line_error(result, ExitCode.BAD_INPUT, "pass --epochs N")
    assert runner.invoke(app, ["plan", str(known_times), "--epochs", "10"]).exit_code == 0


def test_report_into_a_missing_folder_is_one_line_exit_2(known_times: Path, tmp_path: Path) -> None:
    result = runner.invoke(app, ["report", str(known_times), "-o", str(tmp_path / "no" / "r.html")])
    assert_one_line_error(result, ExitCode.BAD_INPUT, "does not exist")


def test_help_and_status_import_neither_torch_nor_matplotlib(known_times: Path) -> None:
    script = (
        "import sys\n"
        "from typer.testing import CliRunner\n"
        "from nanguard.cli import app\n"
        "for args in (['--help'], ['status', sys.argv[1]], ['status', sys.argv[1], '--json']):\n"
        "    result = CliRunner().invoke(app, args)\n"
        "    assert result.exit_code == 0, result.output\n"
        "heavy = {'torch', 'matplotlib'} & set(sys.modules)\n"
        "assert not heavy, heavy\n"
    )
    done = subprocess.run([sys.executable, "-c", script, str(known_times)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr


def test_status_renders_to_a_fixed_width_console(known_times: Path) -> None:
    from rich.console import Console

    from nanguard.report import gather_run, status_renderables

    console = Console(file=io.StringIO(), width=100, color_system=None)
    for renderable in status_renderables(gather_run(known_times, probe_processes=False, now=1300.0)):
        console.print(renderable)
    out = console.file.getvalue()  # type: ignore[attr-defined]
    assert "3/10 done; epoch 3 in progress" in out and "6/10 of epoch 3" in out, out
    assert "1m 00s (median of 3 clean measured epoch(s)" in out, out


BAD_RESULTS_CSV = {
    "binary": bytes(range(256)) * 8,
    "a field over the csv limit": b"epoch,x\n1,\"" + b"9" * 300_000 + b"\"\n",
    "NUL bytes": b"epoch,x\n1,\x002\n",
    "latin-1": b"epoch,x\n1,\xff\xfe\n",
}


@pytest.mark.parametrize("damage", BAD_RESULTS_CSV, ids=list(BAD_RESULTS_CSV))
def test_status_report_and_plan_refuse_a_results_csv_that_is_not_one_in_one_line(
    known_times: Path, damage: str
) -> None:
    csv_path = known_times / "results.csv"
    csv_path.write_bytes(BAD_RESULTS_CSV[damage])
    for args in (["status"], ["status", "--json"], ["plan"], ["report", "-o", str(known_times / "r.html")]):
        result = runner.invoke(app, [args[0], str(known_times), *args[1:]])
        assert_one_line_error(result, ExitCode.BAD_INPUT, str(csv_path))
    assert not (known_times / "r.html").exists()


def test_epoch_counts_past_any_real_run_are_not_trusted(known_times: Path) -> None:
    (known_times / "args.yaml").write_text("epochs: 99999999999999999999999999\n")
    (known_times / "results.csv").write_text("epoch,train/box_loss\n1e300,1\n99999999999999999999999,2\ninf,3\n1,4\n")
    status = json.loads(invoke("status", known_times, "--json").stdout)
    assert status["epochs_total"] is None
    invoke("report", known_times, "-o", known_times / "r.html")
    assert_one_line_error(runner.invoke(app, ["plan", str(known_times)]), ExitCode.BAD_INPUT, "pass --epochs N")
    result = runner.invoke(app, ["plan", str(known_times), "--epochs", "10000000"])
    assert result.exit_code == ExitCode.BAD_INPUT and "Traceback" not in result.output


SUPERVISOR_FILES: dict[str, Any] = {
    "nested past the decoder": "[" * 100_000 + "]" * 100_000,
    "over 1 MiB": '{"x": "' + "a" * (2 << 20) + '"}',
    "a FIFO": None,
}


@pytest.mark.parametrize("damage", SUPERVISOR_FILES, ids=list(SUPERVISOR_FILES))
def test_a_supervisor_file_that_is_not_one_is_reported_in_the_dashboard_without_blocking(
    known_times: Path, damage: str
) -> None:
    path = known_times / ".nanguard" / "supervisor.json"
    if SUPERVISOR_FILES[damage] is None:
        os.mkfifo(path)
    else:
        path.write_text(SUPERVISOR_FILES[damage])
    status = json.loads(invoke("status", known_times, "--json").stdout)
    assert "unreadable" in status["supervisor"]["error"]


def test_a_supervisor_file_with_fields_of_the_wrong_type_is_reported_not_a_traceback(known_times: Path) -> None:
    (known_times / ".nanguard" / "supervisor.json").write_text(json.dumps(
        {"state": "running", "command": 5, "resume_command": {"a": 1}, "log": [1, [2]], "pid": "x"}))
    assert "command is not a command line" in invoke("status", known_times).stdout
    status = json.loads(invoke("status", known_times, "--json").stdout)
    assert "resume_command is not a command line" in status["supervisor"]["error"]
