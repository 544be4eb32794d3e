"""On a CUDA device, the sync-free mode makes no host-device synchronisation per step: steady-state steps
run under ``torch.cuda.set_sync_debug_mode("error")``, which raises on any synchronising call. Only the
first step (eager, because optimizers create their state in it) and the flush every ``check_every_steps``
read the device. Skipped on machines without CUDA (CI has none); run it where a GPU is lent:
``.venv/bin/pytest tests/integration/test_gpu_sync_free.py``."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

import nanguard

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


@pytest.mark.parametrize("optimizer", ["fused", "capturable"])
def test_sync_free_steps_make_no_host_sync(tmp_path: Path, optimizer: str) -> None:
    torch.manual_seed(0)
    device = torch.device("cuda")
    model = nn.Sequential(nn.Linear(64, 128), nn.BatchNorm1d(128), nn.ReLU(), nn.Linear(128, 10)).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, **{optimizer: True})
    ema = nanguard.EMA(model, decay=0.99)
    check_every = 10
    guard = nanguard.Guard(model, opt, run_dir=tmp_path, ema=ema,
                           policy=nanguard.Policy(sync_free=True, check_every_steps=check_every, max_grad_norm=5.0))
    x = torch.randn(32, 64, device=device)
    y = torch.randint(0, 10, (32,), device=device)
    bad = x.clone()
    bad[0, 0] = float("nan")  # a real bad sample, made before the checked steps (a host write syncs)
    for step in range(3 * check_every + 1):
        # The eager first step, and the flush at the end of every check_every-th step, may sync.
        flushing = step == 0 or (step + 1) % check_every == 0
        torch.cuda.set_sync_debug_mode("default" if flushing else "error")
        try:
            inputs = bad if step == 13 else x  # the bad sample is skipped on the device
            loss = nn.functional.cross_entropy(model(inputs), y)
            loss.backward()
            guard.step(loss)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    guard.close()
    rows = [(r["kind"], r["step"], r["action"]) for r in nanguard.read_incidents(tmp_path)]
    assert rows == [("nonfinite_loss", 13, "skip")]
    assert all(torch.isfinite(p).all() for p in model.parameters())
