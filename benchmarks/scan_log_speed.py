"""Speed of ``nanguard scan-log`` / :func:`nanguard.logscan.scan_file` against ``grep -c nan`` on a large log.

Run (from the repository root)::

    .venv/bin/python benchmarks/scan_log_speed.py              # 400 MB log, 3 repeats
    .venv/bin/python benchmarks/scan_log_speed.py --mb 1000 --repeats 5 --json

It writes a realistic Ultralytics console log to a temporary folder (deleted at the end): per epoch the column
header, one progress frame per batch redrawn with ``\\r\\x1b[K`` and the custom bar (``━━━──``), the
validation bar and its ``all`` line, as Ultralytics 8.4 writes them to a file; every 37th epoch turns NaN
from some batch on (losses are running means, so every later frame of that epoch shows ``nan``) and is
followed by Ultralytics' recovery warning; one epoch shows ``inf``. The file is read once to warm the page
cache, then each repeat times, in an order rotated by one each repeat:

- ``grep``      -- ``grep -c nan FILE`` (counts matching lines; a whole epoch of redraws is one line to grep);
- ``scan_file`` -- :func:`nanguard.logscan.scan_file` in this process;
- ``cli``       -- the whole ``nanguard scan-log FILE --json`` command (interpreter start included).

It prints MB/s (MB = 10^6 bytes) of each as the median over the repeats, and ``scan_file / grep`` and
``cli / grep`` as ratios of those speeds. The goal is ``scan_file`` >= 200 MB/s. It checks that the scan
found exactly the NaN/Inf epochs it wrote (exits 1 if not).
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from nanguard.logscan import scan_file

NAN_EVERY = 37  # every 37th epoch goes NaN
BATCHES = 4000  # batches per epoch, one frame each (batches slower than Ultralytics' 0.1 s redraw interval)


def _frame(epoch: int, epochs: int, i: int, batches: int, losses: tuple[float, ...], instances: int) -> str:
    desc = ("%11s" * 2 + "%11.4g" * (2 + len(losses))) % (f"{epoch + 1}/{epochs}", "7.31G", *losses, instances, 640)
    done = i * 12 // batches
    bar = "━" * done + "─" * (12 - done)
    return f"\r\x1b[K{desc}: {i * 100 // batches}% {bar} {i}/{batches} 4.2it/s 2:13<5:31"


def write_log(path: Path, target_mb: float) -> tuple[int, dict[int, int]]:
    """Write the log; returns (epochs written, {0-based NaN/Inf epoch: first batch})."""
    target = int(target_mb * 1e6)
    header = "\n" + ("%11s" * 7) % ("Epoch", "GPU_mem", "box_loss", "cls_loss", "dfl_loss", "Instances", "Size") + "\n"
    epochs = max(2, math.ceil(target / (BATCHES * 150)))
    expected: dict[int, int] = {}
    written = 0
    with path.open("w", encoding="utf-8") as out:
        for epoch in range(epochs):
            bad = epoch % NAN_EVERY == NAN_EVERY - 1 or epoch == epochs // 2
            first_bad = (epoch * 7919) % BATCHES if bad else BATCHES
            if bad:
                expected[epoch] = first_bad
            value = "inf" if epoch == epochs // 2 else "nan"
            frames = []
            box, cls, dfl = 1.2 / (1 + epoch * 0.01), 0.9 / (1 + epoch * 0.02), 1.1 / (1 + epoch * 0.005)
            for i in range(BATCHES):
                step = 1 - i * 1e-5
                losses = (float(value),) * 3 if i >= first_bad else (box * step, cls * step, dfl * step)
                frames.append(_frame(epoch, epochs, i, BATCHES, losses, 40 + (i * 13) % 50))
            frames.append(_frame(epoch, epochs, BATCHES, BATCHES, losses, 41))
            val = [f"\r\x1b[K{'Class':>22}{'Images':>11}{'Instances':>11}{'Box(P':>11}{'R':>11}{'mAP50':>11}"
                   f"{'mAP50-95)':>11}: {k * 100 // 40}% {'━' * (k * 12 // 40)}{'─' * (12 - k * 12 // 40)} {k}/40 "
                   f"9.1it/s 4.4s<0.1s" for k in range(41)]
            text = (header + "".join(frames) + "\n" + "".join(val)
                    + f"\n{'all':>22}{5000:>11}{36335:>11}{0.61:>11.3g}{0.52:>11.3g}{0.55:>11.3g}{0.38:>11.3g}\n")
            if bad and value == "nan":
                text += "WARNING ⚠️ Loss NaN/Inf detected (attempt 1/3), recovering from last.pt...\n"
            out.write(text)
            written += len(text.encode())
            if written >= target:
                return epoch + 1, expected
    return epochs, expected


def _time(fn: object) -> float:
    start = time.perf_counter()
    fn()  # type: ignore[operator]
    return time.perf_counter() - start


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mb", type=float, default=400, help="log size in MB (default 400)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs of each (default 3; medians)")
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    args = parser.parse_args()
    nanguard = shutil.which("nanguard", path=str(Path(sys.executable).parent)) or "nanguard"
    with tempfile.TemporaryDirectory(prefix="nanguard-scanlog-") as tmp:
        log = Path(tmp) / "train.log"
        start = time.perf_counter()
        epochs, expected = write_log(log, args.mb)
        size_mb = log.stat().st_size / 1e6
        print(f"wrote {log.name}: {size_mb:.0f} MB, {epochs} epochs, non-finite epochs {sorted(expected)} "
              f"({time.perf_counter() - start:.1f} s)", file=sys.stderr)
        with log.open("rb") as warm:  # page cache
            while warm.read(1 << 24):
                pass
        runs: dict[str, list[float]] = {"grep": [], "scan_file": [], "cli": []}
        commands = {
            "grep": lambda: subprocess.run(["grep", "-c", "nan", str(log)], capture_output=True, check=True),
            "scan_file": lambda: scan_file(log),
            "cli": lambda: subprocess.run([nanguard, "scan-log", str(log), "--json"], capture_output=True),
        }
        names = list(commands)
        for repeat in range(args.repeats):
            for name in names[repeat % 3:] + names[: repeat % 3]:
                runs[name].append(_time(commands[name]))
        result = scan_file(log)
    found = {row.epoch: row.first_batch for row in result.incident_epochs() if row.nonfinite_frames}
    speeds = {name: size_mb / statistics.median(times) for name, times in runs.items()}
    report = {
        "size_mb": round(size_mb, 1), "repeats": args.repeats,
        "mb_per_s": {name: round(value, 1) for name, value in speeds.items()},
        "median_s": {name: round(statistics.median(times), 3) for name, times in runs.items()},
        "ratio_scan_file_vs_grep": round(speeds["scan_file"] / speeds["grep"], 4),
        "ratio_cli_vs_grep": round(speeds["cli"] / speeds["grep"], 4),
        "found_expected_epochs": found == expected,
    }
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(f"log: {size_mb:.0f} MB, medians of {args.repeats} runs (page cache warm)")
        for name in names:
            print(f"  {name:<10} {speeds[name]:>9.1f} MB/s   {statistics.median(runs[name]):.3f} s")
        print(f"  scan_file / grep = {report['ratio_scan_file_vs_grep']:.3f}   "
              f"cli / grep = {report['ratio_cli_vs_grep']:.3f}   (goal: scan_file >= 200 MB/s)")
        print(f"  found the non-finite epochs and first batches written: {found == expected}")
    return 0 if found == expected else 1


if __name__ == "__main__":
    sys.exit(main())
