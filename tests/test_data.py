"""BatchStream and SkipList: positions, exact rewinds, skips, checkpointable state (src/nanguard/data.py).

Every test drives real DataLoaders over small real datasets. ``train`` stands for a training loop: after
each batch it draws from the global torch RNG as dropout would, and a "snapshot" is the stream's state plus
the global RNG state, as the guard's snapshot holds them; ``resume`` restores both, as a rollback does.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, DistributedSampler, IterableDataset, TensorDataset

from nanguard.data import Batch, BatchStream, SkipList

# torchdata's StatefulDataLoader calls a deprecated torch API on construction; not ours to fix
pytestmark = pytest.mark.filterwarnings("ignore:'set_vital' is deprecated:UserWarning")

Step = tuple[int, int, Any, list[int] | None, Tensor]  # epoch, index, data, sample ids, the "dropout" draw
Snapshot = tuple[dict[str, Any], Tensor]


def tensors(n: int = 12) -> TensorDataset:
    return TensorDataset(torch.randn(n, 3, generator=torch.Generator().manual_seed(123)), torch.arange(n))


class Recording(Dataset[tuple[Tensor, Tensor]]):
    """A map-style dataset that records every index it loads (use with ``num_workers=0``)."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.fetched: list[int] = []

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor]:
        self.fetched.append(i)
        return torch.full((2,), float(i)), torch.tensor(i)


class Noisy(Dataset[tuple[Tensor, Tensor]]):
    """A map-style dataset with a random transform, drawn where the sample is loaded (a worker or the main process)."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor]:
        return torch.tensor([float(i)]), torch.rand(1)


class Stream(IterableDataset[Tensor]):
    """An IterableDataset whose values draw from the global RNG when its iterator is made."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __iter__(self) -> Iterator[Tensor]:
        return iter(torch.arange(self.n, dtype=torch.float32) + torch.rand(self.n))


def train(stream: BatchStream) -> tuple[list[Step], list[Snapshot]]:
    """Run to the end; return each step and the snapshot taken after it."""
    steps: list[Step] = []
    snaps: list[Snapshot] = []
    for b in stream:
        steps.append((b.epoch, b.index, b.data, b.sample_ids, torch.rand(1)))
        snaps.append((stream.state_dict(), torch.get_rng_state()))
    return steps, snaps


def resume(stream: BatchStream, snap: Snapshot) -> list[Step]:
    state, rng = snap
    torch.set_rng_state(rng)  # the snapshot restores the model-side RNG streams
    stream.load_state_dict(state)
    return train(stream)[0]


def same(a: Any, b: Any) -> bool:
    if isinstance(a, Tensor):
        return isinstance(b, Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, list | tuple):
        return type(a) is type(b) and len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    return bool(a == b)


def assert_same_steps(got: list[Step], want: list[Step]) -> None:
    assert [s[:2] for s in got] == [s[:2] for s in want]
    for g, w in zip(got, want, strict=True):
        assert same(g, w), f"batch (epoch {w[0]}, index {w[1]}) differs on replay"


def shuffled() -> DataLoader[Any]:
    return DataLoader(tensors(), batch_size=3, shuffle=True)


def seeded_generator() -> DataLoader[Any]:
    return DataLoader(tensors(), batch_size=3, shuffle=True, generator=torch.Generator().manual_seed(7))


def distributed() -> DataLoader[Any]:
    dataset = tensors()
    return DataLoader(dataset, batch_size=2, sampler=DistributedSampler(dataset, num_replicas=2, rank=0, shuffle=True))


def unbatched() -> DataLoader[Any]:
    return DataLoader(tensors(6), batch_size=None, shuffle=True)


LOADERS = [shuffled, seeded_generator, distributed, unbatched]


@pytest.mark.parametrize("make", LOADERS)
def test_two_runs_from_the_same_seed_yield_identical_batches(make: Callable[[], DataLoader[Any]]) -> None:
    torch.manual_seed(0)
    first, _ = train(BatchStream(make(), epochs=2))
    torch.manual_seed(0)
    second, _ = train(BatchStream(make(), epochs=2))
    assert_same_steps(second, first)
    per_epoch = len(first) // 2
    assert not same(first[0][2], first[per_epoch][2]), "each epoch should have its own shuffle"


@pytest.mark.parametrize("make", LOADERS)
def test_rewind_mid_epoch_and_to_an_earlier_epoch_replays_the_same_batches(
    make: Callable[[], DataLoader[Any]],
) -> None:
    torch.manual_seed(0)
    stream = BatchStream(make(), epochs=3)
    steps, snaps = train(stream)
    per_epoch = len(steps) // 3
    # every position of the run: mid-epoch, each epoch boundary, and back from the end into epoch 0
    for k in range(len(steps) - 1):
        assert_same_steps(resume(stream, snaps[k]), steps[k + 1 :])
    assert snaps[per_epoch - 1][0]["epoch"] == 1 and snaps[per_epoch - 1][0]["index"] == 0


def test_rewind_with_two_workers_replays_the_order_and_worker_randomness_from_an_epoch_start() -> None:
    torch.manual_seed(0)
    stream = BatchStream(DataLoader(Noisy(8), batch_size=2, shuffle=True, num_workers=2), epochs=2)
    steps, snaps = train(stream)
    assert len(steps) == 8
    # from an epoch boundary everything replays, the noise drawn in the workers included
    assert_same_steps(resume(stream, snaps[3]), steps[4:])
    # mid-epoch the order, the data and the main-process draws replay; worker noise is the documented limit
    replay = resume(stream, snaps[1])
    assert [s[:2] for s in replay] == [s[:2] for s in steps[2:]]
    for got, want in zip(replay, steps[2:], strict=True):
        assert torch.equal(got[2][0], want[2][0]) and torch.equal(got[4], want[4])
    torch.manual_seed(0)
    again, _ = train(BatchStream(DataLoader(Noisy(8), batch_size=2, shuffle=True, num_workers=2), epochs=2))
    assert_same_steps(again, steps)


def test_fast_forward_loads_no_batch_it_passes_over() -> None:
    torch.manual_seed(0)
    dataset = Recording(12)
    steps, snaps = train(BatchStream(DataLoader(dataset, batch_size=3, shuffle=True), epochs=2))
    tail = steps[6:]  # epoch 1 from index 2 on
    wanted = [i for s in tail for i in s[3] or []]
    # a fresh stream over a fresh loader jumps to the saved position: only the batches from there are loaded
    dataset.fetched.clear()
    fresh = BatchStream(DataLoader(dataset, batch_size=3, shuffle=True), epochs=2)
    assert_same_steps(resume(fresh, snaps[5]), tail)
    assert dataset.fetched == wanted
    # the same for a rewind of the stream that ran
    dataset.fetched.clear()
    assert_same_steps(resume(fresh, snaps[5]), tail)
    assert dataset.fetched == wanted


def test_skip_windows_across_an_epoch_boundary_are_neither_loaded_nor_yielded() -> None:
    # no draws between batches here: skipping changes how many steps draw, hence later epochs' shuffles
    torch.manual_seed(0)
    reference = list(BatchStream(DataLoader(Recording(8), batch_size=2, shuffle=True), epochs=2))
    skip = SkipList()
    skip.add_window(0, 2, 3)
    skip.add_window(1, 0, 0)
    dataset = Recording(8)
    torch.manual_seed(0)
    batches = list(BatchStream(DataLoader(dataset, batch_size=2, shuffle=True), epochs=2, skip=skip))
    kept = [b for b in reference if not skip.skips_batch(b.epoch, b.index)]
    assert [(b.epoch, b.index) for b in batches] == [(0, 0), (0, 1), (1, 1), (1, 2), (1, 3)]
    for got, want in zip(batches, kept, strict=True):  # positions stay comparable with the run that fed everything
        assert (got.epoch, got.index, got.sample_ids) == (want.epoch, want.index, want.sample_ids)
        assert same(got.data, want.data)
    assert dataset.fetched == [i for b in kept for i in b.sample_ids or []]


def test_a_window_added_while_iterating_applies_to_the_batches_not_yet_fetched() -> None:
    skip = SkipList()
    stream = BatchStream(DataLoader(Recording(8), batch_size=2), epochs=1, skip=skip)
    seen = []
    for b in stream:
        seen.append(b.index)
        if b.index == 0:
            skip.add_window(0, 2, 2)
    assert seen == [0, 1, 3]


def test_sample_id_skips_are_removed_before_loading_and_an_emptied_batch_is_skipped() -> None:
    dataset = Recording(8)
    skip = SkipList()
    skip.add_samples([3, 6, torch.tensor(7)])
    batches = list(BatchStream(DataLoader(dataset, batch_size=2), epochs=1, skip=skip))
    assert [(b.index, b.sample_ids) for b in batches] == [(0, [0, 1]), (1, [2]), (2, [4, 5])]
    assert torch.equal(batches[1].data[1], torch.tensor([2]))
    assert sorted(dataset.fetched) == [0, 1, 2, 4, 5]


@pytest.mark.parametrize("stateful", [False, True], ids=["DataLoader", "StatefulDataLoader"])
def test_rewind_during_iteration_makes_the_running_loop_yield_the_saved_position_next(stateful: bool) -> None:
    from torchdata.stateful_dataloader import StatefulDataLoader

    torch.manual_seed(0)
    loader_type = StatefulDataLoader if stateful else DataLoader
    stream = BatchStream(loader_type(tensors(), batch_size=3, shuffle=True), epochs=2)
    seen: list[Batch] = []
    saved: Snapshot | None = None
    for b in stream:
        seen.append(b)
        torch.rand(1)
        if len(seen) == 2:
            saved = (stream.state_dict(), torch.get_rng_state())
        if len(seen) == 6:
            assert saved is not None
            torch.set_rng_state(saved[1])
            stream.load_state_dict(saved[0])
    first_pass, replay = seen[2:6], seen[6:]
    assert len(seen) == 8 + 4  # 4 batches per epoch, 2 epochs, and the 4 fed again
    assert (
        [(b.epoch, b.index) for b in replay[:4]]
        == [(b.epoch, b.index) for b in first_pass]
        == [(0, 2), (0, 3), (1, 0), (1, 1)]
    )
    assert all(same(a.data, b.data) for a, b in zip(replay[:4], first_pass, strict=True))


def test_state_dict_survives_torch_save_and_a_weights_only_load() -> None:
    torch.manual_seed(0)
    skip = SkipList()
    skip.add_window(1, 1, 1)
    skip.add_samples([4])
    stream = BatchStream(seeded_generator(), epochs=2, skip=skip)
    steps, snaps = train(stream)
    buffer = io.BytesIO()
    torch.save({"stream": snaps[2][0], "rng": snaps[2][1], "skip": skip.state_dict()}, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=True)
    fresh_skip = SkipList()
    fresh_skip.load_state_dict(loaded["skip"])
    # a new loader with a differently seeded generator: the state puts the generator back
    loader = DataLoader(tensors(), batch_size=3, shuffle=True, generator=torch.Generator().manual_seed(99))
    fresh = BatchStream(loader, epochs=2, skip=fresh_skip)
    assert_same_steps(resume(fresh, (loaded["stream"], loaded["rng"])), steps[3:])


def test_statefuldataloader_rewinds_through_its_own_state_and_drops_skipped_windows() -> None:
    from torchdata.stateful_dataloader import StatefulDataLoader

    def make() -> StatefulDataLoader:
        return StatefulDataLoader(tensors(), batch_size=3, shuffle=True)

    torch.manual_seed(0)
    skip = SkipList()
    skip.add_window(1, 2, 2)
    stream = BatchStream(make(), epochs=3, skip=skip)
    steps, snaps = train(stream)
    assert [s[:2] for s in steps[:5]] == [(0, 0), (0, 1), (0, 2), (0, 3), (1, 0)]
    assert (1, 2) not in [s[:2] for s in steps] and all(s[3] is None for s in steps)
    for k in (1, 3, 4, 6, 9):  # mid-epoch, after an epoch's last batch, before and after the skipped window
        assert_same_steps(resume(stream, snaps[k]), steps[k + 1 :])
    buffer = io.BytesIO()
    torch.save(snaps[5], buffer)
    buffer.seek(0)
    fresh = BatchStream(make(), epochs=3, skip=skip)
    assert_same_steps(resume(fresh, torch.load(buffer, weights_only=True)), steps[6:])


def test_iterabledataset_rewinds_to_epoch_starts_only() -> None:
    torch.manual_seed(0)
    stream = BatchStream(DataLoader(Stream(6), batch_size=2), epochs=3)
    steps, snaps = train(stream)
    assert [s[:2] for s in steps[:4]] == [(0, 0), (0, 1), (0, 2), (1, 0)]
    assert all(s[3] is None for s in steps)
    assert (snaps[2][0]["epoch"], snaps[2][0]["index"]) == (1, 0)  # known as an epoch start: fetched one ahead
    assert_same_steps(resume(stream, snaps[2]), steps[3:])
    with pytest.raises(ValueError, match="IterableDataset cannot be rewound mid-epoch"):
        stream.load_state_dict(snaps[3][0])


def test_bad_input_is_refused_with_the_offending_value() -> None:
    with pytest.raises(TypeError, match="list"):
        BatchStream([1, 2, 3])  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="epochs"):
        BatchStream(shuffled(), epochs=0)
    stream = BatchStream(shuffled())
    with pytest.raises(ValueError, match="version"):
        stream.load_state_dict({**stream.state_dict(), "version": 2})
    with pytest.raises(ValueError, match="'iterable'"):
        stream.load_state_dict(BatchStream(DataLoader(Stream(4), batch_size=2)).state_dict())
    with pytest.raises(ValueError, match="no batches"):
        next(iter(BatchStream(DataLoader(tensors(0), batch_size=2))))


def test_skiplist_merges_windows_counts_entries_and_round_trips() -> None:
    skip = SkipList()
    assert not skip and len(skip) == 0
    skip.add_window(0, 5, 7)
    skip.add_window(0, 2, 4)
    skip.add_window(2, 0, 0)
    skip.add_samples(range(3))
    assert skip.windows == [(0, 2, 7), (2, 0, 0)]
    assert skip and len(skip) == 5
    assert skip.skips_batch(0, 7) and not skip.skips_batch(0, 8) and not skip.skips_batch(1, 3)
    copy = SkipList()
    copy.load_state_dict(skip.state_dict())
    assert copy.windows == skip.windows and copy.sample_ids == frozenset({0, 1, 2})
    with pytest.raises(ValueError, match="last"):
        skip.add_window(0, 3, 1)
    with pytest.raises(ValueError, match="epoch"):
        skip.add_window(-1, 0, 0)
