"""nanoGPT's ``train.py`` loop, guarded: its GradScaler, its own clip, its gradient accumulation, its LR schedule.

The loop below is the shape of nanoGPT's ``train.py`` (Karpathy, MIT licence) on a tiny character model that runs
on the CPU in seconds: ``scaler = torch.amp.GradScaler(enabled=(dtype == 'float16'))`` (disabled here, as on every
CPU and bf16 run), ``loss = loss / gradient_accumulation_steps``, ``scaler.unscale_`` + ``clip_grad_norm_``, the
cosine ``get_lr`` written into the param groups, ``iter_num``. The lines nanguard changes are marked
``# nanguard:``; docs/guard.md shows the same edits as a diff of nanoGPT's own file:

1. build the guard after the optimizer and the scaler, with nanoGPT's ``grad_clip`` as the policy's clip;
2. ``scaler.scale(loss).backward()`` becomes ``guard.backward(loss)`` (every micro-batch's loss is checked);
3. the clip block (``scaler.unscale_`` + ``clip_grad_norm_``) becomes ``verdict = guard.before_optimizer_step(...)``
   — the guard unscales, needs the norm *before* clipping to see spikes, and then clips to ``grad_clip`` itself;
4. after ``scaler.update()``: ``guard.after_optimizer_step(verdict)``;
5. ``guard.close()`` at the end.

``--nan-micro ITER:MICRO`` writes NaN into one sample's embeddings in that micro-batch's forward, ``--spike-micro
ITER:MICRO`` multiplies them by 30 (a corrupted batch): real faults in the data path. Run it with::

    .venv/bin/python examples/nanogpt_train.py --out-dir /tmp/nanogpt --nan-micro 30:0 --spike-micro 60:2
"""

from __future__ import annotations

import argparse
import math
from contextlib import nullcontext
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import nanguard

# -------------------------------------------------------------------- nanoGPT's config (a tiny one)
batch_size, block_size, n_embd, vocab = 8, 16, 32, 24
gradient_accumulation_steps = 4
learning_rate, min_lr, warmup_iters, lr_decay_iters, max_iters = 3e-3, 3e-4, 10, 120, 120
weight_decay, beta1, beta2, grad_clip = 1e-1, 0.9, 0.95, 1.0
device, dtype = "cpu", "bfloat16"


class TinyLM(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.wte = nn.Embedding(vocab, n_embd)
        self.wpe = nn.Embedding(block_size, n_embd)
        self.mlp = nn.Sequential(nn.LayerNorm(n_embd), nn.Linear(n_embd, 4 * n_embd), nn.GELU(),
                                 nn.Linear(4 * n_embd, n_embd))
        self.lm_head = nn.Linear(n_embd, vocab)

    def forward(self, idx: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
        x = self.wte(idx) + self.wpe(torch.arange(idx.shape[1]))
        x = x + self.mlp(x)
        logits = self.lm_head(x)
        return logits, F.cross_entropy(logits.view(-1, vocab), targets.view(-1))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out-dir", required=True)
    parser.add_argument("--nan-micro", default=None, help="ITER:MICRO: NaN in one sample's embeddings")
    parser.add_argument("--spike-micro", default=None, help="ITER:MICRO: embeddings x30 in that micro-batch")
    parser.add_argument("--no-guard", action="store_true", help="run nanoGPT's loop unguarded, for comparison")
    args = parser.parse_args(argv)
    faults = {}
    for name in ("nan_micro", "spike_micro"):
        if getattr(args, name):
            at, micro = (int(v) for v in getattr(args, name).split(":"))
            faults[(at, micro)] = name

    torch.manual_seed(1337)
    data = torch.tensor([(i * 7 + i // 3) % vocab for i in range(4096)])

    def get_batch() -> tuple[Tensor, Tensor]:
        ix = torch.randint(len(data) - block_size, (batch_size,))
        x = torch.stack([data[i:i + block_size] for i in ix])
        y = torch.stack([data[i + 1:i + 1 + block_size] for i in ix])
        return x, y

    model = TinyLM()
    optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate, betas=(beta1, beta2),
                                  weight_decay=weight_decay)
    scaler = torch.amp.GradScaler(enabled=(dtype == "float16"))
    ctx: Any = nullcontext() if device == "cpu" else torch.autocast(device, dtype=torch.bfloat16)
    guard = None
    if not args.no_guard:  # nanguard: 1
        guard = nanguard.Guard(model, optimizer, scaler=scaler, run_dir=args.out_dir,
                               policy=nanguard.Policy(max_grad_norm=grad_clip or None))

    current: dict[str, Any] = {}

    def corrupt(module: nn.Module, inputs: Any, output: Tensor) -> Tensor:
        kind = faults.get((current["iter"], current["micro"]))
        if kind == "nan_micro":
            output = output.clone()
            output[0, 0, 0] = float("nan")
        elif kind == "spike_micro":
            output = output * 30.0
        return output

    model.wte.register_forward_hook(corrupt)

    def get_lr(it: int) -> float:
        if it < warmup_iters:
            return learning_rate * (it + 1) / (warmup_iters + 1)
        if it > lr_decay_iters:
            return min_lr
        ratio = (it - warmup_iters) / (lr_decay_iters - warmup_iters)
        return min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (learning_rate - min_lr)

    X, Y = get_batch()
    iter_num = 0
    while True:
        lr = get_lr(iter_num)
        for param_group in optimizer.param_groups:
            param_group["lr"] = lr
        for micro_step in range(gradient_accumulation_steps):
            current.update(iter=iter_num, micro=micro_step)
            with ctx:
                _, loss = model(X, Y)
                loss = loss / gradient_accumulation_steps
            X, Y = get_batch()
            if guard is not None:
                guard.backward(loss)  # nanguard: 2 (was scaler.scale(loss).backward())
            else:
                scaler.scale(loss).backward()
        if guard is not None:
            verdict = guard.before_optimizer_step(loop_step=iter_num)  # nanguard: 3 (was the clip block)
        elif grad_clip != 0.0:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        scaler.step(optimizer)
        scaler.update()
        if guard is not None:
            guard.after_optimizer_step(verdict)  # nanguard: 4
        optimizer.zero_grad(set_to_none=True)
        if iter_num % 20 == 0:
            print(f"iter {iter_num}: loss {loss.item() * gradient_accumulation_steps:.4f}")
        iter_num += 1
        if iter_num > max_iters:
            break
    with torch.no_grad():
        X, Y = get_batch()
        final = model(X, Y)[1].item()
    print(f"final loss {final:.4f}")
    if guard is not None:
        guard.close()  # nanguard: 5
        for line in guard.report():
            print("incident:", line)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
