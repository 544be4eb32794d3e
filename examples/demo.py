"""Demo: nanguard catches four real faults in a small training run and the run still ends clean.

A small MLP (with BatchNorm) learns scikit-learn's digits data set (1,797 8x8 images, shipped with
scikit-learn, no download) on the CPU, three times from the same seed and the same batch order:

1. fault-free, with a plain ``optimizer.step()``;
2. guarded by :class:`nanguard.Guard`, with four faults injected for real:
   (a) a NaN in one gradient element, written by a gradient hook (``param.register_hook``),
   (b) an Inf loss (the loss multiplied by ``float("inf")`` before ``backward``),
   (c) a 100x loss spike (``loss = loss * 100`` before ``backward``),
   (d) a NaN written into one weight element between two steps;
3. the same four faults unguarded (plain ``optimizer.step()``), for contrast.

It prints each fault and what the guard did with it (from the ``StepResult`` that ``guard.step``
returns), the test accuracy of the runs side by side, whether all final weights are finite, and the
incident table of ``python -m nanguard incidents RUN_DIR``. It exits 1 if a fault was not caught, if a
final weight of the guarded run is not finite, if the guarded accuracy is more than
``MAX_ACCURACY_DROP`` points below the fault-free run's, or if the ``nanguard`` command fails.

Run it with ``make demo`` or::

    .venv/bin/python examples/demo.py [--epochs N] [--runs-dir DIR]

Each run writes its journal to a fresh folder under ``demo_runs/`` (git-ignored).
"""

from __future__ import annotations

import argparse
import logging
import math
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import torch
import torch.nn.functional as F
from rich.console import Console
from rich.logging import RichHandler
from rich.table import Table
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import Tensor, nn

import nanguard
from nanguard.journal import read_actions

SEED = 0
BATCH_SIZE = 64
LEARNING_RATE = 3e-4
"""Adam's learning rate. Much higher (3e-3) and the training loss of many batches falls near zero, where a
100x spike of such a batch can stay below nanguard's ``mean + loss_spike_z * std`` threshold."""
DEFAULT_EPOCHS = 24
MAX_ACCURACY_DROP = 3.0
"""Percentage points the guarded run may lose against the fault-free run before the demo fails."""
CHECK_EVERY_STEPS = 20

NAN_GRAD_STEP = 40
INF_LOSS_STEP = 90
LOSS_SPIKE_STEP = 150
"""After the policy's ``spike_warmup_steps`` (50): spikes are judged only once the running statistics are warm."""
NAN_WEIGHT_STEP = 230
"""The NaN is written into a weight after step 229 and before step 230."""
LAST_FAULT_STEP = NAN_WEIGHT_STEP

NAN_GRAD_PARAM, NAN_GRAD_INDEX = "fc2.weight", (7, 11)
NAN_WEIGHT_PARAM, NAN_WEIGHT_INDEX = "fc1.weight", (3, 5)

REPO = Path(__file__).resolve().parents[1]
DEFAULT_RUNS_DIR = REPO / "demo_runs"

console = Console(highlight=False, soft_wrap=True)


class DigitsMLP(nn.Module):
    """64 pixels -> 128 (BatchNorm, ReLU) -> 64 (ReLU) -> 10 classes."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(64, 128)
        self.bn1 = nn.BatchNorm1d(128)
        self.fc2 = nn.Linear(128, 64)
        self.out = nn.Linear(64, 10)

    def forward(self, x: Tensor) -> Tensor:
        x = F.relu(self.bn1(self.fc1(x)))
        x = F.relu(self.fc2(x))
        return self.out(x)


@dataclass(frozen=True)
class Data:
    x_train: Tensor
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor


def load_data() -> Data:
    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32) / 16.0
    y = torch.tensor(digits.target, dtype=torch.long)
    x_train, x_test, y_train, y_test = train_test_split(x, y, test_size=0.2, random_state=SEED, stratify=y)
    return Data(x_train, y_train, x_test, y_test)


@dataclass(frozen=True)
class Fault:
    """One injected fault: at which step, what it is, and the incident kind nanguard must report."""

    step: int
    label: str
    what: str
    expected_kind: str
    expected_action: nanguard.Action


FAULTS = (
    Fault(NAN_GRAD_STEP, "a", f"NaN in one gradient element of {NAN_GRAD_PARAM} (gradient hook)",
          "nonfinite_grad", nanguard.Action.SKIP),
    Fault(INF_LOSS_STEP, "b", "Inf loss (loss * inf before backward)", "nonfinite_loss", nanguard.Action.SKIP),
    Fault(LOSS_SPIKE_STEP, "c", "100x loss spike (loss * 100 before backward)", "loss_spike", nanguard.Action.SKIP),
    Fault(NAN_WEIGHT_STEP, "d", f"NaN written into {NAN_WEIGHT_PARAM}{list(NAN_WEIGHT_INDEX)} before this step",
          "nonfinite_model", nanguard.Action.ROLLBACK),
)
FAULT_AT = {fault.step: fault for fault in FAULTS}


@dataclass
class RunResult:
    name: str
    accuracy: float
    nonfinite_tensors: list[str]
    seconds: float
    caught: dict[str, bool] = field(default_factory=dict)
    """Guarded run: fault label -> whether nanguard caught it as expected."""
    other_incidents: int = 0


def nonfinite_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> list[str]:
    """Names of the parameters, buffers and optimizer-state tensors that hold a NaN or Inf."""
    named: list[tuple[str, Tensor]] = [*model.named_parameters(), *model.named_buffers()]
    names = {id(p): name for name, p in model.named_parameters()}
    for param, state in optimizer.state.items():
        named.extend((f"optimizer.{names[id(param)]}.{k}", v) for k, v in state.items() if isinstance(v, Tensor))
    return [name for name, t in named if t.is_floating_point() and not bool(torch.isfinite(t).all())]


def state_copy(model: nn.Module, optimizer: torch.optim.Optimizer) -> list[Tensor]:
    """Copies of every weight, buffer and optimizer-state tensor (to prove a skipped step left them alone)."""
    tensors = [t.detach().clone() for t in model.state_dict().values()]
    for state in optimizer.state.values():
        tensors.extend(v.detach().clone() for v in state.values() if isinstance(v, Tensor))
    return tensors


def same_state(before: list[Tensor], after: list[Tensor]) -> bool:
    return len(before) == len(after) and all(torch.equal(a, b) for a, b in zip(before, after, strict=True))


@torch.no_grad()
def accuracy(model: nn.Module, data: Data) -> float:
    model.eval()
    predictions = model(data.x_test).argmax(dim=1)
    model.train()
    return 100.0 * float((predictions == data.y_test).float().mean())


def nan_grad_hook(grad: Tensor) -> Tensor:
    """A gradient hook that writes a NaN into one element, as a bad kernel or a bad sample would."""
    grad = grad.clone()
    grad[NAN_GRAD_INDEX] = math.nan
    return grad


def train(
    name: str,
    data: Data,
    *,
    epochs: int,
    inject: bool,
    run_dir: Path | None,
) -> RunResult:
    """Train one run. With ``run_dir`` the optimizer step is nanguard's; without, it is the plain one."""
    torch.manual_seed(SEED)
    model = DigitsMLP()
    optimizer = torch.optim.Adam(model.parameters(), lr=LEARNING_RATE)
    params = dict(model.named_parameters())
    guard = None
    if run_dir is not None:
        policy = nanguard.Policy(check_every_steps=CHECK_EVERY_STEPS)
        guard = nanguard.Guard(model, optimizer, run_dir=run_dir, policy=policy)
    order_rng = torch.Generator().manual_seed(SEED)  # the same batch order in every run
    steps_per_epoch = len(data.x_train) // BATCH_SIZE
    caught: dict[str, bool] = {}
    other_incidents = 0
    first_nonfinite_step: int | None = None
    started = time.perf_counter()
    step = 0
    for epoch in range(epochs):
        order = torch.randperm(len(data.x_train), generator=order_rng)
        for i in range(steps_per_epoch):
            idx = order[i * BATCH_SIZE : (i + 1) * BATCH_SIZE]
            fault = FAULT_AT.get(step) if inject else None
            if fault is not None:
                console.print(f"[bold yellow]step {step:4d}[/] inject ({fault.label}) {fault.what}")
            if fault is not None and fault.step == NAN_WEIGHT_STEP:
                with torch.no_grad():
                    params[NAN_WEIGHT_PARAM][NAN_WEIGHT_INDEX] = math.nan
            before = state_copy(model, optimizer) if fault is not None else []
            hook = params[NAN_GRAD_PARAM].register_hook(nan_grad_hook) if fault and step == NAN_GRAD_STEP else None

            loss = F.cross_entropy(model(data.x_train[idx]), data.y_train[idx])
            if fault is not None and step == INF_LOSS_STEP:
                loss = loss * math.inf
            if fault is not None and step == LOSS_SPIKE_STEP:
                loss = loss * 100
            loss.backward()
            if hook is not None:
                hook.remove()

            if guard is None:
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                bad = nonfinite_state(model, optimizer)
                if fault is not None:
                    console.print(f"           [red]unguarded:[/] update applied; non-finite tensors now: {short(bad)}")
                if bad and first_nonfinite_step is None:
                    first_nonfinite_step = step
            else:
                result = guard.step(loss, epoch=epoch, batch_index=i, sample_ids=idx)
                kinds = [f.kind.value for f in result.findings]
                if fault is not None:
                    caught[fault.label] = report_guarded_fault(fault, result, kinds, guard, run_dir, before)
                elif result.findings:
                    other_incidents += 1
                    console.print(f"[cyan]step {step:4d}[/] nanguard saw {', '.join(kinds)} "
                                  f"(not injected) -> {result.action.value if result.action else '?'}")
            step += 1
    if guard is not None:
        guard.close()
    if first_nonfinite_step is not None:
        console.print(f"           [red]unguarded:[/] weights first became non-finite at step {first_nonfinite_step}")
    if inject and step <= LAST_FAULT_STEP:
        console.print(f"[red]only {step} steps: the faults at steps up to {LAST_FAULT_STEP} were not all injected[/]")
        caught.update({f.label: False for f in FAULTS if f.step >= step})
    return RunResult(name, accuracy(model, data), nonfinite_state(model, optimizer), time.perf_counter() - started,
                     caught, other_incidents)


def report_guarded_fault(
    fault: Fault,
    result: nanguard.StepResult,
    kinds: list[str],
    guard: nanguard.Guard,
    run_dir: Path | None,
    before: list[Tensor],
) -> bool:
    """Print what the guard did with an injected fault; return whether it did what it should."""
    action = result.action.value if result.action else "?"
    tensors = sorted({t for f in result.findings if f.kind.value == fault.expected_kind for t in f.tensors})
    detail = f" in {', '.join(tensors)}" if tensors else ""
    ok = fault.expected_kind in kinds and result.action is fault.expected_action and result.applied is False
    if fault.expected_action is nanguard.Action.SKIP:
        untouched = same_state(before, state_copy(guard.model, guard.optimizer))
        ok = ok and untouched
        what = "weights, buffers and optimizer state untouched" if untouched else "[red]state CHANGED[/]"
    else:
        restored = read_actions(run_dir)[-1:] if run_dir else []  # the rollback (it starts its own LR back-off)
        to_step = next((a["detail"]["to_step"] for a in restored if a["action"] == "rollback"), "?")
        clean = not nonfinite_state(guard.model, guard.optimizer)
        ok = ok and clean
        finite = "state all finite" if clean else "[red]NOT[/]"
        what = f"rolled back to the clean snapshot of step {to_step}; {finite}"
    mark = "[bold green]caught[/]" if ok else "[bold red]NOT CAUGHT[/]"
    console.print(f"           {mark}: {', '.join(kinds)}{detail} -> {action} (applied={result.applied}); {what}")
    return ok


def short(names: list[str], shown: int = 3) -> str:
    if not names:
        return "none"
    more = f", ... ({len(names)} in all)" if len(names) > shown else ""
    return ", ".join(names[:shown]) + more


def fresh_run_dir(runs_dir: Path) -> Path:
    runs_dir.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=datetime.now().strftime("%Y%m%d-%H%M%S-"), dir=runs_dir))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=DEFAULT_EPOCHS, help=f"epochs per run ({DEFAULT_EPOCHS})")
    parser.add_argument("--runs-dir", type=Path, default=DEFAULT_RUNS_DIR, help="where the run folder goes")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # tiny model: one thread is fastest and leaves the machine's other cores alone
    # nanguard logs one warning per incident; show it in the same console, in order with the demo's lines.
    handler = RichHandler(console=console, show_time=False, show_path=False)
    logging.basicConfig(level=logging.WARNING, format="%(message)s", handlers=[handler])

    data = load_data()
    steps = args.epochs * (len(data.x_train) // BATCH_SIZE)
    if steps <= LAST_FAULT_STEP:
        parser.error(f"--epochs {args.epochs} gives {steps} steps; the last fault is at step {LAST_FAULT_STEP}")
    run_dir = fresh_run_dir(args.runs_dir)
    console.rule("[bold]nanguard demo: digits MLP, same seed, four injected faults")
    console.print(f"{len(data.x_train)} training / {len(data.x_test)} test images, {args.epochs} epochs = "
                  f"{steps} steps of {BATCH_SIZE}; guarded run folder: {run_dir}")

    console.rule("1. fault-free (plain optimizer.step)")
    clean = train("fault-free", data, epochs=args.epochs, inject=False, run_dir=None)
    console.print(f"test accuracy {clean.accuracy:.2f}%")
    console.rule("2. guarded, faults injected (guard.step)")
    guarded = train("guarded + faults", data, epochs=args.epochs, inject=True, run_dir=run_dir)
    console.print(f"test accuracy {guarded.accuracy:.2f}%")
    console.rule("3. unguarded, same faults (plain optimizer.step)")
    unguarded = train("unguarded + faults", data, epochs=args.epochs, inject=True, run_dir=None)
    console.print(f"test accuracy {unguarded.accuracy:.2f}%")

    console.rule("results")
    table = Table(header_style="bold")
    for header in ("run", "test accuracy", "non-finite tensors at the end", "seconds"):
        table.add_column(header)
    for run in (clean, guarded, unguarded):
        bad = short(run.nonfinite_tensors) if run.nonfinite_tensors else "none (all finite)"
        table.add_row(run.name, f"{run.accuracy:.2f}%", bad, f"{run.seconds:.1f}")
    console.print(table)

    failures: list[str] = []
    missed = [f"({f.label}) at step {f.step}" for f in FAULTS if not guarded.caught.get(f.label, False)]
    console.print(f"faults caught by nanguard: {len(FAULTS) - len(missed)} of {len(FAULTS)}; "
                  f"other steps it flagged: {guarded.other_incidents}")
    if missed:
        failures.append("not caught: " + ", ".join(missed))
    if guarded.nonfinite_tensors:
        failures.append("guarded run ends with non-finite tensors: " + ", ".join(guarded.nonfinite_tensors))
    else:
        console.print("guarded run: all final weights, buffers and optimizer state are finite")
    delta = guarded.accuracy - clean.accuracy
    console.print(f"guarded accuracy vs fault-free: {delta:+.2f} points (allowed: -{MAX_ACCURACY_DROP:.1f})")
    if delta < -MAX_ACCURACY_DROP:
        failures.append(f"guarded accuracy is {-delta:.2f} points below the fault-free run")
    if unguarded.nonfinite_tensors:
        count = len(unguarded.nonfinite_tensors)
        console.print(f"unguarded run: ends with non-finite weights and optimizer state ({count} tensors) "
                      f"and {unguarded.accuracy:.2f}% accuracy")
    else:
        console.print("[yellow]unguarded run: survived the faults this time[/]")

    failures.extend(check_journal(run_dir))
    console.rule("the run's journal, as the nanguard command shows it")
    console.print(f"$ python -m nanguard incidents {run_dir}")
    failures.extend(show_incident_table(run_dir))

    if failures:
        for failure in failures:
            console.print(f"[bold red]DEMO FAILED:[/] {failure}")
        return 1
    console.print("[bold green]DEMO PASSED:[/] every injected fault was caught and the guarded run ended clean")
    return 0


def check_journal(run_dir: Path) -> list[str]:
    """Every injected fault must be in the journal at its step, with the expected kind."""
    recorded = {(row["step"], row["kind"]) for row in nanguard.read_incidents(run_dir)}
    return [f"the journal has no {f.expected_kind} incident at step {f.step}"
            for f in FAULTS if (f.step, f.expected_kind) not in recorded]


def show_incident_table(run_dir: Path) -> list[str]:
    """Print ``python -m nanguard incidents RUN_DIR``; a failure of the command fails the demo."""
    command = [sys.executable, "-m", "nanguard", "incidents", str(run_dir)]
    done = subprocess.run(command, capture_output=True, text=True, check=False, timeout=120)
    sys.stdout.write(done.stdout)
    sys.stderr.write(done.stderr)
    sys.stdout.flush()
    if done.returncode != 0:
        return [f"`{' '.join(command[1:])}` exited {done.returncode}"]
    missing = [f.expected_kind for f in FAULTS if f.expected_kind not in done.stdout]
    return [f"the incident table does not list {', '.join(missing)}"] if missing else []


if __name__ == "__main__":
    sys.exit(main())
