"""YOLO demo: nanguard inside a real Ultralytics training with three real faults, beside Ultralytics alone.

Run it with ``make demo`` (it runs first, then ``examples/demo.py``) or::

    .venv/bin/python examples/demo_yolo.py [--quick] [--epochs N] [--runs-dir DIR]

It generates a small detection data set (coloured rectangles on noise, YOLO label files), then trains
YOLO11n from ``yolo11n.yaml`` on the CPU twice, from the same seed, with the same three faults injected for
real through Ultralytics callbacks and autograd hooks:

1. a NaN written into one weight element in the first epoch (``on_train_batch_end``), the divergence
   Ultralytics' own epoch-level recovery cannot undo (it has no earlier ``last.pt`` to reload);
2. a NaN in one gradient element mid-epoch (a one-shot ``param.register_hook``);
3. a NaN written into another weight element later (``on_train_batch_end``).

The guarded run (``nanguard.integrations.ultralytics.guard(model, policy=...)``, the default policy with one
state check and clean snapshot per epoch, ``check_every_steps=4``, instead of every 100 steps: a demo run
has only 20 steps, and a rollback goes to the newest clean snapshot) must finish with ``weights/last.pt``
and ``weights/best.pt`` auditing clean and every fault in its journal; the demo prints the incident table
(``python -m nanguard incidents``) and the audit (``python -m nanguard audit``). The unguarded run shows what
Ultralytics does alone: its NaN-recovery warnings, whether it gave up ("NaN persisted"), and the audit of its
weights. A side-by-side table ends the demo. Exit status 1 when the guarded run did not complete, a fault was
not caught, or its ``last.pt``/``best.pt`` are not clean.

Everything runs offline: ``YOLO_OFFLINE=1`` and a private ``YOLO_CONFIG_DIR`` holding a local font are set
before Ultralytics is imported. Runs go under ``demo_runs/yolo/`` (git-ignored).
"""

from __future__ import annotations

import argparse
import csv
import logging
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
DEFAULT_RUNS_DIR = REPO / "demo_runs" / "yolo"

SEED = 0
IMGSZ = 64
BATCH = 4
N_TRAIN = 16
"""Four batches per epoch: batch indices 0-3."""
N_VAL = 8
DEFAULT_EPOCHS = 5
QUICK_EPOCHS = 4
CHECK_EVERY_STEPS = N_TRAIN // BATCH
"""The guard's state check and clean snapshot: once per epoch (the policy's default is every 100 steps)."""
NAN = float("nan")

CLASSES = {0: ("red", (40, 40, 230)), 1: ("green", (40, 210, 40))}
"""Class id -> (name, BGR colour)."""


@dataclass(frozen=True)
class Fault:
    """One injected fault: at ``epoch``, batch ``batch_index``, in parameter ``param``."""

    label: str
    kind: str
    """``"weight"``: NaN written after the batch's step; ``"grad"``: NaN in the batch's gradient."""
    epoch: int
    batch_index: int
    param: str
    description: str

    def caught_at(self) -> tuple[int, int]:
        """(epoch, batch index) of the step where the guard must see it: a NaN weight written after batch
        b shows at batch b + 1; a NaN gradient at its own batch."""
        return (self.epoch, self.batch_index + 1) if self.kind == "weight" else (self.epoch, self.batch_index)

    def expected_kinds(self) -> set[str]:
        if self.kind == "grad":
            return {"nonfinite_grad"}
        return {"nonfinite_loss", "nonfinite_model"}


def make_faults(epochs: int) -> list[Fault]:
    """The three faults: epoch 0, mid-run, and in the last epoch (``epochs`` >= 4)."""
    return [
        Fault("1", "weight", 0, 1, "model.0.conv.weight", "NaN weight in the first epoch"),
        Fault("2", "grad", max(1, epochs - 3), 1, "model.2.cv1.conv.weight", "NaN gradient mid-epoch"),
        Fault("3", "weight", epochs - 1, 1, "model.4.cv2.conv.weight", "NaN weight later"),
    ]


# ---------------------------------------------------------------------------------------------- setup
def setup_offline(config_dir: Path) -> None:
    """Offline Ultralytics (no network, settings in ``config_dir``, a local font); call before importing it."""
    import matplotlib

    font = Path(matplotlib.__file__).parent / "mpl-data" / "fonts" / "ttf" / "DejaVuSans.ttf"
    for folder in (config_dir, config_dir / "Ultralytics"):
        folder.mkdir(parents=True, exist_ok=True)
        if not (folder / "Arial.ttf").is_file():
            shutil.copy(font, folder / "Arial.ttf")
    os.environ.update({
        "YOLO_OFFLINE": "1", "YOLO_CONFIG_DIR": str(config_dir), "YOLO_AUTOINSTALL": "false",
        "ULTRALYTICS_SKIP_REQUIREMENTS_CHECKS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
    })


def make_dataset(root: Path, *, n_train: int = N_TRAIN, n_val: int = N_VAL, size: int = IMGSZ,
                 seed: int = SEED) -> Path:
    """Coloured rectangles (one or two, red or green) on noise, YOLO label files; returns data.yaml."""
    import cv2

    rng = np.random.default_rng(seed)
    for split, count in (("train", n_train), ("val", n_val)):
        (root / "images" / split).mkdir(parents=True, exist_ok=True)
        (root / "labels" / split).mkdir(parents=True, exist_ok=True)
        for i in range(count):
            image = rng.integers(0, 80, (size, size, 3), dtype=np.uint8)
            lines = []
            for _ in range(int(rng.integers(1, 3))):
                cls = int(rng.integers(0, len(CLASSES)))
                w, h = (int(v) for v in rng.integers(size // 5, size // 2, 2))
                x0, y0 = int(rng.integers(0, size - w)), int(rng.integers(0, size - h))
                image[y0:y0 + h, x0:x0 + w] = CLASSES[cls][1]
                lines.append(f"{cls} {(x0 + w / 2) / size:.5f} {(y0 + h / 2) / size:.5f} {w / size:.5f} {h / size:.5f}")
            cv2.imwrite(str(root / "images" / split / f"{i}.png"), image)
            (root / "labels" / split / f"{i}.txt").write_text("\n".join(lines) + "\n")
    names = "".join(f"  {k}: {v[0]}\n" for k, v in CLASSES.items())
    data = root / "data.yaml"
    data.write_text(f"path: {root}\ntrain: images/train\nval: images/val\nnames:\n{names}")
    return data


# ---------------------------------------------------------------------------------------------- faults
def poison_next_gradient(param: torch.nn.Parameter) -> None:
    """A one-shot gradient hook: the next gradient of ``param`` gets a NaN in its first element."""
    handle: Any = None

    def poison(grad: torch.Tensor) -> torch.Tensor:
        handle.remove()
        grad = grad.clone()
        grad[(0,) * grad.dim()] = NAN  # by index, not view(-1): on CUDA the gradient may be channels-last
        return grad

    handle = param.register_hook(poison)


class FaultInjector:
    """Callbacks that inject ``faults`` for real and time every batch (forward, backward, optimizer step)."""

    def __init__(self, faults: list[Fault]) -> None:
        self.faults = faults
        self.batch_index = -1
        self.injected: list[Fault] = []
        self.batch_times: list[float] = []
        self.batches_per_epoch = 0
        self.loop_s: float | None = None
        """From ``on_train_start`` to ``on_train_end`` (the guard's final audits included); None on a crash."""
        self._t0 = 0.0
        self._loop_t0 = 0.0

    def callbacks(self) -> list[tuple[str, Callable[[Any], None]]]:
        return [("on_train_start", self._train_start), ("on_train_epoch_start", self._epoch_start),
                ("on_train_batch_start", self._batch_start), ("on_train_batch_end", self._batch_end),
                ("on_train_end", self._train_end)]

    def _train_start(self, trainer: Any) -> None:
        self._loop_t0 = time.perf_counter()

    def _train_end(self, trainer: Any) -> None:
        self.loop_s = time.perf_counter() - self._loop_t0

    def _params(self, trainer: Any) -> dict[str, torch.nn.Parameter]:
        return dict(trainer.model.named_parameters())

    def _due(self, trainer: Any, kind: str) -> list[Fault]:
        return [f for f in self.faults if f.kind == kind and (f.epoch, f.batch_index) == (trainer.epoch,
                self.batch_index) and f not in self.injected]

    def _epoch_start(self, trainer: Any) -> None:
        self.batch_index = -1
        self.batches_per_epoch = len(trainer.train_loader)

    def _batch_start(self, trainer: Any) -> None:
        self.batch_index += 1
        for fault in self._due(trainer, "grad"):
            poison_next_gradient(self._params(trainer)[fault.param])
            self.injected.append(fault)
        self._t0 = time.perf_counter()

    def _batch_end(self, trainer: Any) -> None:
        self.batch_times.append(time.perf_counter() - self._t0)
        for fault in self._due(trainer, "weight"):
            with torch.no_grad():
                param = self._params(trainer)[fault.param]
                param[(0,) * param.dim()] = NAN
            self.injected.append(fault)


class RecoveryLog(logging.Handler):
    """Collects Ultralytics' warnings about its NaN recovery."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        text = record.getMessage()
        if "NaN" in text or "nan" in text.lower().split():
            self.messages.append(text)

    @property
    def reruns(self) -> int:
        return sum("recovering from last.pt" in m for m in self.messages)


# ---------------------------------------------------------------------------------------------- training
@dataclass
class RunResult:
    name: str
    guarded: bool
    save_dir: Path
    completed: bool
    error: str | None
    wall_s: float
    batches_per_epoch: int
    reruns: int
    warnings: list[str]
    injected: list[Fault]
    batch_times: list[float]
    loop_s: float | None = None
    verdicts: dict[str, str] = field(default_factory=dict)
    map50_95: float | None = None
    results_rows: int = 0


def demo_policy() -> Any:
    """The default policy (Ultralytics' clip at 10) with a state check and clean snapshot every epoch."""
    from nanguard.policy import Policy

    return Policy(max_grad_norm=10.0, check_every_steps=CHECK_EVERY_STEPS)


def train(project: Path, data: Path, name: str, *, guarded: bool, faults: list[Fault], epochs: int,
          quiet: bool = True, policy: Any = None, device: str = "cpu", imgsz: int = IMGSZ, batch: int = BATCH,
          amp: bool = False) -> RunResult:
    """One YOLO11n training, guarded or not, with ``faults`` injected; never raises on a training failure.
    ``device``, ``imgsz``, ``batch`` and ``amp`` are the demo's CPU settings unless a benchmark asks otherwise."""
    from ultralytics import YOLO
    from ultralytics.utils import LOGGER

    from nanguard.integrations.ultralytics import guard

    model = YOLO("yolo11n.yaml")
    if guarded:
        guard(model, policy=policy or demo_policy())
    injector = FaultInjector(faults)
    for event, callback in injector.callbacks():
        model.add_callback(event, callback)
    recovery = RecoveryLog()
    LOGGER.addHandler(recovery)
    level = LOGGER.level
    if quiet:
        LOGGER.setLevel(logging.WARNING)
    error: str | None = None
    start = time.perf_counter()
    try:
        model.train(
            data=str(data), epochs=epochs, imgsz=imgsz, batch=batch, nbs=batch, warmup_epochs=0, workers=0,
            device=device, amp=amp, plots=False, save_period=1, project=str(project), name=name, exist_ok=True,
            seed=SEED, deterministic=False, mosaic=0.0, val=True, verbose=False,
        )
    except RuntimeError as exc:
        error = str(exc)
    finally:
        wall = time.perf_counter() - start
        LOGGER.removeHandler(recovery)
        LOGGER.setLevel(level)
    save_dir = project / name
    result = RunResult(
        name=name, guarded=guarded, save_dir=save_dir, completed=error is None, error=error, wall_s=wall,
        batches_per_epoch=injector.batches_per_epoch, reruns=recovery.reruns, warnings=recovery.messages,
        injected=injector.injected, batch_times=injector.batch_times, loop_s=injector.loop_s,
    )
    result.verdicts = audit_weights(save_dir / "weights")
    result.map50_95, result.results_rows = final_map(save_dir)
    return result


def audit_weights(weights: Path) -> dict[str, str]:
    """``last.pt``/``best.pt`` -> status (``missing`` when absent), with the audit's first finding."""
    from nanguard.ckpt import Status, audit

    verdicts = {}
    for name in ("last.pt", "best.pt"):
        path = weights / name
        if not path.is_file():
            verdicts[name] = "missing"
            continue
        verdict = audit(path)
        text = verdict.status.value
        if verdict.status is not Status.CLEAN and verdict.findings:
            text += f" ({len(verdict.findings)} findings, e.g. {verdict.findings[0]})"
        verdicts[name] = text
    return verdicts


def final_map(save_dir: Path) -> tuple[float | None, int]:
    """The last mAP50-95 in results.csv (None when there is none) and the number of rows."""
    path = save_dir / "results.csv"
    if not path.is_file():
        return None, 0
    with path.open(newline="") as handle:
        rows = [{k.strip(): v.strip() for k, v in row.items() if k} for row in csv.DictReader(handle)]
    if not rows:
        return None, 0
    value = rows[-1].get("metrics/mAP50-95(B)")
    try:
        return (float(value) if value else None), len(rows)
    except ValueError:
        return None, len(rows)


def caught(save_dir: Path, faults: list[Fault]) -> dict[str, dict[str, Any] | None]:
    """Fault label -> the journal incident that caught it (None when not caught)."""
    from nanguard import read_incidents

    incidents = read_incidents(save_dir)
    found: dict[str, dict[str, Any] | None] = {}
    for fault in faults:
        rows = [r for r in incidents if (r["epoch"], r["batch_index"]) == fault.caught_at()
                and r["kind"] in fault.expected_kinds()]
        rows.sort(key=lambda r: not r["tensors"])  # the incident that names the tensor first
        found[fault.label] = rows[0] if rows else None
    return found


def guard_lost_batches(save_dir: Path) -> int:
    """Batches whose update the guard threw away: the steps undone by rollbacks (``from_step - to_step``)
    plus the skipped steps (one per skipped step, however many incidents it had)."""
    from nanguard import read_incidents
    from nanguard.journal import read_actions

    lost = 0
    for action in read_actions(save_dir):
        detail = action.get("detail") or {}
        if action["action"] == "rollback" and "from_step" in detail and "to_step" in detail:
            lost += int(detail["from_step"]) - int(detail["to_step"])
    skipped = {(r["step"], r["epoch"], r["batch_index"]) for r in read_incidents(save_dir) if r["action"] == "skip"}
    return lost + len(skipped)

# ---------------------------------------------------------------------------------------------- output
def nanguard_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "nanguard", *args], capture_output=True, text=True, check=False)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--quick", action="store_true", help=f"{QUICK_EPOCHS} epochs instead of {DEFAULT_EPOCHS}")
    parser.add_argument("--epochs", type=int, default=None, help="epochs per run (at least 4)")
    parser.add_argument("--runs-dir", type=Path, default=DEFAULT_RUNS_DIR)
    args = parser.parse_args(argv)
    epochs = args.epochs or (QUICK_EPOCHS if args.quick else DEFAULT_EPOCHS)
    if epochs < 4:
        parser.error("--epochs must be at least 4 (three faults in separate epochs)")

    from rich.console import Console
    from rich.table import Table

    console = Console(highlight=False, soft_wrap=True)
    root = args.runs_dir.resolve() / datetime.now().strftime("%Y%m%d-%H%M%S-%f")
    setup_offline(args.runs_dir.resolve() / "yolo_config")
    data = make_dataset(root / "data")
    faults = make_faults(epochs)
    console.print(f"[bold]nanguard YOLO demo[/]: YOLO11n from yolo11n.yaml, {N_TRAIN} train / {N_VAL} val images "
                  f"of {IMGSZ}px, batch {BATCH}, {epochs} epochs, CPU, seed {SEED}; runs in {root}")
    for fault in faults:
        console.print(f"  fault ({fault.label}): {fault.description}: epoch {fault.epoch}, batch "
                      f"{fault.batch_index}, {fault.param}")

    console.rule(f"guarded: guard(model, policy=Policy(check_every_steps={CHECK_EVERY_STEPS}))")
    guarded = train(root, data, "guarded", guarded=True, faults=faults, epochs=epochs)
    console.print(f"guarded run: {'completed' if guarded.completed else 'FAILED: ' + str(guarded.error)} "
                  f"in {guarded.wall_s:.1f} s")
    found = caught(guarded.save_dir, faults)
    for fault in faults:
        row = found[fault.label]
        injected = fault in guarded.injected
        if row is None:
            console.print(f"  fault ({fault.label}) {fault.description}: "
                          f"{'injected' if injected else 'NOT INJECTED'}, NOT CAUGHT")
        else:
            console.print(f"  fault ({fault.label}) {fault.description}: caught at epoch {row['epoch']}, batch "
                          f"{row['batch_index']} ({row['kind']}, action {row['action']}, "
                          f"tensors {', '.join(row['tensors'][:2])})")
    n_caught = sum(row is not None for row in found.values())
    console.print(f"faults caught by nanguard: {n_caught} of {len(faults)}")

    console.print(f"\n$ python -m nanguard incidents {guarded.save_dir}")
    incidents = nanguard_cli("incidents", str(guarded.save_dir))
    console.print(incidents.stdout.rstrip() or incidents.stderr.rstrip(), markup=False)
    console.print(f"\n$ python -m nanguard audit {guarded.save_dir / 'weights'}")
    audit_proc = nanguard_cli("audit", str(guarded.save_dir / "weights"))
    console.print(audit_proc.stdout.rstrip() or audit_proc.stderr.rstrip(), markup=False)
    for name, verdict in guarded.verdicts.items():
        console.print(f"guarded {name}: {verdict}")

    console.rule("unguarded: Ultralytics alone, same seed, same faults")
    plain = train(root, data, "unguarded", guarded=False, faults=faults, epochs=epochs)
    console.print(f"unguarded run: {'completed' if plain.completed else 'raised RuntimeError: ' + str(plain.error)}"
                  f" after {plain.wall_s:.1f} s")
    for message in plain.warnings:
        console.print(f"  Ultralytics: {message}", markup=False)
    console.print(f"  faults injected: {', '.join(f.label for f in plain.injected) or 'none'} "
                  f"(a fault after the run died is never reached)")
    console.print(f"\n$ python -m nanguard audit {plain.save_dir / 'weights'}")
    plain_audit = nanguard_cli("audit", str(plain.save_dir / "weights"))
    console.print((plain_audit.stdout.rstrip() or plain_audit.stderr.rstrip())[-3000:], markup=False)
    for name, verdict in plain.verdicts.items():
        console.print(f"unguarded {name}: {verdict}", markup=False)

    table = Table(title="Ultralytics alone vs nanguard (same seed, same three faults)")
    table.add_column("")
    table.add_column("Ultralytics alone")
    table.add_column("nanguard guard(model)")

    def fmt_map(value: float | None) -> str:
        return "n/a" if value is None else f"{value:.4f}"

    table.add_row("training completed", "yes" if plain.completed else "no: " + (plain.error or ""),
                  "yes" if guarded.completed else "no: " + (guarded.error or ""))
    table.add_row("faults caught", "-", f"{n_caught} of {len(faults)}")
    table.add_row("epochs re-run by Ultralytics' recovery", str(plain.reruns), str(guarded.reruns))
    table.add_row("batches lost to recovery", str(plain.reruns * plain.batches_per_epoch),
                  str(guard_lost_batches(guarded.save_dir)))
    for name in ("last.pt", "best.pt"):
        table.add_row(f"{name} audit", plain.verdicts[name].split(" (")[0], guarded.verdicts[name].split(" (")[0])
    table.add_row("results.csv rows", str(plain.results_rows), str(guarded.results_rows))
    table.add_row("final val mAP50-95", fmt_map(plain.map50_95), fmt_map(guarded.map50_95))
    table.add_row("wall time", f"{plain.wall_s:.1f} s", f"{guarded.wall_s:.1f} s")
    console.print(table)

    problems = []
    if not guarded.completed:
        problems.append("the guarded run did not complete")
    if n_caught != len(faults):
        problems.append(f"{len(faults) - n_caught} fault(s) not caught")
    if any(guarded.verdicts[n] != "clean" for n in ("last.pt", "best.pt")):
        problems.append("the guarded last.pt/best.pt are not clean")
    if audit_proc.returncode != 0:
        problems.append(f"nanguard audit exited {audit_proc.returncode}")
    if incidents.returncode != 0:
        problems.append(f"nanguard incidents exited {incidents.returncode}")
    if problems:
        console.print("[bold red]YOLO DEMO FAILED[/]: " + "; ".join(problems))
        return 1
    console.print("[bold green]YOLO DEMO PASSED[/]: every fault caught; guarded last.pt and best.pt audit clean")
    return 0


if __name__ == "__main__":
    sys.exit(main())
