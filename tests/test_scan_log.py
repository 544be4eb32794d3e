"""Tests of nanguard.logscan and ``nanguard scan-log``: logs of real tiny YOLO runs against their journals, every
format on small hand-written logs in the shapes the frameworks print, chunking, the fast path, the CLI.

The two YOLO runs (one clean, one with NaN put into the input images of epoch 1, batch 1) train in subprocesses
with stdout and stderr redirected to a file, as users get logs (``yolo train ... > train.log 2>&1``).
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from nanguard.cli import app
from nanguard.errors import ExitCode
from nanguard.logscan import LogEvent, LogScanner, scan_file
from tests.cli_checks import assert_one_line_error, run_cli

runner = CliRunner()
HERE = Path(__file__).parent
NAN_AT = (1, 1)  # (epoch, batch), 0-based, whose input images the faulty run makes NaN
HEADER = "\n      Epoch    GPU_mem   box_loss   cls_loss   dfl_loss  Instances       Size\n"


def _frame(epoch: int, epochs: int, n: int, total: int, losses: tuple[str, ...], *, tqdm: bool = False) -> str:
    desc = "".join(f"{cell:>11}" for cell in (f"{epoch + 1}/{epochs}", "0G", *losses, 4, 32))
    if tqdm:  # Ultralytics 8.3.0-8.3.1xx: tqdm's "{l_bar}{bar:10}{r_bar}"
        return f"\r{desc}: {n * 100 // total}%|{'█' * (10 * n // total):<10}| {n}/{total} [00:01<00:00, 3.7it/s]"
    bar = "━" * (12 * n // total) + "─" * (12 - 12 * n // total)
    return f"\r\x1b[K{desc}: {n * 100 // total}% {bar} {n}/{total} 1.0s/it 0.9s<1.0s"


def _epoch(epoch: int, epochs: int, total: int, nan_from: int | None = None, **kwargs: bool) -> str:
    """One epoch as Ultralytics writes it with slow batches: the frame n/total after batch n, then the final one."""
    frames = []
    for n in range(total):
        losses = ("nan",) * 3 if nan_from is not None and n >= nan_from else ("0.7045", "0.7172", "0.419")
        frames.append(_frame(epoch, epochs, n, total, losses, **kwargs))
    frames.append(frames[-1].replace(f" {total - 1}/{total}", f" {total}/{total}"))
    return HEADER + "".join(frames) + "\n                   all          4          4          0          0\n"


def _synthetic_log() -> str:
    return ("Ultralytics 8.4.190 🚀 Python-3.11.7 CPU\nStarting training for 3 epochs...\n"
            + _epoch(0, 3, 6) + _epoch(1, 3, 6, nan_from=3)
            + "WARNING ⚠️ Loss NaN/Inf detected (attempt 1/3), recovering from last.pt...\n"
            + _epoch(2, 3, 6) + "3 epochs completed in 0.002 hours.\n")


def _feed_in_chunks(text: str, seed: int) -> tuple[list[LogEvent], LogScanner]:
    scanner, rng, events, i = LogScanner(), random.Random(seed), [], 0
    while i < len(text):
        size = rng.choice([1, 2, 3, 7, 64, 1000])
        events += scanner.feed(text[i:i + size])
        i += size
    return events + scanner.finish(), scanner


# ---------------------------------------------------------------------- real YOLO runs
@pytest.fixture(scope="module")
def yolo_logs(yolo_offline: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, Path]]:
    """{"clean": (log, save_dir), "nan": (log, save_dir)}: two 2-epoch runs trained at the same time, the clean
    one guarded, the NaN one with Ultralytics alone — the log scan-log exists for (a command nanguard cannot
    change); a guarded run's losses stay finite, since the guard leaves the skipped batch out of the mean."""
    from tests.conftest import make_yolo_dataset

    procs, out = [], {}
    env = {**os.environ, "YOLO_VERBOSE": "true"}  # yolo_offline quietens Ultralytics; a user's log is verbose
    for name, extra in (("clean", []), ("nan", ["--nan-at", ",".join(map(str, NAN_AT)), "--unguarded"])):
        root = tmp_path_factory.mktemp(f"scanlog_{name}")
        data = make_yolo_dataset(root / "data", size=32)  # own dataset: the runs write label caches beside it
        log = root / "train.log"
        with log.open("wb") as sink:
            procs.append(subprocess.Popen(
                [sys.executable, str(HERE / "logscan_train.py"), str(data), str(root), "--epochs", "2", *extra],
                stdout=sink, stderr=subprocess.STDOUT, env=env, cwd=root))
        out[name] = (log, root / "run")
    for proc in procs:
        assert proc.wait(timeout=300) == 0, [p.read_text()[-3000:] for p, _ in out.values()]
    return out


def test_scan_of_a_real_yolo_log_finds_the_nan_epoch_and_its_first_batch(
        yolo_logs: dict[str, tuple[Path, Path]]) -> None:
    """The unguarded NaN run's console log: the epoch with non-finite frames and its first NaN batch are exactly
    where the fault was put into the images, although Ultralytics' own recovery then re-ran that epoch."""
    log, _ = yolo_logs["nan"]
    result = scan_file(log)
    assert result.format == "ultralytics"
    assert result.loss_names == ["box_loss", "cls_loss", "dfl_loss"]
    assert {row.epoch: row.first_batch for row in result.incident_epochs() if row.nonfinite_frames} == {
        NAN_AT[0]: NAN_AT[1]}
    assert result.epochs_affected == [NAN_AT[0]]
    assert result.found
    assert result.position == {"epoch": 1, "epochs": 2, "batch": 1, "batches": 2, "step": None}


def test_clean_yolo_run_log_and_results_csv_have_no_incidents(yolo_logs: dict[str, tuple[Path, Path]]) -> None:
    from nanguard.journal import read_incidents

    log, save_dir = yolo_logs["clean"]
    assert read_incidents(save_dir) == []
    for path in (log, save_dir / "results.csv"):
        result = scan_file(path)
        assert not result.found, result.to_dict()
        assert result.position is not None and result.position["epoch"] == 1
    cli = runner.invoke(app, ["scan-log", str(log), str(save_dir / "results.csv")])
    assert cli.exit_code == 0, cli.output
    assert cli.stdout.count("no incidents") == 2


def test_real_results_csv_marks_the_nan_epoch(yolo_logs: dict[str, tuple[Path, Path]], tmp_path: Path) -> None:
    """A real run's results.csv (epoch column 1-based) with the NaN epoch's train losses written the way
    Ultralytics' ``save_metrics`` writes a NaN (``"%.6g" % nan``): the row is 0-based epoch 1. Ultralytics
    8.4.190 re-runs such an epoch instead of saving it and a guarded run keeps its losses finite, but older
    versions and runs whose recovery gave up keep the row, so the row is made here from the real file."""
    _, save_dir = yolo_logs["clean"]
    lines = (save_dir / "results.csv").read_text(encoding="utf-8").splitlines()
    header = lines[0].split(",")
    cells = lines[1 + NAN_AT[0]].split(",")
    for column in ("train/box_loss", "train/cls_loss", "train/dfl_loss"):
        cells[header.index(column)] = "%.6g" % float("nan")  # noqa: UP031 (save_metrics's own format)
    lines[1 + NAN_AT[0]] = ",".join(cells)
    csv = tmp_path / "results.csv"
    csv.write_text("\n".join(lines) + "\n", encoding="utf-8")
    result = scan_file(csv)
    assert result.format == "results-csv"
    assert result.epochs_affected == [NAN_AT[0]]
    assert "train/box_loss" in result.incident_epochs()[0].nonfinite_losses


def test_feeding_a_real_log_in_any_chunks_gives_the_same_events_and_result(
        yolo_logs: dict[str, tuple[Path, Path]]) -> None:
    text = yolo_logs["nan"][0].read_text(encoding="utf-8")
    whole = LogScanner()
    expected = [e.to_dict() for e in whole.feed(text) + whole.finish()]
    for seed in range(3):
        events, scanner = _feed_in_chunks(text, seed)
        assert [e.to_dict() for e in events] == expected
        assert scanner.result().to_dict() == {**scan_file(yolo_logs["nan"][0]).to_dict(), "source": "<stream>"}


# ---------------------------------------------------------------------- Ultralytics shapes
def test_chunking_invariance_on_a_synthetic_log_split_mid_ansi_and_mid_frame() -> None:
    text = _synthetic_log()
    whole = LogScanner()
    expected = [e.to_dict() for e in whole.feed(text) + whole.finish()]
    assert any("\x1b" not in e["text"] for e in expected)
    for seed in range(5):
        events, _ = _feed_in_chunks(text, seed)
        assert [e.to_dict() for e in events] == expected


def test_frames_give_0_based_epoch_and_the_batch_they_cover() -> None:
    """``2/3 ... 3/6`` drawn after batch 3 is epoch 1, batch 3; the final ``6/6`` covers batch 5."""
    scanner = LogScanner()
    events = [e for e in scanner.feed(_synthetic_log()) if e.kind == "progress"]
    nan = [e for e in events if e.nonfinite]
    assert (nan[0].epoch, nan[0].batch, nan[0].batches, nan[0].epochs) == (1, 3, 6, 3)
    assert nan[0].losses.keys() == {"box_loss", "cls_loss", "dfl_loss"}
    assert [e.batch for e in events if e.epoch == 0] == [0, 1, 2, 3, 4, 5, 5]
    result = scanner.result()
    assert [(r.epoch, r.first_batch, r.nonfinite_frames, r.recovery_lines) for r in result.incident_epochs()] == [
        (1, 3, 4, 1)]
    assert [r["detail"] for r in result.recoveries] == ["nan_recovery"]


def test_old_tqdm_bar_style_is_read(tmp_path: Path) -> None:
    text = HEADER + "".join(_frame(0, 2, n, 4, ("nan",) * 3 if n >= 2 else ("1.5", "2", "1.1"), tqdm=True)
                            for n in range(5)) + "\n"
    result = scan_file(_write(text, "old.log", tmp_path))
    assert [(r.epoch, r.first_batch, r.nonfinite_frames) for r in result.incident_epochs()] == [(0, 2, 3)]


@pytest.mark.parametrize("names", [
    ["box_loss", "cls_loss", "l1_loss"],  # YOLO26 detect in 8.4.190
    ["box_loss", "seg_loss", "cls_loss", "dfl_loss", "sem_loss"],  # segment, 8.4.190
    ["box_loss", "pose_loss", "kobj_loss", "cls_loss", "dfl_loss"],  # pose
    ["loss"],  # classify
])
def test_loss_names_come_from_the_header(names: list[str], tmp_path: Path) -> None:
    header = "\n" + "%11s" * (4 + len(names)) % ("Epoch", "GPU_mem", *names, "Instances", "Size") + "\n"
    values = ["0.5"] * (len(names) - 1) + ["inf"]
    result = scan_file(_write(header + _frame(0, 3, 1, 4, tuple(values)) + "\n", "task.log", tmp_path))
    assert result.loss_names == names
    assert result.incident_epochs()[0].nonfinite_losses == [names[-1]]


# ---------------------------------------------------------------------- other formats
def test_results_csv_nan_rows_and_repeated_epochs_last_row_wins(tmp_path: Path) -> None:
    """Epoch 2 was NaN, then re-run clean after a resume (last row wins); epoch 3 NaN; 8.3.0's padded columns."""
    head = "epoch,time,train/box_loss,train/cls_loss,metrics/mAP50(B),val/box_loss,lr/pg0\n"
    rows = ["1,0.4,0.39,0.53,0,0.27,0.0006\n", "2,0.9,nan,nan,0,nan,0.0006\n", "2,0.3,0.38,0.5,0,0.26,0.0006\n",
            "3,0.7,0.37,inf,0,0.25,0.0006\n"]
    path = tmp_path / "results.csv"
    path.write_text(head + "".join(rows))
    result = scan_file(path)
    assert result.epochs_affected == [2]
    assert result.incident_epochs()[0].nonfinite_losses == ["train/cls_loss"]
    padded = tmp_path / "old" / "results.csv"
    padded.parent.mkdir()
    padded.write_text("".join(",".join(f"{c:>23}" for c in line.strip().split(",")) + "\n"
                              for line in [head.replace("time,", "")] + [r.replace(",0.9,", ",").replace(",0.4,", ",")
                                                                        for r in rows[:2]]))
    assert scan_file(padded).epochs_affected == [1]


def test_hf_trainer_and_lightning_json_lines() -> None:
    """HF: NaN as Python's json writes it, fractional epochs (0.5 and 1.0 are epoch 0); the console's dict repr;
    Lightning: integer 0-based epoch and a step."""
    lines = [json.dumps({"loss": 0.9, "grad_norm": 1.2, "learning_rate": 5e-5, "epoch": 0.5, "step": 10}),
             json.dumps({"loss": float("nan"), "grad_norm": float("inf"), "epoch": 1.0, "step": 20}),
             "{'loss': nan, 'grad_norm': nan, 'learning_rate': 4e-05, 'epoch': 1.5}",
             json.dumps({"epoch": 3, "step": 400, "train_loss": float("nan"), "val_loss": 0.3})]
    scanner = LogScanner()
    events = scanner.feed("\n".join(lines) + "\n")
    assert [(e.kind, e.epoch, e.step) for e in events] == [
        ("metrics", 0, 10), ("nonfinite", 0, 20), ("nonfinite", 1, None), ("nonfinite", 3, 400)]
    result = scanner.result()
    assert result.format == "jsonl"
    assert [(r.epoch, r.first_step, r.nonfinite_losses) for r in result.incident_epochs()] == [
        (0, 20, ["loss", "grad_norm"]), (1, None, ["loss", "grad_norm"]), (3, 400, ["train_loss"])]
    assert result.position == {"epoch": 3, "epochs": None, "batch": None, "batches": None, "step": 400}


def test_hf_trainer_state_json_log_history(tmp_path: Path) -> None:
    path = tmp_path / "trainer_state.json"
    history = [{"loss": 1.0, "epoch": 0.5, "step": 5}, {"loss": float("nan"), "epoch": 2.0, "step": 40}]
    path.write_text(json.dumps({"global_step": 40, "log_history": history}, indent=2))
    assert [(r.epoch, r.first_step) for r in scan_file(path).incident_epochs()] == [(1, 40)]


def test_generic_lines_nan_words_and_a_user_pattern(tmp_path: Path) -> None:
    text = ("step=1 loss=0.52\nEpoch 3/10 step=7 loss=nan lr=0.1\nloss: -inf at iteration 9\n"
            "saved /runs/nan/model.pt\ninfo: nothing\nCUDA error: device-side assert\n")
    path = _write(text, "train.txt", tmp_path)
    result = scan_file(path)
    assert result.format == "generic"
    assert result.nonfinite_lines == 2
    assert [(r.epoch, r.first_step, r.nonfinite_losses) for r in result.incident_epochs()] == [
        (2, 7, ["loss"]), (None, 9, ["loss"])]
    with_pattern = scan_file(path, pattern=r"CUDA error")
    assert with_pattern.pattern_lines == 1 and with_pattern.nonfinite_lines == 2


def test_scan_file_fast_path_equals_feeding_every_piece(tmp_path: Path) -> None:
    """A 3 MB log (several NaN epochs, recovery lines, ANSI): scan_file's fast path reads few pieces and
    counts NaN redraws in bulk; the result is the one of feeding the whole file."""
    text = "".join(_epoch(e, 60, 300, nan_from=(e * 37) % 300 if e % 7 == 3 else None) for e in range(60))
    path = _write(text, "big.log", tmp_path)
    scanner = LogScanner(source=str(path))
    scanner.feed_bytes(path.read_bytes())
    scanner.finish()
    fast = scan_file(path)
    assert fast.to_dict() == scanner.result().to_dict()
    assert fast.epochs_affected == [3, 10, 17, 24, 31, 38, 45, 52, 59]
    assert fast.incident_epochs()[1].first_batch == (10 * 37) % 300


# ---------------------------------------------------------------------- the CLI
def test_json_output_shape(tmp_path: Path) -> None:
    path = _write(_synthetic_log(), "train.log", tmp_path)
    result = runner.invoke(app, ["scan-log", str(path), "--json"])
    assert result.exit_code == ExitCode.DIRTY, result.output
    [entry] = json.loads(result.stdout)
    assert entry["epoch_base"] == 0 and entry["format"] == "ultralytics" and entry["found"] is True
    assert entry["epochs_affected"] == [1]
    assert entry["incidents"][0]["first_batch"] == 3
    assert entry["incidents"][0]["nonfinite_losses"] == ["box_loss", "cls_loss", "dfl_loss"]
    assert entry["totals"] == {"incidents": 5, "nonfinite_frames": 4, "nonfinite_lines": 0, "recovery_lines": 1,
                               "pattern_lines": 0, "warning_lines": 0, "resumes": 0}
    assert entry["position"] == {"epoch": 2, "epochs": 3, "batch": 5, "batches": 6, "step": None}
    table = runner.invoke(app, ["scan-log", str(path)])
    assert table.exit_code == ExitCode.DIRTY and "0-based" in table.stdout and "nan_recovery" in table.stdout


@pytest.mark.parametrize("case", ["missing", "folder", "binary", "bad-pattern", "bad-format"])
def test_bad_input_is_a_one_line_error(tmp_path: Path, case: str) -> None:
    good = _write("loss=0.1\n", "ok.log", tmp_path)
    args, fragment = {
        "missing": ([str(tmp_path / "nope.log")], "nope.log"),
        "folder": ([str(tmp_path)], str(tmp_path)),
        "binary": ([str(_write_bytes(b"PK\x03\x04\x00\x00nan", tmp_path / "model.pt"))], "binary"),
        "bad-pattern": ([str(good), "--pattern", "(unclosed"], "(unclosed"),
        "bad-format": ([str(good), "--format", "xml"], "xml"),
    }[case]
    result = runner.invoke(app, ["scan-log", *args])
    if case == "bad-format":  # Typer's own usage error: exit 2, no traceback
        assert result.exit_code == ExitCode.BAD_INPUT and "Traceback" not in result.output
        return
    assert_one_line_error(result, ExitCode.BAD_INPUT, fragment)


def test_follow_prints_incidents_of_a_growing_file_and_survives_truncation(tmp_path: Path) -> None:
    """A thread writes a log while ``scan-log -f --idle-exit`` follows it; the NaN epoch is printed live once,
    a truncated-and-rewritten log is read from its start, and the command ends after the idle time, exit 1."""
    path = tmp_path / "live.log"
    path.write_text(HEADER)

    def write() -> None:
        with path.open("a") as out:
            for n in range(4):
                out.write(_frame(0, 2, n, 4, ("0.5", "0.5", "0.5")))
                out.flush()
                time.sleep(0.1)
            for n in range(4):
                out.write(_frame(1, 2, n, 4, ("nan",) * 3 if n >= 2 else ("0.4", "0.4", "0.4")))
                out.flush()
                time.sleep(0.1)
        time.sleep(0.5)
        path.write_text("step=3 loss=inf\n")  # truncated and rewritten, as by a restarted "> live.log"

    writer = threading.Thread(target=write)
    writer.start()
    start = time.monotonic()
    result = runner.invoke(app, ["scan-log", "-f", "--idle-exit", "1.5", str(path)])
    writer.join()
    assert result.exit_code == ExitCode.DIRTY, result.output
    assert time.monotonic() - start < 15
    live = [line for line in result.stdout.splitlines() if line.startswith(f"{path}: ")]
    assert live[0].startswith(f"{path}: epoch 1 batch 2: non-finite"), result.stdout
    assert any("step 3" in line for line in live), result.stdout
    assert len(live) == 2, result.stdout  # later NaN redraws of epoch 1 are not printed again


@pytest.mark.parametrize(("kind", "follow"), [("fifo", False), ("fifo", True), ("device", False),
                                            ("device", True), ("folder", True)])
def test_scan_log_refuses_what_is_not_a_regular_file_without_blocking(tmp_path: Path, kind: str,
                                                                      follow: bool) -> None:
    """A FIFO blocks in open() until a writer comes, /dev/zero never ends: both are refused in one line, exit 2,
    before anything is read (a block fails the test through run_cli's timeout instead of hanging it)."""
    if kind == "fifo":
        target = tmp_path / "train.log"
        os.mkfifo(target)
    else:
        target = Path("/dev/zero") if kind == "device" else tmp_path
    args = ["scan-log", *(["-f", "--idle-exit", "0.5"] if follow else []), str(target)]
    result = run_cli(args, timeout=30)
    named = {"fifo": "FIFO", "device": "device", "folder": "folder"}[kind]
    assert_one_line_error(result, ExitCode.BAD_INPUT, str(target), named)


LONG_LINE_RSS_MIB = 200  # a 100 MB line read whole would need more than that (bytes + text + copies)


@pytest.mark.parametrize(("size", "where"), [(32 << 10, "start"), (1 << 20, "start"), (1 << 20, "end"),
                                             (100 << 20, "end"), (100 << 20, "middle"), (100 << 20, "none")])
def test_one_long_line_costs_linear_time_and_bounded_memory(tmp_path: Path, size: int, where: str) -> None:
    """A line of ``size`` bytes with ``loss=nan`` at its start, middle or end (or nowhere) is scanned within a
    generous timeout (the quadratic reading took 27 s for 32 KB and never ended for 100 MB) in bounded memory,
    and the NaN is found wherever it is."""
    word = b" loss=nan "
    body = b"x" * size  # one word as long as the line: what made the key=value reading quadratic
    if where == "start":
        data = word + body
    elif where == "end":
        data = body + word
    elif where == "middle":
        data = body[: len(body) // 2] + word + body[len(body) // 2:]
    else:
        data = body
    path = _write_bytes(b"epoch 1/3 step=5\n" + data + b"\nall done\n", tmp_path / "long.log")
    result = run_cli(["scan-log", "--json", str(path)], timeout=60)
    assert result.exit_code == (ExitCode.OK if where == "none" else ExitCode.DIRTY), result.output
    entry = json.loads(result.stdout)[0]
    assert entry["bytes_scanned"] == path.stat().st_size
    if where != "none":
        assert entry["totals"]["nonfinite_lines"] == 1 and entry["incidents"][0]["nonfinite_losses"] == ["loss"]
    assert result.rss_mib < LONG_LINE_RSS_MIB, result.rss_mib


def test_long_lines_fed_in_small_chunks_and_followed_are_linear_and_found(tmp_path: Path) -> None:
    """The incremental reader (``nanguard run``, ``scan-log -f``) gets a long line in many small pieces: it keeps
    a bounded part of it, finds the NaN at its end, and takes no quadratic time gluing the pieces."""
    code = ("import sys, time\n"
            "from nanguard.logscan import LogScanner\n"
            "scanner, piece = LogScanner(), 'x' * 4095 + ' '\n"
            "for _ in range(4096): scanner.feed(piece)\n"
            "scanner.feed(' loss=nan\\n')\n"
            "print(scanner.result().nonfinite_lines)\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False)
    assert done.stdout.strip() == "1", done.stdout + done.stderr
    path = tmp_path / "live.log"
    path.write_bytes(b"loss=0.5\n")

    def write() -> None:
        with path.open("ab") as out:  # over ~3 s: most of it arrives while the command polls
            for _ in range(64):
                out.write(b"y" * (256 << 10))
                out.flush()
                time.sleep(0.05)
            out.write(b" loss=inf\n")

    writer = threading.Thread(target=write)
    writer.start()
    result = run_cli(["scan-log", "-f", "--idle-exit", "3", str(path)], timeout=60)
    writer.join()
    assert result.exit_code == ExitCode.DIRTY, result.output
    assert "1 incidents in epochs -: 0 non-finite frames, 1 non-finite lines" in result.stdout, result.stdout
    assert result.rss_mib < LONG_LINE_RSS_MIB, result.rss_mib


def test_logscan_imports_no_torch() -> None:
    code = "import sys, nanguard.logscan, nanguard.cli.log_commands; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0


def _write(text: str, name: str, folder: Path) -> Path:
    path = folder / name
    path.write_text(text, encoding="utf-8")
    return path


def _write_bytes(data: bytes, path: Path) -> Path:
    path.write_bytes(data)
    return path


def test_a_results_csv_epoch_of_inf_or_1e300_is_an_unreadable_row_not_a_traceback(tmp_path: Path) -> None:
    path = tmp_path / "results.csv"
    path.write_text("epoch,x\n1e300,1\n99999999999999999999999,2\ninf,3\n-5,4\n")
    result = runner.invoke(app, ["scan-log", str(path), "--json"])
    assert result.exit_code == ExitCode.OK, result.output
