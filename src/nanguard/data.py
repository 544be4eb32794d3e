"""data.py owns the data side of exact rollback: a batch stream that knows its position and can be rewound.

:class:`BatchStream` wraps a DataLoader and yields :class:`Batch` values that carry their epoch, their index
in the epoch's full batch order and, for map-style datasets, their sample ids. Its ``state_dict`` is the
position of the next batch plus what rebuilds the epoch's order; loading one makes the next batch yielded,
also by a loop already running, the one at that position, without loading the batches passed over.
:class:`SkipList` names the batches and samples never fed again.

It does not own the decision to roll back (the guard), the model-side RNG streams (python, numpy, torch,
CUDA: the snapshot restores them), or any state a dataset keeps itself. It imports torch only; torchdata is
imported when a loader might be a ``StatefulDataLoader``.
"""

from __future__ import annotations

import operator
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, SupportsIndex

import torch
from torch.utils.data import DataLoader, IterableDataset, Sampler

_VERSION = 1
_MAP, _ITERABLE, _STATEFUL = "map", "iterable", "stateful"
_END = object()  # what next(iterator, _END) returns at the end of an epoch
_NOTHING = object()  # no batch fetched ahead yet


@dataclass(frozen=True)
class Batch:
    """One batch and where it sits in the run's data order.

    Attributes:
        data: exactly what the DataLoader yields for this batch.
        epoch: the epoch it belongs to.
        index: its position in the epoch's full batch order, skipped batches included, so positions compare
            between a run that skipped and one that did not.
        sample_ids: the dataset indices of its samples, for map-style datasets; else ``None``.
    """

    data: Any
    epoch: int
    index: int
    sample_ids: list[int] | None = None


class SkipList:
    """Batches and samples never fed again: windows ``(epoch, first, last)``, ``last`` included, and sample ids.

    The list is shared between the caller and the stream, which reads it as it hands each batch to the
    loader, so what is added while a loop runs applies to every batch not fetched yet. It is not part of a
    stream's position: a rollback keeps what was added after the snapshot, which is the point of it. Windows
    of one epoch that overlap or touch are merged; a span across epochs is one window per epoch.
    """

    def __init__(self) -> None:
        self._windows: dict[int, list[tuple[int, int]]] = {}
        self._sample_ids: set[int] = set()

    def add_window(self, epoch: int, first: int, last: int) -> None:
        """Skip the batches ``first`` to ``last`` (included) of ``epoch``."""
        for name, value in (("epoch", epoch), ("first", first), ("last", last)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be an int >= 0, got {value!r}")
        if last < first:
            raise ValueError(f"last must be >= first, got first={first!r}, last={last!r}")
        merged: list[tuple[int, int]] = []
        for lo, hi in sorted([*self._windows.get(epoch, []), (first, last)]):
            if merged and lo <= merged[-1][1] + 1:
                merged[-1] = (merged[-1][0], max(merged[-1][1], hi))
            else:
                merged.append((lo, hi))
        self._windows[epoch] = merged

    def add_samples(self, ids: Iterable[SupportsIndex]) -> None:
        """Skip these dataset indices wherever they occur (map-style datasets only)."""
        new = {operator.index(i) for i in ids}  # operator.index also takes 0-d integer tensors
        if any(i < 0 for i in new):
            raise ValueError(f"sample ids must be >= 0, got {sorted(i for i in new if i < 0)!r}")
        self._sample_ids |= new

    def skips_batch(self, epoch: int, index: int) -> bool:
        """Whether batch ``index`` of ``epoch`` lies in a window."""
        return any(lo <= index <= hi for lo, hi in self._windows.get(epoch, ()))

    def skips_sample(self, sample_id: int) -> bool:
        """Whether the dataset index ``sample_id`` is skipped."""
        return sample_id in self._sample_ids

    @property
    def windows(self) -> list[tuple[int, int, int]]:
        """Every window as ``(epoch, first, last)``, sorted."""
        return [(e, lo, hi) for e in sorted(self._windows) for lo, hi in self._windows[e]]

    @property
    def sample_ids(self) -> frozenset[int]:
        """The skipped dataset indices."""
        return frozenset(self._sample_ids)

    def __len__(self) -> int:
        """The number of windows plus the number of skipped sample ids."""
        return sum(len(w) for w in self._windows.values()) + len(self._sample_ids)

    def __bool__(self) -> bool:
        return bool(self._windows or self._sample_ids)

    def __repr__(self) -> str:
        return f"SkipList(windows={self.windows!r}, sample_ids={sorted(self._sample_ids)!r})"

    def state_dict(self) -> dict[str, Any]:
        return {"version": _VERSION, "windows": [list(w) for w in self.windows], "sample_ids": sorted(self._sample_ids)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Replace the contents in place, so every stream sharing this list sees them."""
        _check_version(state, "SkipList")
        loaded = SkipList()
        for epoch, first, last in state["windows"]:
            loaded.add_window(epoch, first, last)
        loaded.add_samples(state["sample_ids"])
        self._windows, self._sample_ids = loaded._windows, loaded._sample_ids


class BatchStream:
    """The batches of a DataLoader across epochs, each labelled with its position; rewindable to any position.

    Exactness: run twice from the same seeds, a stream yields the same batches; rewound with
    :meth:`load_state_dict` to a position it passed, it yields again exactly the batches it yielded from
    there, and with the global torch RNG restored to its value at that position (the guard's snapshot does
    that) the RNG draws after each batch repeat too. How, per loader:

    - Map-style dataset, plain DataLoader: at the start of each epoch the stream records the global torch
      RNG state and the state of the loader's and sampler's generators, calls ``set_epoch(epoch)`` where the
      sampler has it (``DistributedSampler``), lists the epoch's batch order from ``loader.batch_sampler``
      (indices only) and creates the epoch's iterator over a copy of the loader fed from that list (so a
      ``RandomSampler`` without a generator, which seeds itself from the global RNG, and the worker base
      seed, drawn at iterator creation, come from the recorded state). That start consumes the global RNG
      as an unguarded epoch does (two draws without generators), though not with the same values.
      Rewinding mid-epoch sets the recorded states, rebuilds the order and the iterator from the saved
      index on, then puts every RNG back as it found it: a rebuild draws nothing. A position at an epoch
      boundary restores the generators and starts the epoch from the RNG as it is then.
    - ``torchdata.stateful_dataloader.StatefulDataLoader``: its own ``state_dict`` is the position; loading
      one recreates its iterator with the global torch RNG put back afterwards.
    - ``IterableDataset``: each epoch's iterator is created from the recorded RNG state as above; one batch
      is fetched ahead, so a position after an epoch's last batch is known to be the next epoch's start.
      It can be rewound to epoch starts only.

    Randomness in the main process while a batch is loaded (``num_workers=0`` transforms) draws from the
    global RNG streams, so it replays exactly when those are restored with the position: take them from
    the model-side streams that the snapshot restores, never from a generator of your own.

    Limits:
        - With ``num_workers > 0`` random transforms inside workers replay exactly only from an epoch
          start: workers reseed per epoch iterator (base seed + worker id), a rebuilt iterator starts
          them afresh and deals the remaining batches round-robin from worker 0. Everything else (order,
          data without worker randomness) is exact mid-epoch; with ``num_workers=0`` everything is, and so
          are transforms that seed themselves from the epoch and sample id.
        - Workers are not persistent: each epoch and each rewind starts new ones (``persistent_workers``
          is ignored), and batches come in order (``in_order`` is ignored).
        - A window added while workers prefetch: batches already handed to workers are loaded, then dropped.
          Sample ids added then apply from the next batch handed out.
        - A ``StatefulDataLoader`` or ``IterableDataset`` cannot skip by index: batches in a window are
          fetched and dropped, and sample ids are unknown (``None``), so sample skips do not apply.
        - A map-style ``state_dict`` holds generator states but not the sampler's other fields or the
          dataset's own state; those must not change between save and load.

    Args:
        loader: the DataLoader to read; the stream iterates copies of it (never ``loader`` itself) unless
            it is a ``StatefulDataLoader``.
        epochs: the epoch count of the run: the stream ends when epoch ``epochs - 1`` is done, also after a
            rewind; ``None`` runs forever.
        skip: the skip list to honour, shared with the caller (default: a new empty one, see ``skip``).
        start_epoch: the epoch to start at, for a run resumed without a saved position.
    """

    def __init__(
        self,
        loader: DataLoader[Any],
        *,
        epochs: int | None = None,
        skip: SkipList | None = None,
        start_epoch: int = 0,
    ) -> None:
        if not isinstance(loader, DataLoader):
            raise TypeError(f"BatchStream needs a torch.utils.data.DataLoader, got {type(loader).__qualname__}")
        if epochs is not None and (isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1):
            raise ValueError(f"epochs must be an int >= 1 or None, got {epochs!r}")
        if isinstance(start_epoch, bool) or not isinstance(start_epoch, int) or start_epoch < 0:
            raise ValueError(f"start_epoch must be an int >= 0, got {start_epoch!r}")
        self.loader = loader
        self.epochs = epochs
        self.skip = skip if skip is not None else SkipList()
        self._kind = _kind_of(loader)
        # The generators that decide the order and the worker seeds; a StatefulDataLoader saves its own.
        self._generators = [] if self._kind == _STATEFUL else _generators_of(loader)
        self._epoch, self._index = start_epoch, 0
        self._epoch_start: dict[str, Any] | None = None  # RNG states the current epoch began from
        self._it: Iterator[Any] | None = None  # the current epoch's iterator; None: open one before the next fetch
        self._handed: deque[tuple[int, list[int]]] = deque()  # map-style: (index, ids) handed to the loader
        self._order_len: int | None = None  # map-style: batches in the current epoch's full order
        self._ahead: Any = _NOTHING  # iterable: the next batch, fetched one early

    def __iter__(self) -> Iterator[Batch]:
        # All position state lives on the stream, so every iterator sees a rewind before its next fetch.
        while (batch := self._next()) is not None:
            yield batch

    def state_dict(self) -> dict[str, Any]:
        """The position of the next batch and what rebuilds its epoch's order. Draws no randomness."""
        epoch, index, start = self._epoch, self._index, self._epoch_start
        at_end = self._it is not None and (
            (self._kind == _MAP and self._order_len is not None and index >= self._order_len)
            or (self._kind == _ITERABLE and self._ahead is _END)
        )
        if at_end:  # the epoch's last batch was yielded: the position is the next epoch's start
            epoch, index, start = epoch + 1, 0, None
        state: dict[str, Any] = {
            "version": _VERSION,
            "kind": self._kind,
            "epoch": epoch,
            "index": index,
            "epoch_start": _copy_rng(start),
            "generators": [g.get_state() for g in self._generators],
            "loader": None,
        }
        if self._kind == _STATEFUL:
            # Before the first epoch this creates the loader's iterator, drawing a worker base seed; keep the
            # draw out of the model-side stream (the next iter(loader) reuses that iterator).
            with _KeepGlobalRng():
                state["loader"] = self._stateful_loader.state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Rewind or fast-forward: the next batch yielded, also by an iterator already running, is the one at
        ``state``'s position. The epoch's iterator is rebuilt before that fetch; the global torch RNG is left
        as it is at that moment (restore it with the rest of the snapshot).

        Raises:
            ValueError: an unknown version, a state from another kind of loader or another set of
                generators, or a mid-epoch position of an ``IterableDataset`` in a plain DataLoader.
        """
        _check_version(state, "BatchStream")
        if state.get("kind") != self._kind:
            raise ValueError(
                f"this stream reads a {self._kind!r} loader, the state is from a {state.get('kind')!r} one"
            )
        epoch, index, start = state["epoch"], state["index"], state["epoch_start"]
        if self._kind == _ITERABLE and index != 0:
            raise ValueError(
                f"an IterableDataset cannot be rewound mid-epoch (epoch {epoch}, batch {index}) unless it is "
                "loaded by a torchdata StatefulDataLoader; rewind to an epoch start"
            )
        if self._kind == _MAP and index != 0 and start is None:
            raise ValueError(f"a mid-epoch position (epoch {epoch}, batch {index}) needs the epoch's RNG states")
        if len(state["generators"]) != len(self._generators):
            raise ValueError(
                f"the state holds {len(state['generators'])} generator states, this loader has {len(self._generators)}"
            )
        if self._kind == _STATEFUL:
            # The loader recreates its iterator from the state now, drawing a worker base seed that the
            # original run did not draw here; the next iter(loader) reuses this iterator.
            with _KeepGlobalRng():
                self._stateful_loader.load_state_dict(state["loader"])
                self._stateful_loader.state_dict()
        for generator, generator_state in zip(self._generators, state["generators"], strict=True):
            generator.set_state(generator_state)
        self._epoch, self._index, self._epoch_start = epoch, index, _copy_rng(start)
        self._it, self._handed, self._order_len, self._ahead = None, deque(), None, _NOTHING

    @property
    def _stateful_loader(self) -> Any:
        return self.loader  # a torchdata StatefulDataLoader, typed loosely: torchdata is optional

    def _next(self) -> Batch | None:
        """The next batch to feed, or ``None`` when the last epoch is done."""
        while self.epochs is None or self._epoch < self.epochs:
            if self._it is None:
                self._open_epoch()
            item = self._fetch()
            if item is None:
                self._close_epoch()
                continue
            data, index, ids = item
            self._index = index + 1
            if self.skip.skips_batch(self._epoch, index):  # fetched before its window was known, or unskippable
                continue
            return Batch(data=data, epoch=self._epoch, index=index, sample_ids=ids)
        return None

    def _open_epoch(self) -> None:
        if self._kind == _STATEFUL:
            self._it = iter(self.loader)  # a fresh epoch, or the iterator load_state_dict restored
            return
        if self._epoch_start is None:  # a fresh epoch: its order comes from the RNG as it is now
            self._epoch_start = _rng_states(self._generators)
            self._it = self._build()
            return
        # A rebuilt epoch: order and worker seeds come from the recorded start; the rebuild draws nothing.
        kept = _rng_states(self._generators)
        _set_rng_states(self._epoch_start, self._generators)
        try:
            self._it = self._build()
        finally:
            _set_rng_states(kept, self._generators)

    def _build(self) -> Iterator[Any]:
        """The epoch's iterator from the current index on; the RNG is in the epoch's start state."""
        loader = self.loader
        for obj in _unique(loader.sampler, loader.batch_sampler, getattr(loader.batch_sampler, "sampler", None)):
            if callable(getattr(obj, "set_epoch", None)):
                obj.set_epoch(self._epoch)
        if self._kind == _ITERABLE:
            if callable(getattr(loader.dataset, "set_epoch", None)):
                loader.dataset.set_epoch(self._epoch)  # type: ignore[attr-defined]
            return iter(_copy_loader(loader, batch_size=loader.batch_size, drop_last=loader.drop_last))
        if loader.batch_sampler is not None:
            order = [list(batch) for batch in loader.batch_sampler]
        else:  # batch_size=None: the loader feeds one sample at a time, uncollated
            order = [[i] for i in loader.sampler]
        self._order_len = len(order)
        if not order and self.epochs is None:
            raise ValueError("the loader yields no batches; an endless BatchStream over it would never yield")
        self._handed = deque()
        remaining = _Remaining(order, self._index, self._epoch, self.skip, self._handed)
        if loader.batch_sampler is not None:
            return iter(_copy_loader(loader, batch_sampler=remaining))
        remaining.single = True
        return iter(_copy_loader(loader, batch_size=None, sampler=remaining))

    def _fetch(self) -> tuple[Any, int, list[int] | None] | None:
        """The next batch the epoch's iterator gives, with its index and ids; ``None`` at the epoch's end."""
        assert self._it is not None
        if self._kind == _MAP:
            data = next(self._it, _END)
            if data is _END:
                return None
            index, ids = self._handed.popleft()  # the loader keeps the order its sampler handed out
            return data, index, ids
        if self._kind == _ITERABLE:
            if self._ahead is _NOTHING:
                self._ahead = next(self._it, _END)
            data = self._ahead
            if data is _END:
                return None
            self._ahead = next(self._it, _END)
            return data, self._index, None
        data = next(self._it, _END)
        return None if data is _END else (data, self._index, None)

    def _close_epoch(self) -> None:
        if self.epochs is None and self._index == 0 and self._kind != _MAP:
            raise ValueError("the loader yields no batches; an endless BatchStream over it would never yield")
        self._epoch, self._index, self._epoch_start = self._epoch + 1, 0, None
        self._it, self._handed, self._order_len, self._ahead = None, deque(), None, _NOTHING


class _Remaining(Sampler[Any]):
    """One epoch's batches from ``start`` on, minus skips, as the loader asks for them.

    It reads the skip list when the loader asks for each batch, so later additions apply to batches not
    handed out yet, and notes each batch it hands out: the loader yields in that order (``in_order=True``).
    With ``single`` it hands out the one index of each batch, for a loader without automatic batching.
    """

    def __init__(
        self, order: list[list[int]], start: int, epoch: int, skip: SkipList, handed: deque[tuple[int, list[int]]]
    ) -> None:
        super().__init__()
        self.order, self.start, self.epoch, self.skip, self.handed = order, start, epoch, skip, handed
        self.single = False

    def __iter__(self) -> Iterator[Any]:
        for index in range(self.start, len(self.order)):
            if self.skip.skips_batch(self.epoch, index):
                continue
            ids = [i for i in self.order[index] if not self.skip.skips_sample(i)] if self.skip else self.order[index]
            if ids:
                self.handed.append((index, ids))
                yield ids[0] if self.single else ids

    def __len__(self) -> int:
        return max(len(self.order) - self.start, 0)


class _KeepGlobalRng:
    """Puts the global torch RNG back on exit: for iterator creations the original run did not make."""

    def __enter__(self) -> None:
        self._state = torch.get_rng_state()

    def __exit__(self, *exc: object) -> None:
        torch.set_rng_state(self._state)


def _kind_of(loader: DataLoader[Any]) -> str:
    try:  # torchdata is optional, and heavy enough to import only here
        from torchdata.stateful_dataloader import StatefulDataLoader
    except ImportError:
        StatefulDataLoader = None
    if StatefulDataLoader is not None and isinstance(loader, StatefulDataLoader):
        return _STATEFUL
    return _ITERABLE if isinstance(loader.dataset, IterableDataset) else _MAP


def _unique(*objs: Any) -> list[Any]:
    out: list[Any] = []
    for obj in objs:
        if obj is not None and all(obj is not seen for seen in out):
            out.append(obj)
    return out


def _generators_of(loader: DataLoader[Any]) -> list[torch.Generator]:
    """The generators that decide the order and the worker seeds, each once, in a fixed order."""
    batch_sampler = loader.batch_sampler
    candidates = (
        loader.generator,
        getattr(loader.sampler, "generator", None),
        getattr(batch_sampler, "generator", None),
        getattr(getattr(batch_sampler, "sampler", None), "generator", None),
    )
    return [g for g in _unique(*candidates) if isinstance(g, torch.Generator)]


def _rng_states(generators: Sequence[torch.Generator]) -> dict[str, Any]:
    return {"torch": torch.get_rng_state(), "generators": [g.get_state() for g in generators]}


def _set_rng_states(states: dict[str, Any], generators: Sequence[torch.Generator]) -> None:
    torch.set_rng_state(states["torch"])
    for generator, state in zip(generators, states["generators"], strict=True):
        generator.set_state(state)


def _copy_rng(states: dict[str, Any] | None) -> dict[str, Any] | None:
    if states is None:
        return None
    return {"torch": states["torch"].clone(), "generators": [s.clone() for s in states["generators"]]}


def _copy_loader(loader: DataLoader[Any], **kwargs: Any) -> DataLoader[Any]:
    """A DataLoader over ``loader.dataset`` with its loading settings and ``kwargs`` for the order."""
    settings: dict[str, Any] = {}
    if loader.num_workers > 0:  # these are rejected without workers
        settings.update(prefetch_factor=loader.prefetch_factor, multiprocessing_context=loader.multiprocessing_context)
    if getattr(loader, "pin_memory_device", ""):
        settings["pin_memory_device"] = loader.pin_memory_device
    return DataLoader(
        loader.dataset,
        num_workers=loader.num_workers,
        collate_fn=loader.collate_fn,
        pin_memory=loader.pin_memory,
        timeout=loader.timeout,
        worker_init_fn=loader.worker_init_fn,
        generator=loader.generator,
        persistent_workers=False,  # workers must start per iterator, seeded when the iterator is created
        in_order=True,  # the stream labels batches in the order it handed them out
        **settings,
        **kwargs,
    )


def _check_version(state: dict[str, Any], what: str) -> None:
    if state.get("version") != _VERSION:
        raise ValueError(f"{what} state has version {state.get('version')!r}; this nanguard reads version {_VERSION}")
