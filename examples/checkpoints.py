"""Checkpoints, safely: audit clean, dirty and booby-trapped files without running code from them, load
only what is allowlisted, and write atomically.

    .venv/bin/python examples/checkpoints.py

It writes three checkpoints into a temporary folder with :func:`nanguard.ckpt.save_checkpoint` (temp file,
fsync, rename): a clean one, one whose Adam second moment holds a NaN (the weights are fine — exactly the
kind of damage nobody sees until the next resume), and one whose unpickling would run a shell command.
Then it audits each with the inert reader, shows that :func:`nanguard.ckpt.load_checkpoint` refuses the
third while the shell command never runs, and runs ``nanguard audit`` on the folder.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from torch import nn

from nanguard.ckpt import Status, UnsafeCheckpoint, audit, load_checkpoint, save_checkpoint


class ShellCommand:
    """Unpickling this would run ``touch MARKER``: what a malicious checkpoint can do to ``torch.load``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, ...]:
        return (os.system, (f"touch {self.marker}",))


def trained_state() -> dict[str, object]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Linear(32, 4))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(5):
        loss = nn.functional.cross_entropy(model(torch.randn(8, 16)), torch.randint(0, 4, (8,)))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return {"epoch": 5, "model": model.state_dict(), "optimizer": optimizer.state_dict()}


def main() -> int:
    with tempfile.TemporaryDirectory(prefix="nanguard-checkpoints-") as tmp:
        return show(Path(tmp))


def show(folder: Path) -> int:
    marker = folder / "the-payload-ran"

    clean = save_checkpoint(trained_state(), folder / "clean.pt")
    poisoned = trained_state()
    poisoned["optimizer"]["state"][0]["exp_avg_sq"][3, 7] = float("nan")  # type: ignore[index]
    dirty = save_checkpoint(poisoned, folder / "dirty.pt")
    evil = save_checkpoint({**trained_state(), "extra": ShellCommand(marker)}, folder / "evil.pt")

    for path in (clean, dirty, evil):
        verdict = audit(path)
        print(f"{verdict.status.value:<8} {path.name}")
        for finding in verdict.findings:
            print(f"         {finding.location}: {finding.kind.value} x{finding.count} ({finding.area.value})")
        if verdict.unsafe_globals:
            print(f"         would import and call: {', '.join(verdict.unsafe_globals)}")

    state = load_checkpoint(clean)  # every global is torch/collections: loads with real classes
    print(f"load_checkpoint(clean.pt) -> epoch {state['epoch']}, {len(state['model'])} model tensors")
    try:
        load_checkpoint(evil)
    except UnsafeCheckpoint as err:
        print(f"load_checkpoint(evil.pt) refused: {err}")
    print(f"the shell command ran: {marker.exists()}")

    print("\n$ nanguard audit", folder)
    cli = subprocess.run([sys.executable, "-m", "nanguard", "audit", str(folder)], capture_output=True, text=True)
    print(cli.stdout + cli.stderr, end="")
    print(f"exit code {cli.returncode} (3: a checkpoint would run code; the worst status wins)")

    expected = [audit(clean).status, audit(dirty).status, audit(evil).status]
    ok = expected == [Status.CLEAN, Status.DIRTY, Status.UNSAFE] and not marker.exists() and cli.returncode == 3
    print("CHECKPOINTS EXAMPLE PASSED" if ok else "CHECKPOINTS EXAMPLE FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
