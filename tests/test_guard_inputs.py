"""Bad input gets a clear error at construction (or at the first step, for the loss), never mid-run."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

import nanguard
from tests.training import make_setup, set_nan


def test_model_without_parameters_is_refused(tmp_path: Path) -> None:
    other = nn.Linear(2, 2)
    with pytest.raises(ValueError, match="model has no parameters"):
        nanguard.Guard(nn.ReLU(), torch.optim.SGD(other.parameters(), lr=0.1), run_dir=tmp_path)


def test_optimizer_that_does_not_hold_the_models_parameters_is_refused(tmp_path: Path) -> None:
    model, other = nn.Linear(2, 2), nn.Linear(2, 2)
    with pytest.raises(ValueError, match="optimizer does not hold the model's parameters"):
        nanguard.Guard(model, torch.optim.SGD(other.parameters(), lr=0.1), run_dir=tmp_path)
    mixed = torch.optim.SGD([*model.parameters(), *other.parameters()], lr=0.1)
    with pytest.raises(ValueError, match="optimizer holds 2 tensors that are not parameters of the model"):
        nanguard.Guard(model, mixed, run_dir=tmp_path)


def test_wrong_types_are_refused(tmp_path: Path) -> None:
    model = nn.Linear(2, 2)
    with pytest.raises(TypeError, match=r"model must be a torch\.nn\.Module"):
        nanguard.Guard("model", torch.optim.SGD(model.parameters(), lr=0.1), run_dir=tmp_path)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"optimizer must be a torch\.optim\.Optimizer"):
        nanguard.Guard(model, {"lr": 0.1}, run_dir=tmp_path)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="ema must have an update"):
        nanguard.Guard(model, torch.optim.SGD(model.parameters(), lr=0.1), run_dir=tmp_path, ema=object())


def test_non_scalar_or_non_tensor_loss_is_refused(tmp_path: Path) -> None:
    model = nn.Linear(2, 2)
    guard = nanguard.Guard(model, torch.optim.SGD(model.parameters(), lr=0.1), run_dir=tmp_path)
    out = model(torch.randn(3, 2))
    with pytest.raises(ValueError, match=r"loss must have exactly one element, got shape \(3, 2\)"):
        guard.step(out)
    with pytest.raises(TypeError, match=r"loss must be a torch\.Tensor with one element, got float"):
        guard.step(1.0)  # type: ignore[arg-type]
    assert guard.step_count == 0


def test_run_folder_that_cannot_be_written_is_refused(tmp_path: Path) -> None:
    blocker = tmp_path / "file.txt"
    blocker.write_text("not a folder")
    model = nn.Linear(2, 2)
    with pytest.raises(nanguard.NanguardError, match=r"file.txt/run/.nanguard: cannot create"):
        nanguard.Guard(model, torch.optim.SGD(model.parameters(), lr=0.1), run_dir=blocker / "run")
    assert blocker.read_text() == "not a folder"


def test_state_that_is_already_nonfinite_is_refused(tmp_path: Path) -> None:
    setup = make_setup()
    set_nan(setup.model[0].weight, (0, 0))
    with pytest.raises(ValueError, match=r"non-finite values before the first step: 0.weight"):
        nanguard.Guard(setup.model, setup.optimizer, loop_scheduler=setup.scheduler, run_dir=tmp_path)


def test_policy_path_is_loaded_and_bad_policy_file_refused(tmp_path: Path) -> None:
    model = nn.Linear(2, 2)
    path = tmp_path / "policy.toml"
    path.write_text("check_every_steps = 3\n")
    guard = nanguard.Guard(model, torch.optim.SGD(model.parameters(), lr=0.1), run_dir=tmp_path, policy=path)
    assert guard.policy.check_every_steps == 3
    path.write_text("check_every_steps = -3\n")
    with pytest.raises(nanguard.PolicyError, match="check_every_steps"):
        nanguard.Guard(model, torch.optim.SGD(model.parameters(), lr=0.1), run_dir=tmp_path, policy=path)


def test_a_buffer_that_is_non_finite_from_the_start_is_a_constant_not_damage(tmp_path: Path) -> None:
    model = nn.Linear(4, 4)
    model.register_buffer("mask", nn.Transformer.generate_square_subsequent_mask(4), persistent=False)
    guard = nanguard.Guard(model, torch.optim.SGD(model.parameters(), lr=0.1), run_dir=tmp_path,
                           policy=nanguard.Policy(check_every_steps=1))
    for _ in range(3):
        loss = model(torch.randn(2, 4)).square().mean()
        loss.backward()
        assert guard.step(loss).applied
    set_nan(model.weight, (0, 0))
    assert [f.tensors for f in guard.scan_state()] == [("weight",)]
