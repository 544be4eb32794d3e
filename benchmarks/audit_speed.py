"""Speed of ``nanguard.ckpt.audit`` against ``torch.load`` and two pickle scanners.

Run (from the repository root)::

    .venv/bin/python benchmarks/audit_speed.py                       # sizes 10,200,1000 MB, 5 repeats
    .venv/bin/python benchmarks/audit_speed.py --sizes 10,200 --repeats 3 --json
    .venv/bin/python benchmarks/audit_speed.py --cli-repeats 5 --no-yolo

Everything is written to a temporary folder that is deleted at the end. Three parts:

* **plain checkpoints** of the given sizes (MB = 10^6 bytes): ``{"model": ..., "optimizer": ..., "epoch": 1}``
  with four large fp32 weights, their biases and AdamW moments (``exp_avg``, ``exp_avg_sq``, ``step``). Each
  file is read once to warm the page cache, then every repeat runs, in an order rotated by one each repeat:

  - ``audit``        -- ``nanguard.ckpt.audit(path)``: inert read + NaN/Inf/scrub checks of every value;
  - ``load``         -- ``torch.load(path, weights_only=False, mmap=True)``; with ``mmap`` it maps the file
    and touches no tensor data, so ``audit / load`` compares a full check with doing almost nothing;
  - ``load+isfinite`` -- the same load, then ``torch.isfinite(t).all()`` over every tensor: the honest
    like-for-like the brief names (a check that reads every value). ``audit / load+isfinite`` is that ratio;
  - ``load+aminmax`` -- the same load, then one ``torch.aminmax(t)`` per tensor: the fastest plain-torch check
    that reads every value (NaN propagates into min/max, as audit itself uses), a stricter baseline than
    ``isfinite``, which materialises a bool tensor per tensor.

* **a YOLO checkpoint** in the layout of Ultralytics' ``BaseTrainer.save_model`` (``yolo11n.yaml``
  ``DetectionModel``, fp16 EMA, fp16 AdamW state after one step, ``train_args`` ...), built offline without
  training. The same three in-process timings, plus whole subprocess calls: ``nanguard audit FILE`` (or, when
  the CLI has no ``audit`` command yet, ``python -c "from nanguard.ckpt import audit; audit(FILE)"``, labelled
  as such), ``python -c "torch.load(FILE, weights_only=False, mmap=True)"`` and ``python -c "import torch"``.

* **an unsafe fixture** (a torch zip whose pickle calls ``os.system`` on load, as in
  ``tests/ckpt/test_safety.py``), checked by nanguard, picklescan and fickling through their Python APIs and
  CLIs: whether each flags it and its median time. Each tool also judges two clean controls (the smallest
  plain checkpoint and the YOLO one) once, to show false positives. The fixture is never unpickled with real
  classes; the script checks that its marker file was never created.

Goals: audit time <= 1.5x the load time; >= 1 GB/s audit throughput from the page cache on the 1 GB file;
the whole CLI call on a YOLO checkpoint <= 1.5 s. In-process times are medians over ``--repeats``
(files under 100 MB get one untimed round first); subprocess times are medians over ``--cli-repeats``
(default 3, since every call pays an interpreter start and ``import torch``). The script exits 1 if the
unsafe fixture's marker file appeared.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import functools
import gc
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from nanguard.ckpt import Status, audit

GOAL_RATIO = 1.5
GOAL_GBPS = 1.0
GOAL_GBPS_SIZE_MB = 1000
GOAL_CLI_S = 1.5
MB = 1_000_000
_PY = sys.executable
_BIN = Path(sys.executable).parent


# ---------------------------------------------------------------------------------------------- fixtures
def make_plain(path: Path, size_mb: int) -> Path:
    """A model + AdamW checkpoint of about ``size_mb`` MB: 4 big fp32 weights, each with two moments."""
    gen = torch.Generator().manual_seed(0)
    cols, n_weights = 1024, 4
    floats = size_mb * MB // 4
    rows = max(1, floats // (3 * n_weights * cols))  # weights + exp_avg + exp_avg_sq
    model: dict[str, torch.Tensor] = {}
    state: dict[int, dict[str, torch.Tensor]] = {}
    for i in range(n_weights):
        model[f"layers.{i}.weight"] = torch.empty(rows, cols).uniform_(-0.05, 0.05, generator=gen)
        model[f"layers.{i}.bias"] = torch.zeros(rows)
    for j, param in enumerate(model.values()):
        state[j] = {
            "step": torch.tensor(1.0),
            "exp_avg": torch.empty_like(param).uniform_(-1e-3, 1e-3, generator=gen),
            "exp_avg_sq": torch.empty_like(param).uniform_(0.0, 1e-6, generator=gen),
        }
    group = {"lr": 1e-3, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.01, "amsgrad": False,
             "params": list(range(len(model)))}
    torch.save({"model": model, "optimizer": {"state": state, "param_groups": [group]}, "epoch": 1}, path)
    del model, state
    gc.collect()
    return path


def setup_yolo_offline(folder: Path) -> None:
    """Offline Ultralytics with a private config folder and a local font; call before importing it."""
    import matplotlib

    font = Path(matplotlib.__file__).parent / "mpl-data" / "fonts" / "ttf" / "DejaVuSans.ttf"
    for sub in (folder, folder / "Ultralytics"):
        sub.mkdir(parents=True, exist_ok=True)
        shutil.copy(font, sub / "Arial.ttf")
    os.environ.update({
        "YOLO_OFFLINE": "1", "YOLO_CONFIG_DIR": str(folder), "YOLO_VERBOSE": "false",
        "YOLO_AUTOINSTALL": "false", "ULTRALYTICS_SKIP_REQUIREMENTS_CHECKS": "1",
    })


def make_yolo(path: Path) -> Path:
    """A checkpoint in the layout of Ultralytics' ``BaseTrainer.save_model`` (8.4), built without training."""
    from ultralytics import __version__
    from ultralytics.cfg import get_cfg
    from ultralytics.nn.tasks import DetectionModel
    from ultralytics.utils.torch_utils import convert_optimizer_state_dict_to_fp16

    torch.manual_seed(0)
    args = get_cfg()
    model = DetectionModel("yolo11n.yaml", nc=80, verbose=False)
    model.args = args  # type: ignore[assignment]  # as BaseTrainer.set_model_attributes does
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for param in model.parameters():  # one real AdamW step, from made-up gradients
        param.grad = torch.randn_like(param) * 1e-3
    optimizer.step()
    optimizer.zero_grad()
    ema = copy.deepcopy(model).half()
    metrics = {"metrics/precision(B)": 0.1, "metrics/recall(B)": 0.1, "metrics/mAP50(B)": 0.1,
               "metrics/mAP50-95(B)": 0.05, "val/box_loss": 1.5, "val/cls_loss": 3.0, "val/dfl_loss": 1.2}
    ckpt = {
        "epoch": 0, "best_fitness": 0.1, "stopper": {"best_fitness": 0.1, "best_epoch": 0},
        "model": None, "ema": ema, "updates": 1, "modelopt": None,
        "optimizer": convert_optimizer_state_dict_to_fp16(copy.deepcopy(optimizer.state_dict())),
        "scaler": {}, "train_args": vars(args), "train_metrics": {**metrics, "fitness": 0.1},
        "train_results": {}, "date": datetime.datetime.now().astimezone().isoformat(), "version": __version__,
        "license": "AGPL-3.0 (https://ultralytics.com/license)", "docs": "https://docs.ultralytics.com",
    }
    torch.save(ckpt, path)
    return path


class _ShellCommand:
    """Unpickling this would run a shell command that creates ``marker``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.system, (f"touch {self.marker}",))


def make_unsafe(path: Path, marker: Path) -> Path:
    """The fixture of ``tests/ckpt/test_safety.py``: a torch zip whose pickle calls ``os.system``."""
    torch.save({"model": {"w": torch.ones(3)}, "payload": _ShellCommand(marker)}, path)
    return path


def warm(path: Path) -> None:
    """Read the file once so that every timing reads from the page cache."""
    with path.open("rb") as f:
        while f.read(16 * 2**20):
            pass


# ---------------------------------------------------------------------------------------------- timing
def _tensors(obj: Any) -> Iterator[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, torch.nn.Module):
        yield from obj.state_dict().values()
    elif isinstance(obj, dict):
        for value in obj.values():
            yield from _tensors(value)
    elif isinstance(obj, list | tuple):
        for value in obj:
            yield from _tensors(value)


def do_audit(path: Path) -> None:
    audit(path)


def do_load(path: Path) -> None:
    torch.load(path, weights_only=False, mmap=True)


def do_load_isfinite(path: Path) -> None:
    obj = torch.load(path, weights_only=False, mmap=True)
    for t in _tensors(obj):
        if t.is_floating_point():
            bool(torch.isfinite(t).all())


def do_load_aminmax(path: Path) -> None:
    obj = torch.load(path, weights_only=False, mmap=True)
    for t in _tensors(obj):
        if t.is_floating_point() and t.numel():
            torch.aminmax(t)


def time_interleaved(variants: dict[str, Callable[[], Any]], repeats: int, warmup: bool) -> dict[str, float]:
    """Median seconds of each variant, the order rotated by one per repeat; ``warmup``: one untimed round first."""
    names = list(variants)
    for name in names if warmup else ():
        variants[name]()
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(repeats):
        for name in names[r % len(names):] + names[: r % len(names)]:
            gc.collect()
            start = time.perf_counter()
            variants[name]()
            times[name].append(time.perf_counter() - start)
    return {name: float(np.median(ts)) for name, ts in times.items()}


def run_cmd(cmd: list[str]) -> tuple[int, float, str]:
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    return proc.returncode, time.perf_counter() - start, (proc.stdout + proc.stderr).strip()


def time_cmd(cmd: list[str], repeats: int) -> tuple[int, float, float]:
    """Return code, the first (coldest) call's seconds, and the median of ``repeats`` further calls."""
    rc, first, _ = run_cmd(cmd)
    return rc, first, float(np.median([run_cmd(cmd)[1] for _ in range(repeats)]))


def time_call(fn: Callable[[], Any], repeats: int, warmup: bool) -> tuple[Any, float]:
    """The result of the first call and the median seconds of ``repeats`` timed calls (after an untimed one)."""
    result = fn() if warmup else None
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - start)
        result = out if result is None else result
    return result, float(np.median(times))


def cli_has_audit() -> bool:
    exe = _BIN / "nanguard"
    return exe.exists() and run_cmd([str(exe), "audit", "--help"])[0] == 0


def nanguard_cli(path: Path, has_cli: bool) -> tuple[list[str], str]:
    if has_cli:
        return [str(_BIN / "nanguard"), "audit", str(path)], "nanguard audit FILE"
    code = ("import sys; from nanguard.ckpt import audit; v = audit(sys.argv[1]); print(v.status.value); "
            "sys.exit({'clean': 0, 'dirty': 1, 'unreadable': 2, 'unsafe': 3}[v.status.value])")
    return [_PY, "-c", code, str(path)], 'python -c "audit(FILE)" (no `nanguard audit` command yet)'


# ---------------------------------------------------------------------------------------------- parts
def bench_file(path: Path, repeats: int) -> dict[str, Any]:
    """In-process timings of one file; files under 100 MB get an untimed round first (imports, first calls)."""
    warm(path)
    verdict = audit(path)
    size = path.stat().st_size
    t = time_interleaved({"audit": lambda: do_audit(path), "load": lambda: do_load(path),
                          "load+isfinite": lambda: do_load_isfinite(path),
                          "load+aminmax": lambda: do_load_aminmax(path)}, repeats, warmup=size < 100 * MB)
    return {
        "bytes": size, "status": verdict.status.value, "format": verdict.format.value if verdict.format else None,
        "audit_s": t["audit"], "load_s": t["load"], "load_isfinite_s": t["load+isfinite"],
        "load_aminmax_s": t["load+aminmax"], "ratio_vs_load": t["audit"] / t["load"],
        "ratio_vs_load_isfinite": t["audit"] / t["load+isfinite"],
        "ratio_vs_load_aminmax": t["audit"] / t["load+aminmax"],
        "audit_gbps": size / t["audit"] / 1e9, "load_isfinite_gbps": size / t["load+isfinite"] / 1e9,
    }


def bench_yolo_cli(path: Path, repeats: int, has_cli: bool) -> dict[str, Any]:
    """Whole subprocess calls: interpreter start, imports, the check; one untimed call, then ``repeats``."""
    cmd, label = nanguard_cli(path, has_cli)
    load_code = "import sys, torch; torch.load(sys.argv[1], weights_only=False, mmap=True)"
    rows: dict[str, Any] = {}
    for name, c in ((label, cmd), ('python -c "torch.load(FILE, weights_only=False, mmap=True)"',
                                   [_PY, "-c", load_code, str(path)]),
                    ('python -c "import torch" (floor)', [_PY, "-c", "import torch"])):
        rc, first, median = time_cmd(c, repeats)
        rows[name] = {"rc": rc, "first_s": first, "median_s": median}
    return {"nanguard_label": label, "uses_cli": has_cli, "calls": rows}


def _flag_picklescan_api(path: Path) -> tuple[bool | None, str]:
    from picklescan.scanner import scan_file_path

    result = scan_file_path(str(path))
    bad = sorted({f"{g.module}.{g.name}" for g in result.globals if g.safety.name == "Dangerous"})
    if result.scan_err:
        return None, "scan error"
    return result.infected_files > 0, ", ".join(bad) or f"{result.issues_count} issues"


def _flag_fickling_api(path: Path) -> tuple[bool | None, str]:
    import fickling
    from fickling.analysis import Severity

    results = fickling.scan_zip_archive(str(path), graceful=True)
    if not results:
        return None, "no pickle found"
    worst = max((r.severity for r in results.values()), key=lambda s: s.value[0])
    return worst != Severity.LIKELY_SAFE, worst.name


def _flag_nanguard_api(path: Path) -> tuple[bool | None, str]:
    verdict = audit(path)
    if verdict.status is Status.UNREADABLE:
        return None, "unreadable"
    return verdict.status is Status.UNSAFE, ", ".join(verdict.unsafe_globals) or verdict.status.value


def _cli_flag(rc: int, unsafe_rc: int, error_rcs: tuple[int, ...], out: str) -> tuple[bool | None, str]:
    if rc == unsafe_rc:
        return True, f"rc {rc}"
    if rc in error_rcs:
        return None, f"rc {rc}: {out.splitlines()[0][:60] if out else 'error'}"
    return False, f"rc {rc}"


def bench_scanners(unsafe: Path, controls: dict[str, Path], repeats: int, cli_repeats: int, has_cli: bool
                   ) -> list[dict[str, Any]]:
    """Each tool on the unsafe fixture (timed) and on the clean controls (once).

    Python APIs: one untimed call (imports), then ``repeats``. CLIs: ``cli_repeats`` calls, none untimed.
    """
    ng_label = "nanguard audit FILE" if has_cli else 'python -c "audit(FILE)" (no CLI command yet)'

    def cli(build: Callable[[Path], list[str]], unsafe_rc: int, error_rcs: tuple[int, ...]
            ) -> Callable[[Path], tuple[bool | None, str]]:
        def check(path: Path) -> tuple[bool | None, str]:
            rc, _, out = run_cmd(build(path))
            return _cli_flag(rc, unsafe_rc, error_rcs, out)
        return check

    tools: list[tuple[str, str, Callable[[Path], tuple[bool | None, str]], bool]] = [
        ("nanguard", "audit(path)", _flag_nanguard_api, True),
        ("nanguard", ng_label, cli(lambda p: nanguard_cli(p, has_cli)[0], 3, (2,)), False),
        ("picklescan", "scan_file_path(path)", _flag_picklescan_api, True),
        ("picklescan", "picklescan --path FILE",
         cli(lambda p: [str(_BIN / "picklescan"), "--path", str(p)], 1, (2,)), False),
        ("fickling", "scan_zip_archive(path)", _flag_fickling_api, True),
        ("fickling", "fickling --check-safety FILE",
         cli(lambda p: [str(_BIN / "fickling"), "--check-safety", str(p)], 1, (2,)), False),
    ]
    rows = []
    for tool, how, check, is_api in tools:
        (flagged, detail), median = time_call(functools.partial(check, unsafe),
                                              repeats if is_api else cli_repeats, warmup=is_api)
        row: dict[str, Any] = {"tool": tool, "interface": how, "flags_unsafe": flagged, "detail": detail,
                               "median_s": median}
        for name, path in controls.items():
            row[f"control_{name}"] = dict(zip(("flagged", "detail"), check(path), strict=True))
        rows.append(row)
    return rows


# ---------------------------------------------------------------------------------------------- report
def _yes(flag: bool | None) -> str:
    return "error" if flag is None else "FLAGGED" if flag else "no"


def goal_lines(results: dict[str, Any]) -> list[str]:
    lines = []
    for label, row in results["plain"].items():
        for key, what in (("ratio_vs_load_isfinite", "load+isfinite (like-for-like)"),
                          ("ratio_vs_load_aminmax", "load+aminmax (fastest read-all)"),
                          ("ratio_vs_load", "load alone (mmap, reads no data)")):
            ok = "MET" if row[key] <= GOAL_RATIO else "MISSED"
            lines.append(f"goal: audit <= {GOAL_RATIO}x {what} on {label}: {row[key]:.2f}x -> {ok}")
    if "yolo" in results:
        row = results["yolo"]["file"]
        for key, what in (("ratio_vs_load_isfinite", "load+isfinite"), ("ratio_vs_load_aminmax", "load+aminmax"),
                          ("ratio_vs_load", "load alone")):
            ok = "MET" if row[key] <= GOAL_RATIO else "MISSED"
            lines.append(f"goal: audit <= {GOAL_RATIO}x {what} on the YOLO checkpoint: {row[key]:.2f}x -> {ok}")
    big = results["plain"].get(f"{GOAL_GBPS_SIZE_MB} MB")
    if big is not None:
        ok = "MET" if big["audit_gbps"] >= GOAL_GBPS else "MISSED"
        lines.append(f"goal: audit >= {GOAL_GBPS} GB/s on the {GOAL_GBPS_SIZE_MB} MB file (page cache): "
                     f"{big['audit_gbps']:.2f} GB/s -> {ok}")
    else:
        lines.append(f"goal: >= {GOAL_GBPS} GB/s on the {GOAL_GBPS_SIZE_MB} MB file: not measured (add it to --sizes)")
    if "yolo" in results:
        cli = results["yolo"]["cli"]
        call = cli["calls"][cli["nanguard_label"]]
        ok = "MET" if call["median_s"] <= GOAL_CLI_S else "MISSED"
        lines.append(f"goal: whole CLI call on a YOLO checkpoint <= {GOAL_CLI_S} s: {call['median_s']:.2f} s "
                     f"median (first call {call['first_s']:.2f} s) -> {ok}"
                     + ("" if cli["uses_cli"] else "  [timed `python -c audit(FILE)`: no `nanguard audit` yet]"))
    return lines


def print_report(results: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    if not console.is_terminal:
        console = Console(width=175)
    meta = results["meta"]
    table = Table(title=f"audit vs torch.load(weights_only=False, mmap=True): median of {meta['repeats']} "
                        f"interleaved repeats, warm page cache, torch {meta['torch']}, "
                        f"{meta['threads']} threads, {meta['cpus']} cpus, 1-min load average "
                        f"{meta['loadavg_1min'][0]} at start / {meta['loadavg_1min'][1]} at end", title_justify="left")
    for col in ("checkpoint", "MB", "status", "audit ms", "load ms", "load+isfinite ms", "load+aminmax ms",
                "audit/load", "audit/(load+isfinite)", "audit/(load+aminmax)", "audit GB/s", "load+isfinite GB/s"):
        table.add_column(col, justify="left" if col in ("checkpoint", "status") else "right")
    files = dict(results["plain"])
    if "yolo" in results:
        files["YOLO (yolo11n, ultralytics layout)"] = results["yolo"]["file"]
    for label, row in files.items():
        table.add_row(label, f"{row['bytes'] / MB:.1f}", row["status"], f"{row['audit_s'] * 1e3:.1f}",
                      f"{row['load_s'] * 1e3:.1f}", f"{row['load_isfinite_s'] * 1e3:.1f}",
                      f"{row['load_aminmax_s'] * 1e3:.1f}", f"{row['ratio_vs_load']:.2f}",
                      f"{row['ratio_vs_load_isfinite']:.2f}", f"{row['ratio_vs_load_aminmax']:.2f}",
                      f"{row['audit_gbps']:.2f}", f"{row['load_isfinite_gbps']:.2f}")
    console.print(table)
    console.print("  audit/load: against torch.load(mmap=True) alone, which maps the file and reads no tensor "
                  "data.\n  audit/(load+isfinite): against that load plus torch.isfinite(t).all() on every "
                  "tensor -- the like-for-like check that reads every value.\n"
                  "  audit/(load+aminmax): against that load plus one torch.aminmax(t) per tensor -- the fastest "
                  "plain-torch check that reads every value.")

    if "yolo" in results:
        cli = results["yolo"]["cli"]
        table = Table(title=f"whole subprocess calls on the YOLO checkpoint (median of {meta['cli_repeats']} calls "
                            f"after one untimed; first = that untimed call)", title_justify="left")
        for col in ("command", "rc", "first s", "median s"):
            table.add_column(col, justify="left" if col == "command" else "right")
        for name, row in cli["calls"].items():
            table.add_row(name, str(row["rc"]), f"{row['first_s']:.2f}", f"{row['median_s']:.2f}")
        console.print(table)

    table = Table(title=f"unsafe fixture (torch zip, pickle calls os.system): does each tool flag it, and how fast "
                        f"(API: median of {meta['repeats']} after one untimed; CLI: median of {meta['cli_repeats']} "
                        f"calls); clean controls judged once", title_justify="left")
    controls = [k.removeprefix("control_") for k in results["scanners"][0] if k.startswith("control_")]
    for col in ("tool", "interface", "unsafe fixture", "detail", "median ms", *[f"clean {c}" for c in controls]):
        table.add_column(col, justify="right" if col == "median ms" else "left", overflow="fold")
    for row in results["scanners"]:
        table.add_row(row["tool"], row["interface"], _yes(row["flags_unsafe"]), row["detail"],
                      f"{row['median_s'] * 1e3:.1f}",
                      *[f"{_yes(row[f'control_{c}']['flagged'])} ({row[f'control_{c}']['detail']})"
                        for c in controls])
    console.print(table)
    console.print(f"  marker file created by the unsafe fixture: {results['meta']['marker_created']}")
    for line in goal_lines(results):
        console.print(line)
    console.print(f"  peak RSS of this process: {meta['peak_rss_mb']:.0f} MB; total {meta['seconds']} s")


# ---------------------------------------------------------------------------------------------- main
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--sizes", default="10,200,1000", help="plain checkpoint sizes in MB (default 10,200,1000)")
    parser.add_argument("--repeats", type=int, default=5, help="timed repeats per measurement (default 5)")
    parser.add_argument("--cli-repeats", type=int, default=3,
                        help="timed subprocess calls per command (default 3: each costs an interpreter start and "
                             "`import torch`)")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch.set_num_threads for the in-process timings (default 0: torch's default, what "
                             "the CLI gets; 1 gives steadier numbers on a busy machine)")
    parser.add_argument("--no-yolo", action="store_true", help="skip the YOLO checkpoint (no ultralytics import)")
    parser.add_argument("--json", action="store_true", help="print the results as JSON instead of tables")
    args = parser.parse_args(argv)
    try:
        args.sizes = [int(s) for s in args.sizes.split(",") if s.strip()]
    except ValueError:
        parser.error("--sizes must be comma-separated integers (MB)")
    if not args.sizes or min(args.sizes) < 1 or args.repeats < 1 or args.cli_repeats < 1 or args.threads < 0:
        parser.error("--sizes must be >= 1 MB, --repeats and --cli-repeats >= 1, --threads >= 0")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    load_before = os.getloadavg()[0]
    started = time.perf_counter()
    has_cli = cli_has_audit()
    results: dict[str, Any] = {"plain": {}}
    with tempfile.TemporaryDirectory(prefix="nanguard-audit-bench-") as tmp_name:
        tmp = Path(tmp_name)
        controls: dict[str, Path] = {}
        for size in sorted(args.sizes):
            t = time.perf_counter()
            path = make_plain(tmp / f"plain_{size}mb.pt", size)
            results["plain"][f"{size} MB"] = bench_file(path, args.repeats)
            if not controls:
                controls[f"plain {size} MB"] = path
            print(f"  plain {size} MB: {time.perf_counter() - t:.0f} s", file=sys.stderr)
        if not args.no_yolo:
            t = time.perf_counter()
            setup_yolo_offline(tmp / "yolo_config")
            yolo = make_yolo(tmp / "yolo_last.pt")
            results["yolo"] = {"file": bench_file(yolo, args.repeats),
                               "cli": bench_yolo_cli(yolo, args.cli_repeats, has_cli)}
            controls["YOLO"] = yolo
            print(f"  yolo: {time.perf_counter() - t:.0f} s", file=sys.stderr)
        t = time.perf_counter()
        marker = tmp / "pwned"
        unsafe = make_unsafe(tmp / "evil.pt", marker)
        results["scanners"] = bench_scanners(unsafe, controls, args.repeats, args.cli_repeats, has_cli)
        marker_created = marker.exists()
        print(f"  scanners: {time.perf_counter() - t:.0f} s", file=sys.stderr)
    results["meta"] = {
        "torch": torch.__version__, "threads": torch.get_num_threads(), "cpus": os.cpu_count(),
        "repeats": args.repeats, "cli_repeats": args.cli_repeats, "sizes_mb": args.sizes,
        "nanguard_cli_has_audit": has_cli,
        "loadavg_1min": [round(load_before, 2), round(os.getloadavg()[0], 2)],
        "marker_created": marker_created, "seconds": round(time.perf_counter() - started, 1),
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "goals": {"ratio": GOAL_RATIO, "gbps": GOAL_GBPS, "cli_s": GOAL_CLI_S},
    }
    if args.json:
        json.dump(results, sys.stdout, indent=2, default=str)
        print()
    else:
        print_report(results)
    return 1 if marker_created else 0


if __name__ == "__main__":
    raise SystemExit(main())
