"""The guard's promises in a real training loop with real injected faults: each fault is detected at the
right step with the right tensor names, the bad update is not applied, training goes on, and the journal
rows say exactly what happened."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

import nanguard
from tests.training import Setup, assert_same_state, make_setup, set_nan, state_of, train

CHECK_EVERY = 5


def guard_for(setup: Setup, run_dir: Path, **policy: object) -> nanguard.Guard:
    settings = {"check_every_steps": CHECK_EVERY, "spike_warmup_steps": 8, **policy}
    return nanguard.Guard(setup.model, setup.optimizer, run_dir=run_dir, scheduler=setup.scheduler,
                          policy=nanguard.Policy(**settings))


def rows(run_dir: Path) -> list[dict[str, object]]:
    return [{k: r[k] for k in ("kind", "step", "epoch", "batch_index", "tensors", "action")}
            for r in nanguard.read_incidents(run_dir)]


def test_nan_in_input_skips_the_step_and_leaves_state_bitwise_unchanged(tmp_path: Path) -> None:
    setup = make_setup()
    guard = guard_for(setup, tmp_path)
    pre: dict[int, dict[str, torch.Tensor]] = {}
    train(setup, guard, poison_input=[12], pre=pre)
    # Step 12's forward ran through a NaN sample and BatchNorm's running statistics took it in; the
    # guard put them back with everything else: the state after step 12 is the state before it.
    assert_same_state(pre[13], pre[12])
    assert rows(tmp_path) == [{"kind": "nonfinite_loss", "step": 12, "epoch": 0, "batch_index": 12,
                               "tensors": [], "action": "skip"}]
    incident = nanguard.read_incidents(tmp_path)[0]
    assert incident["sample_ids"] == list(range(12 * 16, 13 * 16))
    assert math.isnan(incident["loss"])
    assert all(torch.isfinite(t).all() for t in state_of(setup).values())
    assert setup.results[-1].applied


def test_nan_in_one_gradient_element_is_named_and_not_applied(tmp_path: Path) -> None:
    setup = make_setup()
    guard = guard_for(setup, tmp_path)
    pre: dict[int, dict[str, torch.Tensor]] = {}
    weight = setup.model[3].weight
    train(setup, guard, grad_hook={9: lambda i, s: set_nan(weight.grad, (1, 2))}, pre=pre)
    assert_same_state(pre[10], pre[9])
    assert rows(tmp_path) == [{"kind": "nonfinite_grad", "step": 9, "epoch": 0, "batch_index": 9,
                               "tensors": ["3.weight"], "action": "skip"}]
    assert setup.results[9].action is nanguard.Action.SKIP and not setup.results[9].applied


def test_nan_from_a_real_gradient_hook_is_caught(tmp_path: Path) -> None:
    setup = make_setup()
    guard = guard_for(setup, tmp_path)
    fired = []

    def hook(grad: torch.Tensor) -> torch.Tensor:
        if len(fired) == 0 and len(setup.results) == 6:
            fired.append(True)
            grad = grad.clone()
            grad[0, 0] = float("nan")
        return grad

    setup.model[0].weight.register_hook(hook)
    train(setup, guard)
    assert fired
    assert rows(tmp_path) == [{"kind": "nonfinite_grad", "step": 6, "epoch": 0, "batch_index": 6,
                               "tensors": ["0.weight"], "action": "skip"}]


def test_inf_loss_is_skipped(tmp_path: Path) -> None:
    setup = make_setup()
    guard = guard_for(setup, tmp_path)
    pre: dict[int, dict[str, torch.Tensor]] = {}
    train(setup, guard, loss_scale={7: math.inf}, pre=pre)
    assert_same_state(pre[8], pre[7])
    incident = nanguard.read_incidents(tmp_path)[0]
    assert (incident["kind"], incident["step"], incident["action"]) == ("nonfinite_loss", 7, "skip")
    assert incident["loss"] == math.inf


def test_hundredfold_loss_spike_is_skipped_after_warmup(tmp_path: Path) -> None:
    setup = make_setup()
    guard = guard_for(setup, tmp_path)
    pre: dict[int, dict[str, torch.Tensor]] = {}
    train(setup, guard, loss_scale={20: 100.0}, pre=pre)
    assert_same_state(pre[21], pre[20])
    spike = nanguard.read_incidents(tmp_path)
    assert [(r["kind"], r["step"], r["action"]) for r in spike] == [("loss_spike", 20, "skip")]
    assert spike[0]["value"] > spike[0]["threshold"]
    # The default policy backs the LR off after a loss spike, and says so in the journal.
    actions = nanguard.journal.read_actions(tmp_path)
    assert [(a["action"], a["step"]) for a in actions] == [("lr_backoff", 20)]


def test_nan_in_a_weight_is_named_and_rolled_back_to_the_last_clean_snapshot(tmp_path: Path) -> None:
    setup = make_setup()
    guard = guard_for(setup, tmp_path)
    pre: dict[int, dict[str, torch.Tensor]] = {}
    train(setup, guard, before_forward={12: lambda i, s: set_nan(s.model[3].weight, (0, 0))}, pre=pre)
    assert rows(tmp_path) == [
        {"kind": "nonfinite_loss", "step": 12, "epoch": 0, "batch_index": 12, "tensors": [], "action": "rollback"},
        {"kind": "nonfinite_model", "step": 12, "epoch": 0, "batch_index": 12, "tensors": ["3.weight"],
         "action": "rollback"},
    ]
    # Back to the snapshot verified clean at the end of step 9 (the start of step 10). This loop feeds
    # batches itself, so the data is not rewound (guard.batches() does that; see test_rollback.py).
    assert_same_state(pre[13], pre[10])
    rollback = nanguard.read_actions(tmp_path)[0]
    assert rollback["action"] == "rollback"
    assert (rollback["detail"]["to_step"], rollback["detail"]["data_rewound"]) == (10, False)
    assert all(torch.isfinite(t).all() for t in state_of(setup).values())


def test_nan_in_adam_second_moment_is_found_at_the_check_and_rolled_back(tmp_path: Path) -> None:
    setup = make_setup()
    guard = guard_for(setup, tmp_path)
    pre: dict[int, dict[str, torch.Tensor]] = {}
    weight = setup.model[0].weight

    def poison_moment(i: int, s: Setup) -> None:
        set_nan(s.optimizer.state[weight]["exp_avg_sq"], (3, 4))

    train(setup, guard, before_forward={14: poison_moment}, pre=pre)
    # The check at the end of step 14 finds the moment, and the weight element it already reached.
    assert rows(tmp_path) == [
        {"kind": "nonfinite_model", "step": 14, "epoch": 0, "batch_index": 14, "tensors": ["0.weight"],
         "action": "rollback"},
        {"kind": "nonfinite_optimizer", "step": 14, "epoch": 0, "batch_index": 14,
         "tensors": ["optimizer.0.weight.exp_avg_sq"], "action": "rollback"},
    ]
    assert_same_state(pre[15], pre[10])
    assert all(torch.isfinite(t).all() for t in state_of(setup).values())


def test_nan_in_batchnorm_running_var_is_caught_at_the_next_check(tmp_path: Path) -> None:
    setup = make_setup()
    guard = guard_for(setup, tmp_path)
    train(setup, guard, before_forward={13: lambda i, s: set_nan(s.model[1].running_var, (5,))})
    assert rows(tmp_path) == [{"kind": "nonfinite_model", "step": 14, "epoch": 0, "batch_index": 14,
                               "tensors": ["1.running_var"], "action": "rollback"}]
    assert torch.isfinite(setup.model[1].running_var).all()


def test_nan_in_ema_is_named_and_rolled_back(tmp_path: Path) -> None:
    setup = make_setup()
    ema = nanguard.EMA(setup.model, decay=0.9)
    guard = nanguard.Guard(setup.model, setup.optimizer, loop_scheduler=setup.scheduler, run_dir=tmp_path, ema=ema,
                           policy=nanguard.Policy(check_every_steps=CHECK_EVERY))
    train(setup, guard, before_forward={11: lambda i, s: set_nan(ema.module[0].bias, (2,))})
    assert rows(tmp_path) == [{"kind": "nonfinite_ema", "step": 14, "epoch": 0, "batch_index": 14,
                               "tensors": ["ema.0.bias"], "action": "rollback"}]
    assert all(torch.isfinite(t).all() for t in ema.module.state_dict().values())


def test_skipped_step_leaves_ema_untouched(tmp_path: Path) -> None:
    setup = make_setup()
    ema = nanguard.EMA(setup.model, decay=0.9)
    guard = nanguard.Guard(setup.model, setup.optimizer, loop_scheduler=setup.scheduler, run_dir=tmp_path, ema=ema,
                           policy=nanguard.Policy(check_every_steps=CHECK_EVERY))
    seen: dict[int, dict[str, torch.Tensor]] = {}

    def snap(i: int, s: Setup) -> None:
        seen[i] = {k: v.clone() for k, v in ema.module.state_dict().items()}

    train(setup, guard, poison_input=[8], on_step=snap, before_forward={9: snap})
    for key, value in seen[8].items():
        assert torch.equal(value, ema.module.state_dict()[key]) or key not in seen[9] or torch.equal(
            seen[9][key], value)
    assert all(torch.equal(seen[9][k], seen[8][k]) for k in seen[8])


def test_training_goes_on_after_every_fault_and_ends_finite(tmp_path: Path) -> None:
    setup = make_setup(steps=40)
    guard = guard_for(setup, tmp_path)
    weight = setup.model[3].weight
    train(setup, guard, poison_input=[5], loss_scale={22: 100.0, 27: math.inf},
          grad_hook={9: lambda i, s: set_nan(weight.grad, (0, 0))},
          before_forward={31: lambda i, s: set_nan(weight, (1, 1))})
    guard.close()
    kinds = [(r["kind"], r["step"], r["action"]) for r in nanguard.read_incidents(tmp_path)]
    assert kinds == [("nonfinite_loss", 5, "skip"), ("nonfinite_grad", 9, "skip"), ("loss_spike", 22, "skip"),
                     ("nonfinite_loss", 27, "skip"), ("nonfinite_loss", 31, "rollback"),
                     ("nonfinite_model", 31, "rollback")]
    # The rollback went back to the start of step 30; the loop kept feeding the next batches.
    assert all(r.applied for r in setup.results[32:])
    assert all(torch.isfinite(t).all() for t in state_of(setup).values())


def test_step_returns_one_result_per_batch_with_loss_and_grad_norm(tmp_path: Path) -> None:
    setup = make_setup(steps=6)
    guard = guard_for(setup, tmp_path)
    train(setup, guard)
    assert [r.step for r in setup.results] == list(range(6))
    assert all(r.applied and r.action is nanguard.Action.CONTINUE for r in setup.results)
    assert all(r.loss is not None and r.grad_norm is not None and r.grad_norm > 0 for r in setup.results)
    assert nanguard.read_incidents(tmp_path) == []


@pytest.mark.parametrize("fault_step", [3, 17])
def test_epoch_and_batch_index_are_recorded_per_epoch(tmp_path: Path, fault_step: int) -> None:
    setup = make_setup(steps=10)
    guard = guard_for(setup, tmp_path)
    for epoch in range(2):
        train(setup, guard, epoch=epoch, poison_input=[fault_step - 10 * epoch])
    (row,) = nanguard.read_incidents(tmp_path)
    assert (row["step"], row["epoch"], row["batch_index"]) == (fault_step, fault_step // 10, fault_step % 10)
