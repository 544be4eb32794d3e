"""A guarded training run for the kill-and-resume test: ``python tests/resume_script.py RUN_DIR OUT
[--kill-at STEP] [--resume]``. It trains with disk snapshots, kills itself with SIGKILL at the start of
step STEP when asked, resumes from the newest clean snapshot with ``--resume``, and writes its final
state to OUT."""

from __future__ import annotations

import argparse
import os
import signal
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import nanguard


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--kill-at", type=int, default=None)
    parser.add_argument("--resume", action="store_true")
    args = parser.parse_args()
    torch.use_deterministic_algorithms(True)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Dropout(0.2), nn.Linear(32, 3))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=7, gamma=0.7)
    gen = torch.Generator().manual_seed(1234)
    x = torch.randn(160, 8, generator=gen)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0.5).long()
    loader = DataLoader(TensorDataset(x, y), batch_size=16, shuffle=True)
    policy = nanguard.Policy(check_every_steps=5, disk_snapshot_every_steps=5, lr_backoff_on=())
    guard = nanguard.Guard(model, optimizer, run_dir=args.run_dir, scheduler=scheduler, policy=policy)
    if args.resume:
        print(f"resumed at step {guard.resume()}", flush=True)
    for batch in guard.batches(loader, epochs=3):
        if args.kill_at is not None and guard.step_count == args.kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
        inputs, targets = batch.data
        loss = nn.functional.cross_entropy(model(inputs), targets)
        loss.backward()
        guard.step(loss)
    guard.close()
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(), "rng": torch.get_rng_state(), "step": guard.step_count},
               args.out)


if __name__ == "__main__":
    main()
