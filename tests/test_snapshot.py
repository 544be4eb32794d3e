"""Snapshots are complete and exact: model, optimizer, scheduler, GradScaler and every RNG stream come back
bit for bit, in memory and from disk; buffers are reused; the ring keeps the newest K; files on disk rotate
without ever losing the pinned clean one, load without trust, and survive a crash mid-save; the journal
marks rolled-back incidents and upgrades old journals."""

from __future__ import annotations

import random
import sqlite3
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import Tensor, nn

from nanguard.ckpt import is_allowed_global, load_checkpoint, read_checkpoint, save_checkpoint
from nanguard.errors import JournalError, UnreadableCheckpoint
from nanguard.journal import IncidentRecord, Journal, journal_path, read_incidents, read_snapshots
from nanguard.snapshot import Snapshot, SnapshotRing, capture_rng, copy_state, restore_rng
from nanguard.snapshot_store import SnapshotStore


@dataclass
class Training:
    """A tiny real training loop whose every step draws from python, numpy and torch RNG (and dropout)."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler

    def components(self) -> dict[str, Any]:
        return {"model": self.model, "optimizer": self.optimizer, "scheduler": self.scheduler, "scaler": self.scaler}

    def state(self) -> dict[str, Any]:
        return {name: copy_state(comp.state_dict()) for name, comp in self.components().items()}

    def step(self) -> None:
        x = torch.randn(4, 3, 6, 6) * (1 + np.random.rand()) + random.random()
        loss = self.model(x).square().mean()
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()


def make_training(seed: int = 0) -> Training:
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Dropout(0.3), nn.Flatten(), nn.Linear(64, 2)
    )
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=2, gamma=0.5)
    # growth_interval=1: the scale changes every step, so a restore that missed the scaler would show.
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8, growth_interval=1)
    return Training(model, optimizer, scheduler, scaler)


def assert_same(actual: Any, expected: Any, where: str = "state") -> None:
    """Bit-identical trees: same keys, same types, tensors equal in dtype, shape and every bit."""
    if isinstance(expected, Tensor):
        assert isinstance(actual, Tensor), where
        assert (actual.dtype, actual.shape) == (expected.dtype, expected.shape), where
        bits = (t.detach().cpu().reshape(-1).view(torch.uint8) for t in (actual, expected))
        assert torch.equal(*bits), where
    elif isinstance(expected, Mapping):
        assert isinstance(actual, Mapping) and list(actual) == list(expected), where
        for key in expected:
            assert_same(actual[key], expected[key], f"{where}[{key!r}]")
    elif isinstance(expected, list | tuple):
        assert type(actual) is type(expected) and len(actual) == len(expected), where
        for i, (a, e) in enumerate(zip(actual, expected, strict=True)):
            assert_same(a, e, f"{where}[{i}]")
    else:
        assert actual == expected, where


def draws() -> tuple[float, float, Tensor]:
    return random.random(), float(np.random.rand()), torch.rand(4)


def tensors(tree: Any) -> Iterator[Tensor]:
    if isinstance(tree, Tensor):
        yield tree
    elif isinstance(tree, Mapping):
        for value in tree.values():
            yield from tensors(value)
    elif isinstance(tree, list | tuple):
        for value in tree:
            yield from tensors(value)


def tensor_ptrs(tree: Any) -> Iterator[int]:
    return (t.untyped_storage().data_ptr() for t in tensors(tree))


@pytest.fixture
def training() -> Training:
    random.seed(1)
    np.random.seed(2)
    t = make_training()
    for _ in range(3):
        t.step()
    return t


@pytest.fixture
def journal(tmp_path: Path) -> Iterator[Journal]:
    journal = Journal(tmp_path)
    yield journal
    journal.close()


def make_store(tmp_path: Path, journal: Journal, *, keep: int = 2) -> SnapshotStore:
    return SnapshotStore(tmp_path, journal, journal.start_run(policy={}), keep=keep)


def snapshot_files(tmp_path: Path) -> list[str]:
    return sorted(p.name for p in (tmp_path / ".nanguard" / "snapshots").iterdir())


# ---------------------------------------------------------------------- in memory
def test_restore_after_mutating_everything_gives_bit_identical_state_and_the_same_random_numbers(
    training: Training,
) -> None:
    expected = training.state()
    snap = Snapshot.capture(3, training.components(), extra={"data": {"epoch": 1, "index": 7}})
    expected_draws = draws()
    for _ in range(3):  # weights, AdamW moments, scheduler, scale and BatchNorm statistics all move
        training.step()
    assert training.scaler.state_dict()["scale"] != expected["scaler"]["scale"]
    assert training.scheduler.state_dict()["last_epoch"] != expected["scheduler"]["last_epoch"]

    snap.restore(training.components())

    assert_same(training.state(), expected)
    assert_same(draws(), expected_draws)
    assert snap.extra == {"data": {"epoch": 1, "index": 7}}


def test_training_continued_after_a_restore_replays_bit_identically(training: Training) -> None:
    snap = Snapshot.capture(3, training.components())
    for _ in range(4):
        training.step()
    first_run = training.state()
    snap.restore(training.components())
    for _ in range(4):
        training.step()
    assert_same(training.state(), first_run)


def test_a_snapshot_can_be_restored_twice(training: Training) -> None:
    # The optimizer keeps the tensors load_state_dict gets; the snapshot must not become its live state.
    expected = training.state()
    snap = Snapshot.capture(3, training.components())
    for _ in range(2):
        training.step()
        snap.restore(training.components())
    assert_same(training.state(), expected)


def test_restore_with_rng_false_leaves_the_random_streams_alone(training: Training) -> None:
    snap = Snapshot.capture(3, training.components())
    state = capture_rng()
    expected_draws = draws()
    restore_rng(state)
    snap.restore(training.components(), rng=False)
    assert_same(draws(), expected_draws)


def test_capture_reuses_the_previous_snapshots_buffers(training: Training) -> None:
    extra = {"stats": torch.arange(5.0), "position": 3}
    first = Snapshot.capture(3, training.components(), extra=extra)
    ptrs = list(tensor_ptrs([first.states, first.extra]))
    live = set(tensor_ptrs([comp.state_dict() for comp in training.components().values()]))
    assert ptrs and not live & set(ptrs)  # copies, not views of the live tensors
    training.step()
    expected = training.state()

    second = Snapshot.capture(4, training.components(), extra=extra, reuse=first)

    assert list(tensor_ptrs([second.states, second.extra])) == ptrs  # same storage: nothing allocated
    assert_same(second.states, expected)
    assert all(t.device.type == "cpu" for t in tensors(second.states))


def test_restore_names_a_component_missing_from_the_snapshot(training: Training) -> None:
    snap = Snapshot.capture(3, {"model": training.model})
    with pytest.raises(KeyError, match="'optimizer'"):
        snap.restore(training.components())


def test_restore_rng_rejects_an_unknown_version() -> None:
    with pytest.raises(ValueError, match="version 99"):
        restore_rng({**capture_rng(), "version": 99})


# ---------------------------------------------------------------------- ring
def test_ring_keeps_the_newest_k_and_reuses_the_oldest_buffers(training: Training) -> None:
    ring = SnapshotRing(2)
    oldest = ring.add(0, training.components(), extra={"guard": {"step": 0}})
    oldest_ptrs = list(tensor_ptrs(oldest.states))
    ring.add(1, training.components(), extra={"guard": {"step": 1}})
    training.step()

    newest = ring.add(2, training.components(), extra={"guard": {"step": 2}})

    assert len(ring) == 2
    assert [s.step for s in ring] == [1, 2]
    assert list(tensor_ptrs(newest.states)) == oldest_ptrs
    assert ring.newest() is newest and newest.extra == {"guard": {"step": 2}}
    assert ring.newest(at_or_before_step=1) is not None and ring.newest(at_or_before_step=1).step == 1  # type: ignore[union-attr]
    assert ring.newest(at_or_before_step=0) is None


def test_ring_drop_after_discards_newer_snapshots_and_reuses_their_buffers(training: Training) -> None:
    ring = SnapshotRing(3)
    for step in (0, 5, 10):
        ring.add(step, training.components())
    dropped_ptrs = list(tensor_ptrs(ring.newest().states))  # type: ignore[union-attr]

    assert ring.drop_after(5) == 1
    assert [s.step for s in ring] == [0, 5] and ring.newest().step == 5  # type: ignore[union-attr]
    replayed = ring.add(7, training.components())
    assert list(tensor_ptrs(replayed.states)) == dropped_ptrs
    ring.add(5, training.components())  # a capture at an earlier step supersedes everything from it on
    assert [s.step for s in ring] == [0, 5]
    assert ring.drop_after(-1) == 2 and len(ring) == 0 and ring.newest() is None


def test_ring_capacity_below_one_is_a_value_error() -> None:
    with pytest.raises(ValueError, match="capacity must be >= 1, got 0"):
        SnapshotRing(0)


# ---------------------------------------------------------------------- on disk
def test_disk_round_trip_is_bit_identical_and_restores_like_the_in_memory_snapshot(
    training: Training, tmp_path: Path, journal: Journal
) -> None:
    store = make_store(tmp_path, journal)
    extra = {"guard": {"version": 2, "step": 3, "stats": torch.tensor([1.5, 2.5])}, "data": None}
    snap = Snapshot.capture(3, training.components(), extra=extra)
    expected_draws = draws()
    expected = training.state()

    path = store.save(snap, clean=True, epoch=0, batch_index=3)
    loaded = store.load(path)

    assert path == tmp_path / ".nanguard" / "snapshots" / "step-000000003.pt"
    assert loaded.step == 3
    assert_same(loaded.states, snap.states)
    assert_same(loaded.rng, snap.rng)
    assert_same(loaded.extra, snap.extra)
    other = make_training(seed=7)  # a fresh process's different state
    loaded.restore(other.components())
    assert_same(other.state(), expected)
    assert_same(draws(), expected_draws)
    (row,) = read_snapshots(tmp_path)
    assert (row["step"], row["epoch"], row["batch_index"], row["clean"], row["pinned"], row["deleted"]) == (
        3, 0, 3, True, True, False
    )
    assert row["path"] == ".nanguard/snapshots/step-000000003.pt" and row["size"] == path.stat().st_size


def test_snapshot_file_loads_without_trust_and_names_only_allowlisted_globals(
    training: Training, tmp_path: Path, journal: Journal
) -> None:
    store = make_store(tmp_path, journal)
    path = store.save(Snapshot.capture(3, training.components(), extra={"guard": {"step": 3}}), clean=True)
    globals_ = read_checkpoint(path).globals
    assert globals_ and all(is_allowed_global(g) for g in globals_), globals_
    data = load_checkpoint(path)  # trust=False
    assert data["format"] == "nanguard.snapshot" and data["version"] == 1


def test_save_rejects_a_value_that_would_need_trust_before_writing_anything(
    training: Training, tmp_path: Path, journal: Journal
) -> None:
    class Opaque:
        pass

    store = make_store(tmp_path, journal)
    snap = Snapshot.capture(3, training.components(), extra={"guard": {"thing": Opaque()}})
    with pytest.raises(TypeError, match=r"\['extra'\]\['guard'\]\['thing'\].*Opaque is not a plain value"):
        store.save(snap, clean=True)
    assert read_snapshots(tmp_path) == []
    assert not (tmp_path / ".nanguard" / "snapshots").exists()


def test_load_refuses_a_file_that_is_not_a_snapshot(tmp_path: Path, journal: Journal) -> None:
    store = make_store(tmp_path, journal)
    path = save_checkpoint({"model": {"w": torch.ones(2)}}, tmp_path / "other.pt")
    with pytest.raises(UnreadableCheckpoint, match="not a nanguard snapshot"):
        store.load(path)


def test_rotation_keeps_keep_files_and_never_deletes_the_pinned_clean_one(
    training: Training, tmp_path: Path, journal: Journal
) -> None:
    store = make_store(tmp_path, journal, keep=2)
    store.save(Snapshot.capture(10, training.components()), clean=True)
    for step in (20, 30, 40):
        store.save(Snapshot.capture(step, training.components()), clean=False)

    assert snapshot_files(tmp_path) == ["step-000000010.pt", "step-000000030.pt", "step-000000040.pt"]
    rows = {row["step"]: row for row in read_snapshots(tmp_path)}
    assert [s for s, r in rows.items() if r["deleted"]] == [20]
    assert [s for s, r in rows.items() if r["pinned"]] == [10]
    assert store.newest_clean() == tmp_path / ".nanguard" / "snapshots" / "step-000000010.pt"

    store.save(Snapshot.capture(50, training.components()), clean=True)  # the pin moves; 10 may go now
    assert snapshot_files(tmp_path) == ["step-000000040.pt", "step-000000050.pt"]
    assert [r["step"] for r in read_snapshots(tmp_path) if r["pinned"]] == [50]


def test_a_dirty_save_of_the_pinned_step_does_not_overwrite_it(
    training: Training, tmp_path: Path, journal: Journal
) -> None:
    store = make_store(tmp_path, journal, keep=2)
    expected = training.state()["model"]
    clean = store.save(Snapshot.capture(10, training.components()), clean=True)
    training.step()
    dirty = store.save(Snapshot.capture(10, training.components()), clean=False)
    assert dirty.name == "step-000000010-2.pt"
    assert store.newest_clean() == clean
    assert_same(store.load(clean).states["model"], expected)


def test_keep_below_two_is_a_value_error(tmp_path: Path, journal: Journal) -> None:
    with pytest.raises(ValueError, match="keep must be >= 2, got 1"):
        make_store(tmp_path, journal, keep=1)


def test_newest_clean_ignores_a_missing_or_corrupted_file(training: Training, tmp_path: Path, journal: Journal) -> None:
    store = make_store(tmp_path, journal, keep=3)
    first = store.save(Snapshot.capture(10, training.components()), clean=True)
    second = store.save(Snapshot.capture(20, training.components()), clean=True)
    store.save(Snapshot.capture(30, training.components()), clean=False)
    assert store.newest_clean() == second
    assert store.newest_clean(at_or_before_step=15) == first

    data = bytearray(second.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, different bytes
    second.write_bytes(bytes(data))
    assert store.newest_clean() == first
    first.unlink()
    assert store.newest_clean() is None


def test_a_crash_mid_save_leaves_the_previous_files_and_journal_rows_intact(
    training: Training, tmp_path: Path, journal: Journal, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = make_store(tmp_path, journal, keep=2)
    store.save(Snapshot.capture(10, training.components()), clean=True)
    store.save(Snapshot.capture(20, training.components()), clean=True)
    files, rows = snapshot_files(tmp_path), read_snapshots(tmp_path)
    contents = {name: (tmp_path / ".nanguard" / "snapshots" / name).read_bytes() for name in files}

    def torch_save_that_dies(obj: Any, f: Any, *args: Any, **kwargs: Any) -> None:
        f.write(b"PK\x03\x04 half a zip")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", torch_save_that_dies)
    with pytest.raises(OSError, match="No space left"):
        store.save(Snapshot.capture(30, training.components()), clean=True)  # would have rotated 10 away
    monkeypatch.undo()

    assert snapshot_files(tmp_path) == files  # no temp file left, nothing rotated
    assert {n: (tmp_path / ".nanguard" / "snapshots" / n).read_bytes() for n in files} == contents
    assert read_snapshots(tmp_path) == rows
    assert store.newest_clean() == tmp_path / ".nanguard" / "snapshots" / "step-000000020.pt"


# ---------------------------------------------------------------------- journal
def test_mark_rolled_back_marks_each_incident_of_the_run_from_the_step_on_once(
    journal: Journal, tmp_path: Path
) -> None:
    run, other = journal.start_run(policy={}), journal.start_run(policy={})
    for step in (3, 5, 8):
        journal.record_incident(run, IncidentRecord(kind="nonfinite_loss", step=step, action="skip"))
    journal.record_incident(other, IncidentRecord(kind="nonfinite_loss", step=6, action="skip"))

    assert journal.mark_rolled_back(run, from_step=5) == 2
    assert journal.mark_rolled_back(run, from_step=5) == 0  # already marked
    assert [(i["step"], i["rolled_back"]) for i in read_incidents(tmp_path)] == [
        (3, False), (5, True), (8, True), (6, False)
    ]
    assert journal.mark_rolled_back(run, 0) == 1
    assert len(read_incidents(tmp_path)) == 4  # marked, never deleted


def test_opening_a_journal_without_the_rolled_back_column_adds_it(tmp_path: Path) -> None:
    journal = Journal(tmp_path)
    journal.record_incident(journal.start_run(policy={}), IncidentRecord(kind="loss_spike", step=4, action="skip"))
    journal.close()
    # Make it the journal the previous nanguard wrote: no rolled_back column, no snapshots table.
    with sqlite3.connect(journal_path(tmp_path)) as db:
        db.execute("ALTER TABLE incidents DROP COLUMN rolled_back")
        db.execute("DROP TABLE snapshots")
    db.close()
    assert [i["rolled_back"] for i in read_incidents(tmp_path)] == [False]  # read-only readers cope
    assert read_snapshots(tmp_path) == []

    journal = Journal(tmp_path)
    with sqlite3.connect(journal_path(tmp_path)) as db:
        columns = [row[1] for row in db.execute("PRAGMA table_info(incidents)")]
    db.close()
    assert columns[-1] == "rolled_back"
    assert journal.mark_rolled_back(1, from_step=0) == 1
    journal.close()
    assert [i["rolled_back"] for i in read_incidents(tmp_path)] == [True]
    Journal(tmp_path).close()  # opening an upgraded journal again changes nothing


GUARDED_CHILD = """
import sys, time
import torch
import nanguard
model = torch.nn.Linear(2, 1)
guard = nanguard.Guard(model, torch.optim.SGD(model.parameters(), lr=0.1), run_dir=sys.argv[1],
                       policy=nanguard.Policy(check_every_steps=1, disk_snapshot_every_steps=1))
for _ in range(4):
    loss = model(torch.ones(1, 2)).sum()
    loss.backward()
    guard.step(loss)
print("ready", flush=True)
if sys.argv[2] == "hold":
    time.sleep(120)
guard.close()
"""


def _guard(run_dir: Path) -> Any:
    import nanguard

    model = nn.Linear(2, 1)
    return nanguard.Guard(model, torch.optim.SGD(model.parameters(), lr=0.1), run_dir=run_dir,
                          policy=nanguard.Policy(disk_snapshot_every_steps=1))


@pytest.mark.slow
def test_a_second_guard_writing_snapshots_into_the_same_run_dir_is_refused_until_the_first_dies(tmp_path: Path) -> None:
    import os
    import subprocess
    import sys

    from nanguard.errors import ExitCode
    from nanguard.journal import read_runs
    from nanguard.runs import RunLocked

    src = str(Path(__file__).resolve().parents[1] / "src")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([src, os.environ.get("PYTHONPATH", "")])}
    child = subprocess.Popen([sys.executable, "-c", GUARDED_CHILD, str(tmp_path), "hold"], stdout=subprocess.PIPE,
                             env=env)
    try:
        assert child.stdout is not None and child.stdout.readline() == b"ready\n"
        runs, files = len(read_runs(tmp_path)), snapshot_files(tmp_path)
        assert files  # the child wrote snapshots
        with pytest.raises(RunLocked, match=f"guard.lock: .*pid {child.pid}") as refused:
            _guard(tmp_path)
        assert refused.value.exit_code == ExitCode.LOCKED and "\n" not in str(refused.value)
        assert (len(read_runs(tmp_path)), snapshot_files(tmp_path)) == (runs, files)  # refused before writing
        live = [row for row in read_snapshots(tmp_path) if not row["deleted"]]
        assert all(file_sha(tmp_path / row["path"]) == row["sha256"] for row in live)
    finally:
        child.kill()
        child.wait()
    first = _guard(tmp_path)  # the dead holder's lock is gone with it
    with pytest.raises(RunLocked):
        _guard(tmp_path)  # a second Guard of the same process too
    first.close()
    _guard(tmp_path).close()


def file_sha(path: Path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_rotation_never_deletes_a_file_outside_the_run_folder_that_a_journal_row_names(
    training: Training, tmp_path: Path
) -> None:
    run = tmp_path / "run"
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    journal = Journal(run)
    run_id = journal.start_run(policy={})
    journal.record_snapshot(run_id, step=1, path="../victim.txt", sha256="0" * 64, size=7, clean=False)
    store = SnapshotStore(run, journal, run_id, keep=2)
    with pytest.raises(JournalError, match=r"snapshots row 1: path is not a relative path inside the run folder"):
        for step in (10, 20, 30):
            store.save(Snapshot.capture(step, training.components()), clean=False)
    journal.close()
    assert victim.read_text() == "keep me"
