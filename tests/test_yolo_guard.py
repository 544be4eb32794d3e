"""Tests of nanguard.integrations.ultralytics: the guard inside real, tiny, offline YOLO trainings.

Each test trains YOLO11n from its yaml on the shared synthetic dataset (8 train images, batch 4, ``nbs=4``:
two optimizer steps per epoch, batch indices 0 and 1) and injects one real fault through Ultralytics
callbacks or autograd hooks. After each: the training completes, every ``weights/*.pt`` audits clean, and
the journal in the run's ``save_dir`` holds the incident with its epoch and batch index.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytest
import torch

from nanguard import read_incidents
from nanguard.ckpt import Status, audit
from nanguard.journal import read_actions, read_checkpoints
from nanguard.policy import Policy

pytest.importorskip("ultralytics")

NAN = float("nan")
Hook = tuple[str, Callable[[Any], None]]


class BatchCounter:
    """The batch index within the epoch, as the test's own callbacks see it."""

    def __init__(self) -> None:
        self.index = -1

    def hooks(self) -> list[Hook]:
        return [("on_train_epoch_start", self._epoch_start), ("on_train_batch_start", self._batch_start)]

    def _epoch_start(self, trainer: Any) -> None:
        self.index = -1

    def _batch_start(self, trainer: Any) -> None:
        self.index += 1


class LRSpy:
    """The LRs each optimizer step really used, beside the LRs the trainer had set in the param groups
    (read after the batch, when the guard has put its back-off scaling away again)."""

    def __init__(self) -> None:
        self.seen: list[tuple[list[float], list[float]]] = []  # (stepped with, set by the trainer)

    def on_train_start(self, trainer: Any) -> None:  # the guard's optimizer exists by now
        optimizer = trainer.optimizer
        original = optimizer.step

        def step(*args: Any, **kwargs: Any) -> Any:
            # A step the guard skipped reaches optimizer.step with every gradient None: no update, not counted.
            if any(p.grad is not None for g in optimizer.param_groups for p in g["params"]):
                self.seen.append(([g["lr"] for g in optimizer.param_groups], []))
            return original(*args, **kwargs)

        optimizer.step = step

    def after_batch(self, trainer: Any) -> None:
        if self.seen and not self.seen[-1][1]:
            self.seen[-1][1].extend(g["lr"] for g in trainer.optimizer.param_groups)


def train_guarded(
    project: Path,
    data: Path,
    hooks: Sequence[Hook] = (),
    *,
    before_guard: Sequence[Hook] = (),
    policy: Policy | None = None,
    default_policy: bool = False,
    epochs: int = 2,
    model_yaml: str = "yolo11n.yaml",
    **overrides: Any,
) -> tuple[Any, Path]:
    """Train a guarded YOLO11n (``hooks`` registered after the guard's callbacks, ``before_guard`` before);
    returns the UltralyticsGuard and the run's save_dir."""
    from ultralytics import YOLO

    from nanguard.integrations.ultralytics import guard

    model = YOLO(model_yaml)
    for event, fn in before_guard:
        model.add_callback(event, fn)
    guarded = guard(model, policy=None if default_policy else (policy or Policy(max_grad_norm=10.0)))
    for event, fn in hooks:
        model.add_callback(event, fn)
    args: dict[str, Any] = dict(
        data=str(data), epochs=epochs, imgsz=32, batch=4, nbs=4, device="cpu", workers=0, plots=False,
        amp=False, project=str(project), name="run", exist_ok=True, save_period=1, warmup_epochs=0,
        val=True, verbose=False, seed=0, deterministic=False, cache=False, mosaic=0.0,
    )
    args.update(overrides)
    model.train(**args)
    return guarded, project / "run"


def assert_all_clean(save_dir: Path) -> None:
    weights = sorted((save_dir / "weights").glob("*.pt"))
    assert {"last.pt", "best.pt"} <= {p.name for p in weights}
    for path in weights:
        verdict = audit(path)
        assert verdict.status is Status.CLEAN, (path, verdict.status, [str(f) for f in verdict.findings][:5])


def assert_finished_clean(guarded: Any, save_dir: Path) -> None:
    """The guard closed with a finite state, every checkpoint audits clean, and the training history is finite:
    a skipped NaN batch is not in Ultralytics' running mean loss, so results.csv holds no NaN/Inf."""
    assert guarded.guard.closed
    assert guarded.guard.scan_state() == []
    assert_all_clean(save_dir)
    history = (save_dir / "results.csv").read_text().lower()
    assert "nan" not in history and "inf" not in history, history


def incident(save_dir: Path, kind: str) -> dict[str, Any]:
    rows = [r for r in read_incidents(save_dir) if r["kind"] == kind]
    assert rows, [(r["kind"], r["epoch"], r["batch_index"]) for r in read_incidents(save_dir)]
    return rows[0]


def action_names(save_dir: Path) -> list[str]:
    return [a["action"] for a in read_actions(save_dir)]


def train_image(data: Path) -> Callable[[str], bool]:
    root = data.parent / "images" / "train"
    return lambda name: Path(name).parent == root


def test_healthy_run(yolo_offline: Path, yolo_dataset: Path, tmp_path: Path) -> None:
    """No fault: the guard applies every step (Ultralytics' clip at 10 is the default policy's limit), the
    EMA moves once per applied step, every checkpoint is audited, pinned and clean, the guard closes."""
    guarded, save_dir = train_guarded(tmp_path, yolo_dataset, default_policy=True)
    assert guarded.guard.policy.max_grad_norm == 10.0
    assert [r.applied for r in guarded.results] == [True] * 4
    assert guarded.trainer.ema.updates == 4
    assert read_incidents(save_dir) == []
    assert_finished_clean(guarded, save_dir)
    pinned = save_dir / ".nanguard" / "pinned"
    assert (pinned / "last.pt").is_file() and (pinned / "best.pt").is_file()
    rows = read_checkpoints(save_dir)
    assert {"last.pt", "best.pt", "epoch0.pt", "epoch1.pt"} <= {Path(r["path"]).name for r in rows}
    assert {r["status"] for r in rows} == {"clean"}


def test_nan_gradient_mid_epoch_is_skipped(yolo_offline: Path, yolo_dataset: Path, tmp_path: Path) -> None:
    """A one-shot NaN gradient on one weight at epoch 1, batch 0: the guard skips that step before it is
    applied and journals it with the batch's four image files; the next step trains on."""
    counter = BatchCounter()

    def arm(trainer: Any) -> None:
        if trainer.epoch == 1 and counter.index == 0:
            handle: Any = None

            def poison(grad: torch.Tensor) -> torch.Tensor:
                handle.remove()
                return torch.full_like(grad, NAN)

            handle = next(trainer.model.parameters()).register_hook(poison)

    guarded, save_dir = train_guarded(tmp_path, yolo_dataset, [*counter.hooks(), ("on_train_batch_start", arm)])
    row = incident(save_dir, "nonfinite_grad")
    assert (row["epoch"], row["batch_index"], row["action"]) == (1, 0, "skip")
    assert row["tensors"] == ["model.0.conv.weight"]
    assert len(row["sample_ids"]) == 4 and all(map(train_image(yolo_dataset), row["sample_ids"]))
    assert [r.applied for r in guarded.results] == [True, True, False, True]
    assert guarded.trainer.ema.updates == 3  # the skipped step never reached the EMA
    assert_finished_clean(guarded, save_dir)


def test_nan_weight_rolls_back_with_lr_backoff_under_warmup(
    yolo_offline: Path, yolo_dataset: Path, tmp_path: Path
) -> None:
    """A NaN written into a weight after epoch 1, batch 0: the next step's loss is NaN, the state scan
    finds the weight, the guard rolls back in process and backs the LR off. With warmup on, Ultralytics
    rewrites the group LRs before every batch; the back-off scales them at step time and puts them back."""
    counter = BatchCounter()
    lrs = LRSpy()
    seen = lrs.seen

    def after_batch(trainer: Any) -> None:
        lrs.after_batch(trainer)
        if trainer.epoch == 1 and counter.index == 0:
            with torch.no_grad():
                next(trainer.model.parameters()).view(-1)[0] = NAN

    guarded, save_dir = train_guarded(
        tmp_path, yolo_dataset,
        [*counter.hooks(), ("on_train_start", lrs.on_train_start), ("on_train_batch_end", after_batch)],
        warmup_epochs=1,
    )
    loss_row = incident(save_dir, "nonfinite_loss")
    model_row = incident(save_dir, "nonfinite_model")
    assert (loss_row["epoch"], loss_row["batch_index"], loss_row["action"]) == (1, 1, "rollback")
    assert (model_row["epoch"], model_row["batch_index"]) == (1, 1)
    assert "model.0.conv.weight" in model_row["tensors"]
    assert "rollback" in action_names(save_dir)
    # Steps applied: 3 before the fault; the rolled-back step is not; every later step runs backed off.
    assert [r.applied for r in guarded.results] == [True, True, True, False]
    assert len(seen) == 3
    factor = guarded.guard.policy.lr_backoff_factor
    for stepped, set_by_trainer in seen:
        assert stepped == pytest.approx(set_by_trainer)  # before the rollback: the trainer's own LRs
    assert guarded.guard.controller.lr_scale(guarded.guard.step_count) == pytest.approx(factor)
    assert_finished_clean(guarded, save_dir)


def test_lr_backoff_scales_the_trainers_lrs_at_step_time(
    yolo_offline: Path, yolo_dataset: Path, tmp_path: Path
) -> None:
    """A rollback in epoch 0 under warmup: the steps after it run at ``lr_backoff_factor`` times the LRs
    that warmup wrote into the param groups, and the groups hold warmup's values again after each step."""
    counter = BatchCounter()
    lrs = LRSpy()
    seen = lrs.seen

    def after_batch(trainer: Any) -> None:
        lrs.after_batch(trainer)
        if trainer.epoch == 0 and counter.index == 0:
            with torch.no_grad():
                next(trainer.model.parameters()).view(-1)[0] = NAN

    guarded, save_dir = train_guarded(
        tmp_path, yolo_dataset,
        [*counter.hooks(), ("on_train_start", lrs.on_train_start), ("on_train_batch_end", after_batch)],
        warmup_epochs=1, epochs=2,
    )
    row = incident(save_dir, "nonfinite_loss")
    assert (row["epoch"], row["batch_index"], row["action"]) == (0, 1, "rollback")
    factor = guarded.guard.policy.lr_backoff_factor
    stepped, set_by_trainer = seen[0]
    assert stepped == pytest.approx(set_by_trainer)
    after = seen[1:]
    assert len(after) == 2
    for stepped, set_by_trainer in after:
        assert stepped == pytest.approx([lr * factor for lr in set_by_trainer])
    assert_finished_clean(guarded, save_dir)


def test_nan_in_ema_is_rolled_back_before_the_save(
    yolo_offline: Path, yolo_dataset: Path, tmp_path: Path
) -> None:
    """NaN written into the EMA after epoch 1, batch 0: no step shows it (the EMA takes no part in the
    loss), so the epoch-end scan finds it and rolls back before validation and saving."""
    counter = BatchCounter()

    def after_batch(trainer: Any) -> None:
        if trainer.epoch == 1 and counter.index == 0:
            with torch.no_grad():
                next(trainer.ema.ema.parameters()).view(-1)[0] = NAN

    guarded, save_dir = train_guarded(tmp_path, yolo_dataset, [*counter.hooks(), ("on_train_batch_end", after_batch)])
    row = incident(save_dir, "nonfinite_ema")
    assert (row["epoch"], row["batch_index"], row["action"]) == (1, 1, "rollback")
    assert "ema.model.0.conv.weight" in row["tensors"]
    assert "rollback" in action_names(save_dir)
    assert_finished_clean(guarded, save_dir)


def test_nan_in_optimizer_state(yolo_offline: Path, yolo_dataset: Path, tmp_path: Path) -> None:
    """NaN written into an AdamW moment after epoch 1, batch 0: the next step spreads it into the weights;
    the epoch-end scan finds model and optimizer state contaminated and rolls back."""
    counter = BatchCounter()

    def after_batch(trainer: Any) -> None:
        if trainer.epoch == 1 and counter.index == 0:
            state = trainer.optimizer.state[next(trainer.model.parameters())]
            state["exp_avg"].view(-1)[0] = NAN

    guarded, save_dir = train_guarded(tmp_path, yolo_dataset, [*counter.hooks(), ("on_train_batch_end", after_batch)])
    row = incident(save_dir, "nonfinite_optimizer")
    assert (row["epoch"], row["batch_index"], row["action"]) == (1, 1, "rollback")
    assert any(t.startswith("optimizer.model.0.conv.weight") for t in row["tensors"])
    assert_finished_clean(guarded, save_dir)


def test_nan_in_epoch_0(yolo_offline: Path, yolo_dataset: Path, tmp_path: Path) -> None:
    """The divergence Ultralytics cannot recover from (a NaN weight in the first epoch; unguarded, 8.4.190
    writes zero-scrubbed checkpoints, see tests/conftest.py ``yolo_scrubbed_run``): the guard rolls back to
    its first snapshot and every checkpoint stays clean."""
    counter = BatchCounter()

    def after_batch(trainer: Any) -> None:
        if trainer.epoch == 0 and counter.index == 0:
            next(trainer.model.parameters()).data.fill_(NAN)

    guarded, save_dir = train_guarded(tmp_path, yolo_dataset, [*counter.hooks(), ("on_train_batch_end", after_batch)])
    row = incident(save_dir, "nonfinite_loss")
    assert (row["epoch"], row["batch_index"], row["action"]) == (0, 1, "rollback")
    assert_finished_clean(guarded, save_dir)


def _poison_checkpoint(path: Path) -> None:
    """Rewrite an Ultralytics checkpoint with one NaN in its optimizer state (never scrubbed on save)."""
    ckpt = torch.load(path, weights_only=False)
    state = next(iter(ckpt["optimizer"]["state"].values()))
    state["exp_avg"].view(-1)[0] = NAN
    torch.save(ckpt, path)


def test_dirty_checkpoints_are_replaced_by_the_pinned_copy(
    yolo_offline: Path, yolo_dataset: Path, tmp_path: Path
) -> None:
    """Ultralytics writes a dirty ``last.pt``/``epochN.pt`` (poisoned by a callback that runs before the
    guard's ``on_model_save``). Epoch 0: no clean copy pinned yet, the journal says so and the file stays
    until the next save. Epoch 2: ``last.pt`` is put back from the pin of epoch 1, and the dirty one is kept in
    quarantine. Bad ``epochN.pt`` files go to quarantine. At the end every ``weights/*.pt`` is clean."""

    def poison(trainer: Any) -> None:
        if trainer.epoch in (0, 2):
            _poison_checkpoint(Path(trainer.last))
            _poison_checkpoint(Path(trainer.wdir) / f"epoch{trainer.epoch}.pt")

    guarded, save_dir = train_guarded(tmp_path, yolo_dataset, before_guard=[("on_model_save", poison)], epochs=3)
    actions = read_actions(save_dir)
    not_replaced = [a for a in actions if a["action"] == "checkpoint_not_replaced"]
    replaced = [a for a in actions if a["action"] == "checkpoint_replaced"]
    quarantined = [a for a in actions if a["action"] == "checkpoint_quarantined"]
    assert [Path(a["detail"]["path"]).name for a in not_replaced] == ["last.pt"]
    assert [Path(a["detail"]["path"]).name for a in replaced] == ["last.pt"]
    assert sorted(Path(a["detail"]["path"]).name for a in quarantined) == ["epoch0.pt", "epoch2.pt"]
    quarantine = save_dir / ".nanguard" / "quarantine"
    assert sorted(p.name for p in quarantine.glob("*.pt")) == ["epoch0.pt", "epoch2.pt", "last.pt"]
    assert replaced[0]["detail"]["quarantined_to"] == str(quarantine / "last.pt")
    assert audit(quarantine / "last.pt").status is Status.DIRTY
    dirty = [r for r in read_checkpoints(save_dir) if r["status"] == "dirty"]
    assert {Path(r["path"]).name for r in dirty} == {"last.pt", "epoch0.pt", "epoch2.pt"}
    assert not (save_dir / "weights" / "epoch0.pt").exists()
    assert_finished_clean(guarded, save_dir)


def test_nan_loss_on_the_last_batch_does_not_trigger_ultralytics_recovery(
    yolo_offline: Path, yolo_dataset: Path, tmp_path: Path
) -> None:
    """A one-shot NaN activation on the last batch of epoch 1 makes that batch's loss NaN. The guard skips
    the step (state stays clean); Ultralytics' epoch-level recovery (8.3.213 on), which reads only the last
    batch's loss, would reload ``last.pt`` and swap ``trainer.ema`` behind the guard. The guard takes it
    over: the journal notes it, no epoch is re-run, the EMA the guard updates is the trainer's."""
    counter = BatchCounter()
    ema_before: list[Any] = []

    def arm(trainer: Any) -> None:
        if trainer.epoch == 1 and counter.index == 1:
            ema_before.append(trainer.ema)
            handle: Any = None

            def poison(module: Any, inputs: Any, output: torch.Tensor) -> torch.Tensor:
                handle.remove()
                return output * NAN

            handle = trainer.model.model[0].register_forward_hook(poison)

    guarded, save_dir = train_guarded(tmp_path, yolo_dataset, [*counter.hooks(), ("on_train_batch_start", arm)],
                                      epochs=3)
    row = incident(save_dir, "nonfinite_loss")
    assert (row["epoch"], row["batch_index"], row["action"]) == (1, 1, "skip")
    taken_over = [a for a in read_actions(save_dir) if a["action"] == "ultralytics_recovery_replaced"]
    assert len(taken_over) == 1 and taken_over[0]["detail"] == {"epoch": 1, "state_clean": True}
    trainer = guarded.trainer
    assert trainer.nan_recovery_attempts == 0
    assert trainer.ema is ema_before[0] and guarded.guard.ema.ema is trainer.ema
    assert [r.applied for r in guarded.results] == [True, True, True, False, True, True]
    assert_finished_clean(guarded, save_dir)


def test_a_crashed_training_closes_the_guard(yolo_offline: Path, yolo_dataset: Path, tmp_path: Path) -> None:
    """An exception inside training: Ultralytics' ``teardown`` (its ``train()`` finally-block) closes the
    guard and its journal, marking the run crashed."""
    import sqlite3

    def boom(trainer: Any) -> None:
        raise RuntimeError("injected crash")

    from ultralytics import YOLO

    from nanguard.integrations.ultralytics import guard

    model = YOLO("yolo11n.yaml")
    guarded = guard(model, policy=Policy(max_grad_norm=10.0))
    model.add_callback("on_train_epoch_end", boom)
    with pytest.raises(RuntimeError, match="injected crash"):
        model.train(data=str(yolo_dataset), epochs=2, imgsz=32, batch=4, nbs=4, device="cpu", workers=0,
                    plots=False, amp=False, project=str(tmp_path), name="run", exist_ok=True, warmup_epochs=0,
                    verbose=False, mosaic=0.0)
    assert guarded.guard is not None and guarded.guard.closed
    db = sqlite3.connect(tmp_path / "run" / ".nanguard" / "journal.db")
    try:
        assert [row[0] for row in db.execute("SELECT status FROM runs")] == ["crashed"]
    finally:
        db.close()


@pytest.mark.parametrize(("text", "expected"), [
    ("8.4.190", (8, 4, 190)), ("8.3.0", (8, 3, 0)), ("8.3.213.dev0", (8, 3, 213)), ("8.4", (8, 4, 0)),
    ("8.4.1rc2", (8, 4, 1)),
])
def test_parse_version(text: str, expected: tuple[int, int, int]) -> None:
    from nanguard.integrations.ultralytics import parse_version

    assert parse_version(text) == expected


def test_gradient_accumulation_records_the_whole_window(
    yolo_offline: Path, yolo_dataset: Path, tmp_path: Path
) -> None:
    """``nbs=8`` with ``batch=4``: Ultralytics accumulates two batches per optimizer step. A NaN gradient
    from the first batch of epoch 1 is caught at the step after the second: the incident carries the
    window's last batch index and the image files of both batches."""
    counter = BatchCounter()

    def arm(trainer: Any) -> None:
        if trainer.epoch == 1 and counter.index == 0:
            handle: Any = None

            def poison(grad: torch.Tensor) -> torch.Tensor:
                handle.remove()
                return torch.full_like(grad, NAN)

            handle = next(trainer.model.parameters()).register_hook(poison)

    guarded, save_dir = train_guarded(tmp_path, yolo_dataset, [*counter.hooks(), ("on_train_batch_start", arm)],
                                      nbs=8)
    row = incident(save_dir, "nonfinite_grad")
    assert (row["epoch"], row["batch_index"], row["action"]) == (1, 1, "skip")
    assert len(row["sample_ids"]) == 8 and len(set(row["sample_ids"])) == 8
    assert [r.applied for r in guarded.results] == [True, False]
    assert_finished_clean(guarded, save_dir)


def make_classify_dataset(root: Path, *, per_class: int = 4, size: int = 32) -> Path:
    """A tiny image-folder classification dataset (``train/`` and ``val/``, two classes); returns its root."""
    import cv2
    import numpy as np

    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for label, level in (("dark", 40), ("bright", 200)):
            folder = root / split / label
            folder.mkdir(parents=True)
            for i in range(per_class):
                image = np.clip(rng.normal(level, 20, (size, size, 3)), 0, 255).astype(np.uint8)
                cv2.imwrite(str(folder / f"{i}.png"), image)
    return root


@pytest.mark.slow
def test_healthy_classify_run_pins_a_clean_last_pt_and_quarantines_nothing(
    yolo_offline: Path, tmp_path: Path
) -> None:
    """A fault-free ``classify`` training pickles torchvision transforms (Compose, CenterCrop, an
    InterpolationMode Enum): every checkpoint audits clean, the guard pins last.pt and best.pt and moves nothing
    to quarantine, and the files load with their real classes."""
    from nanguard.ckpt import load_checkpoint

    data = make_classify_dataset(tmp_path / "data")
    guarded, save_dir = train_guarded(tmp_path, data, model_yaml="yolo11n-cls.yaml")
    assert all(v.status is Status.CLEAN for v in guarded.verdicts), [(v.path.name, v.status) for v in guarded.verdicts]
    assert_all_clean(save_dir)
    pinned = save_dir / ".nanguard" / "pinned"
    assert (pinned / "last.pt").is_file() and (pinned / "best.pt").is_file()
    assert not (save_dir / ".nanguard" / "quarantine").exists()
    assert "checkpoint_quarantined" not in action_names(save_dir)
    epoch0 = audit(save_dir / "weights" / "epoch0.pt")
    assert any(g.startswith("torchvision.transforms.") for g in epoch0.globals)
    assert epoch0.unlisted_globals == () and epoch0.unsafe_globals == ()
    assert type(load_checkpoint(save_dir / "weights" / "last.pt")["model"]).__name__ == "ClassificationModel"


@pytest.mark.slow
def test_resume_goes_on_with_the_guard_state_saved_with_last_pt(
    yolo_offline: Path, yolo_dataset: Path, tmp_path: Path,
) -> None:
    """A training that dies after epoch 1 was saved, resumed with ``resume=True``: the guard starts from the
    state saved beside ``last.pt`` (step count, loss statistics, controller), not from scratch, and the journal
    says so; the finished run's stripped ``last.pt`` has its state again."""
    from ultralytics import YOLO

    from nanguard.ckpt.keeper import guard_state_path, load_guard_state
    from nanguard.integrations.ultralytics import guard

    def crash_after_epoch_1(trainer: Any) -> None:
        if trainer.epoch == 1:
            raise RuntimeError("injected crash after the save")

    with pytest.raises(RuntimeError, match="injected crash"):
        train_guarded(tmp_path, yolo_dataset, [("on_fit_epoch_end", crash_after_epoch_1)], epochs=3)
    save_dir = tmp_path / "run"
    last = save_dir / "weights" / "last.pt"
    saved = load_guard_state(save_dir, last)
    assert saved is not None and saved["step"] == 4 and saved["epoch"] == 1  # two optimizer steps per epoch

    seen: dict[str, Any] = {}
    model = YOLO(str(last))
    guarded = guard(model, policy=Policy(max_grad_norm=10.0))
    model.add_callback("on_train_start", lambda trainer: seen.update(state=guarded.guard.state_dict()))
    model.train(resume=True, data=str(yolo_dataset), device="cpu", workers=0, plots=False)
    assert seen["state"]["step"] == saved["step"]
    assert seen["state"]["controller"] == saved["controller"]
    assert {k: v for k, v in seen["state"].items() if "stats" in k} == {k: v for k, v in saved.items() if "stats" in k}
    assert "guard_state_restored" in action_names(save_dir)
    final = load_guard_state(save_dir, last)  # bound to the stripped file: its sha256 matched
    assert final is not None and final["step"] == 6 and guard_state_path(save_dir, last).is_file()
    assert_all_clean(save_dir)
