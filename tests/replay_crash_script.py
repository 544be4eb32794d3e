"""A guarded run that the replay test kills: ``python tests/replay_crash_script.py RUN_DIR``.

Two micro-batches per step (``guard.backward``); an infinite loss in micro-batch 1 of step 3 (skipped); a NaN
written into a weight after step 7, found by the periodic check at step 10 and rolled back to the snapshot of
step 5, so steps 5.. run again in attempt 1; at step 14 the process SIGKILLs itself, leaving the journal's run
"running" with a dead process."""

from __future__ import annotations

import os
import signal
import sys

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import nanguard


def main() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    x = torch.randn(32 * 16, 8)
    y = (x[:, 0] > 0).long()
    loader = DataLoader(TensorDataset(x, y), batch_size=16)
    policy = nanguard.Policy(check_every_steps=5, lr_backoff_on=())
    guard = nanguard.Guard(model, optimizer, run_dir=sys.argv[1], policy=policy)
    poisoned = False
    for batch in guard.batches(loader, epochs=1):
        inputs, labels = batch.data
        for micro, (xs, ys) in enumerate(zip(inputs.chunk(2), labels.chunk(2), strict=True)):
            loss = nn.functional.cross_entropy(model(xs), ys) / 2
            if guard.step_count == 3 and micro == 1:
                loss = loss * float("inf")
            guard.backward(loss)
        guard.step()
        if guard.step_count == 8 and not poisoned:
            poisoned = True
            with torch.no_grad():
                model[0].weight[0, 0] = float("nan")
        if guard.step_count == 14 and poisoned:
            os.kill(os.getpid(), signal.SIGKILL)


if __name__ == "__main__":
    main()
