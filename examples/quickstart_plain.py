"""Quickstart: the smallest nanoGPT-style training loop guarded by nanguard, with three changed lines.

A tiny causal transformer learns a synthetic token sequence on the CPU for a few hundred steps. The
lines that nanguard changes are marked ``# nanguard: 1/3`` to ``# nanguard: 3/3``: build the guard
after the optimizer, call ``guard.step(loss)`` instead of ``optimizer.step(); optimizer.zero_grad()``,
and ``guard.close()`` at the end. The policy comes from a ``nanguard.toml`` that the script writes to a
temporary folder and loads with ``nanguard.Policy.from_file``; the run's journal goes there too.

Run it (a few seconds) with::

    .venv/bin/python examples/quickstart_plain.py
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import nanguard

VOCAB, BLOCK, BATCH, EMBED, HEADS = 16, 16, 32, 32, 4
MAX_ITERS, LEARNING_RATE = 200, 3e-3

POLICY_TOML = """\
# nanguard.toml: every key is optional; these are the ones a small run most often changes.
check_every_steps = 25      # scan weights and optimizer state (and keep a clean copy) every 25 steps
spike_warmup_steps = 20     # judge loss and gradient-norm spikes after 20 finite steps
loss_spike_z = 6.0
on_loss_spike = "skip"
on_grad_spike = "clip"
"""


class CausalSelfAttention(nn.Module):
    """nanoGPT's attention: one qkv projection, ``scaled_dot_product_attention(is_causal=True)``."""

    def __init__(self) -> None:
        super().__init__()
        self.qkv = nn.Linear(EMBED, 3 * EMBED)
        self.proj = nn.Linear(EMBED, EMBED)

    def forward(self, x: Tensor) -> Tensor:
        b, t, c = x.shape
        q, k, v = (z.view(b, t, HEADS, c // HEADS).transpose(1, 2) for z in self.qkv(x).split(EMBED, dim=2))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(y.transpose(1, 2).reshape(b, t, c))


class TinyGPT(nn.Module):
    """Token and position embeddings, one pre-norm transformer block, a language-model head.

    Causality comes from ``is_causal=True``, as in nanoGPT. (A ``-inf`` mask buffer works too: buffers that
    are non-finite when the guard starts are constants and are left out of its scans.)
    """

    def __init__(self) -> None:
        super().__init__()
        self.tok = nn.Embedding(VOCAB, EMBED)
        self.pos = nn.Embedding(BLOCK, EMBED)
        self.ln1, self.attn = nn.LayerNorm(EMBED), CausalSelfAttention()
        self.ln2 = nn.LayerNorm(EMBED)
        self.mlp = nn.Sequential(nn.Linear(EMBED, 4 * EMBED), nn.GELU(), nn.Linear(4 * EMBED, EMBED))
        self.ln_f, self.head = nn.LayerNorm(EMBED), nn.Linear(EMBED, VOCAB)

    def forward(self, idx: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
        x = self.tok(idx) + self.pos(torch.arange(idx.shape[1]))
        x = x + self.attn(self.ln1(x))
        x = x + self.mlp(self.ln2(x))
        logits = self.head(self.ln_f(x))
        return logits, F.cross_entropy(logits.reshape(-1, VOCAB), targets.reshape(-1))


def get_batch(data: Tensor, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    starts = torch.randint(len(data) - BLOCK - 1, (BATCH,), generator=generator)
    x = torch.stack([data[i : i + BLOCK] for i in starts])
    y = torch.stack([data[i + 1 : i + 1 + BLOCK] for i in starts])
    return x, y


def main() -> None:
    torch.set_num_threads(1)  # a tiny model on the CPU: more threads only contend with each other
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(0)
    data = torch.tensor([(i * 7 + i // 5) % VOCAB for i in range(4096)])  # a learnable synthetic "text"
    model = TinyGPT()
    optimizer = torch.optim.AdamW(model.parameters(), lr=LEARNING_RATE)

    with tempfile.TemporaryDirectory(prefix="nanguard-quickstart-") as tmp:
        policy_file = Path(tmp) / "nanguard.toml"
        policy_file.write_text(POLICY_TOML, encoding="utf-8")
        policy = nanguard.Policy.from_file(policy_file)
        print(f"policy from {policy_file.name}: check_every_steps={policy.check_every_steps}, "
              f"spike_warmup_steps={policy.spike_warmup_steps}, on_loss_spike={policy.on_loss_spike}")
        run_dir = Path(tmp) / "run"

        guard = nanguard.Guard(model, optimizer, run_dir=run_dir, policy=policy)  # nanguard: 1/3
        first_loss = last_loss = float("nan")
        for iter_num in range(MAX_ITERS):
            x, y = get_batch(data, generator)
            _, loss = model(x, y)
            loss.backward()
            guard.step(loss, batch_index=iter_num)  # nanguard: 2/3 (was: optimizer.step(); optimizer.zero_grad())
            last_loss = loss.item()
            if iter_num == 0:
                first_loss = last_loss
            if iter_num % 50 == 0 or iter_num == MAX_ITERS - 1:
                print(f"iter {iter_num:4d}: loss {last_loss:.4f}")
        guard.close()  # nanguard: 3/3

        incidents = nanguard.read_incidents(run_dir)
        print(f"trained {MAX_ITERS} steps: loss {first_loss:.4f} -> {last_loss:.4f}; "
              f"skipped steps: {guard.skipped_steps}; incidents in the journal: {len(incidents)}")


if __name__ == "__main__":
    main()
