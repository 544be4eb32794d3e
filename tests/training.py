"""Small real training setups shared by the guard tests: a model with BatchNorm, AdamW, a scheduler and
fixed batches, plus helpers to copy and compare complete training state bit for bit."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

import nanguard

BATCH = 16
FEATURES = 8


@dataclass
class Setup:
    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any
    batches: list[tuple[Tensor, Tensor, Tensor]]
    results: list[nanguard.StepResult] = field(default_factory=list)


def make_setup(
    *, seed: int = 0, steps: int = 30, fused: bool = False, optimizer: str = "adamw", scheduler: bool = True
) -> Setup:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(FEATURES, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Linear(32, 3))
    if optimizer == "adamw":
        opt: torch.optim.Optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, fused=fused or None)
    else:
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=7, gamma=0.7) if scheduler else None
    gen = torch.Generator().manual_seed(1234)
    x = torch.randn(steps * BATCH, FEATURES, generator=gen)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0.5).long()
    ids = torch.arange(steps * BATCH)
    batches = [(x[i * BATCH:(i + 1) * BATCH], y[i * BATCH:(i + 1) * BATCH], ids[i * BATCH:(i + 1) * BATCH])
               for i in range(steps)]
    return Setup(model, opt, sched, batches)


Hook = Callable[[int, Setup], None]


def train(
    setup: Setup,
    guard: nanguard.Guard | None,
    *,
    skip_batches: Iterable[int] = (),
    before_forward: dict[int, Hook] | None = None,
    poison_input: Iterable[int] = (),
    loss_scale: dict[int, float] | None = None,
    grad_hook: dict[int, Hook] | None = None,
    on_step: Callable[[int, Setup], None] | None = None,
    pre: dict[int, dict[str, Tensor]] | None = None,
    epoch: int = 0,
) -> Setup:
    """Run one pass over ``setup.batches`` with real faults:

    - ``before_forward[i]`` runs before batch i's forward (write NaN into a weight, a moment, a buffer);
    - ``poison_input``: batch i's first input element becomes NaN (a bad sample);
    - ``loss_scale[i]``: batch i's loss is multiplied (100.0 for a spike, inf for an infinite loss);
    - ``grad_hook[i]``: runs after backward, before the step (NaN in one gradient element);
    - ``on_step(i, setup)``: runs just before the guard's step (to record state);
    - ``pre``: filled with the complete state before each batch's forward (and ``pre[len]`` at the end).
    """
    skip = set(skip_batches)
    for i, (x, y, ids) in enumerate(setup.batches):
        if i in skip:
            continue
        if pre is not None:
            pre[i] = state_of(setup)
        if before_forward and i in before_forward:
            before_forward[i](i, setup)
        if i in set(poison_input):
            x = x.clone()
            x[0, 0] = float("nan")
        loss = nn.functional.cross_entropy(setup.model(x), y)
        if loss_scale and i in loss_scale:
            loss = loss * loss_scale[i]
        loss.backward()
        if grad_hook and i in grad_hook:
            grad_hook[i](i, setup)
        if on_step:
            on_step(i, setup)
        if guard is None:
            setup.optimizer.step()
            setup.optimizer.zero_grad(set_to_none=True)
            if setup.scheduler is not None:
                setup.scheduler.step()
        else:
            setup.results.append(guard.step(loss, epoch=epoch, batch_index=i, sample_ids=ids))
    if pre is not None:
        pre[len(setup.batches)] = state_of(setup)
    return setup


def state_of(setup: Setup) -> dict[str, Tensor]:
    """Every tensor of the training state, cloned: parameters, buffers, optimizer state, and the LR."""
    state = {f"model.{k}": v.detach().clone() for k, v in setup.model.state_dict().items()}
    names = {id(p): n for n, p in setup.model.named_parameters()}
    for param, param_state in setup.optimizer.state.items():
        for key, value in param_state.items():
            if isinstance(value, Tensor):
                state[f"optimizer.{names[id(param)]}.{key}"] = value.detach().clone()
    state["lr"] = torch.tensor([g["lr"] for g in setup.optimizer.param_groups], dtype=torch.float64)
    return state


def assert_same_state(actual: dict[str, Tensor], expected: dict[str, Tensor]) -> None:
    assert actual.keys() == expected.keys()
    different = [k for k in expected if not torch.equal(actual[k], expected[k])]
    assert not different, f"state differs in {different}"


def set_nan(tensor: Tensor, index: tuple[int, ...] = (0,)) -> None:
    with torch.no_grad():
        tensor[index] = float("nan")
