"""The reference workloads of nanguard's benchmarks: three small models with fixed synthetic batches.

Used by ``benchmarks/step_overhead.py``; importable from any script in this folder (``import _models``).
Each :class:`Workload` builds a fresh model from a seed, so every variant of a benchmark trains an identical
copy, and carries a few fixed random batches that a training loop cycles through.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

Batch = tuple[Tensor, Tensor]


@dataclass(frozen=True)
class Workload:
    """One reference model: how to build it, its batches, and its loss."""

    name: str
    description: str
    build: Callable[[], nn.Module]
    batches: list[Batch]
    loss_fn: Callable[[Tensor, Tensor], Tensor]

    def model(self, seed: int, device: torch.device) -> nn.Module:
        """A fresh model, identical for the same seed, in train mode on ``device``."""
        torch.manual_seed(seed)
        return self.build().to(device).train()

    def batches_on(self, device: torch.device) -> list[Batch]:
        return [(x.to(device), y.to(device)) for x, y in self.batches]


class MLP(nn.Module):
    """``depth`` hidden layers of ``width`` units with ReLU, then a classifier head."""

    def __init__(self, in_features: int = 512, width: int = 512, depth: int = 3, classes: int = 10) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        features = in_features
        for _ in range(depth):
            layers += [nn.Linear(features, width), nn.ReLU()]
            features = width
        layers.append(nn.Linear(features, classes))
        self.net = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class SmallCNN(nn.Module):
    """A small VGG-style CNN for 32x32 RGB images, with BatchNorm (so it has buffers to guard)."""

    def __init__(self, classes: int = 10) -> None:
        super().__init__()

        def block(cin: int, cout: int) -> nn.Sequential:
            return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU())

        self.features = nn.Sequential(
            block(3, 16), block(16, 16), nn.MaxPool2d(2),  # 16x16
            block(16, 32), block(32, 32), nn.MaxPool2d(2),  # 8x8
            block(32, 64), nn.MaxPool2d(2),  # 4x4
        )
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(64 * 4 * 4, 256), nn.ReLU(), nn.Linear(256, classes))

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))


class TinyTransformer(nn.Module):
    """A decoder-only (causal) pre-norm transformer language model."""

    def __init__(self, vocab: int = 512, d_model: int = 128, layers: int = 6, heads: int = 4,
                 seq_len: int = 64, dropout: float = 0.1) -> None:
        super().__init__()
        self.tok = nn.Embedding(vocab, d_model)
        self.pos = nn.Embedding(seq_len, d_model)
        layer = nn.TransformerEncoderLayer(d_model, heads, dim_feedforward=4 * d_model, dropout=dropout,
                                           batch_first=True, norm_first=True, activation="gelu")
        self.blocks = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, vocab, bias=False)
        # A boolean causal mask (True = may not attend). The float form, -inf above the diagonal, would be a
        # non-finite buffer, which the guard refuses at construction as contaminated state.
        mask = torch.ones(seq_len, seq_len, dtype=torch.bool).triu(1)
        self.register_buffer("mask", mask, persistent=False)

    def forward(self, idx: Tensor) -> Tensor:
        t = idx.shape[1]
        positions = torch.arange(t, device=idx.device)
        h = self.tok(idx) + self.pos(positions)
        h = self.blocks(h, mask=self.mask[:t, :t], is_causal=True)
        return self.head(self.norm(h))


def _lm_loss(logits: Tensor, targets: Tensor) -> Tensor:
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))


def workloads(n_batches: int = 4, seed: int = 1234) -> dict[str, Workload]:
    """The three reference workloads, with ``n_batches`` fixed random batches each (built on the CPU)."""
    gen = torch.Generator().manual_seed(seed)

    def mlp_batch() -> Batch:
        return torch.randn(256, 512, generator=gen), torch.randint(0, 10, (256,), generator=gen)

    def cnn_batch() -> Batch:
        return torch.randn(32, 3, 32, 32, generator=gen), torch.randint(0, 10, (32,), generator=gen)

    def lm_batch() -> Batch:
        tokens = torch.randint(0, 512, (4, 65), generator=gen)
        return tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()

    return {
        "mlp": Workload("mlp", "MLP 3x512, batch 256", MLP, [mlp_batch() for _ in range(n_batches)],
                        F.cross_entropy),
        "cnn": Workload("cnn", "CNN 5 conv+BN, 32x32, batch 32", SmallCNN,
                        [cnn_batch() for _ in range(n_batches)], F.cross_entropy),
        "transformer": Workload("transformer", "transformer 6x d128, seq 64, batch 4", TinyTransformer,
                                [lm_batch() for _ in range(n_batches)], _lm_loss),
    }
