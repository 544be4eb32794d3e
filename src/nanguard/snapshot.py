"""snapshot.py owns capturing and restoring the complete training state in memory, RNG streams included.

A :class:`Snapshot` holds, for one step: a copy of the ``state_dict`` of every registered component (model,
optimizer, EMA, GradScaler, scheduler), every RNG stream (python ``random``, numpy's global
``np.random``, torch CPU and each initialised CUDA device, see :func:`capture_rng`) and ``extra``: plain
values and tensors the caller adds (the guard's own statistics and the data position). Restoring puts the
components and the RNG streams back; ``extra`` is given back as is, for the caller to load.

Copies are cheap. Every tensor goes into a CPU buffer that the next capture reuses (``reuse=``), so
steady-state captures allocate nothing. From a GPU the buffers are pinned and the copies are
``non_blocking``; a CUDA event per device marks their end, and :meth:`Snapshot.wait` (called by
:meth:`Snapshot.restore` and by the disk store before reading a buffer) waits for it. The copies therefore
never make the host wait for the GPU (a component's own ``state_dict`` may: GradScaler's calls ``.item()``
on its scale). :class:`SnapshotRing` keeps the newest K snapshots.

Writing snapshots to disk, their rotation and their journal rows live in :mod:`nanguard.snapshot_store`.
Left out on purpose: the data loader itself (its position travels in ``extra``), tensor subclasses and
non-strided tensors (DTensor, sparse, quantized: cloned where they are, not moved to the CPU), and RNG
generators the training code creates itself (``torch.Generator``, ``np.random.default_rng``): only the
global streams are captured, so a private generator must be registered as a component or put in ``extra``.
"""

from __future__ import annotations

import copy
import logging
import random
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import torch
from torch import Tensor

log = logging.getLogger(__name__)

RNG_VERSION = 1
"""Version of the dict :func:`capture_rng` returns; :func:`restore_rng` rejects any other."""


class Stateful(Protocol):
    def state_dict(self) -> Any: ...

    def load_state_dict(self, state: Any, /) -> Any: ...


def copy_state(value: Any, reuse: Any = None) -> Any:
    """A deep copy of a state tree, on the devices it is on. Tensors are copied into ``reuse``'s tensor at
    the same place when it has the same shape, dtype and device; otherwise they are cloned."""
    if isinstance(value, Tensor):
        if (
            isinstance(reuse, Tensor)
            and reuse.shape == value.shape
            and reuse.dtype == value.dtype
            and reuse.device == value.device
        ):
            return reuse.copy_(value.detach())
        return value.detach().clone()
    if isinstance(value, Mapping):
        old = reuse if isinstance(reuse, Mapping) else {}
        out: Any = type(value)((k, copy_state(v, old.get(k))) for k, v in value.items())  # type: ignore[call-arg]
        if hasattr(value, "_metadata"):  # module state_dicts carry per-module versions used on load
            out._metadata = copy.deepcopy(value._metadata)
        return out
    if isinstance(value, list | tuple):
        old_seq = reuse if isinstance(reuse, list | tuple) and len(reuse) == len(value) else [None] * len(value)
        items = [copy_state(v, o) for v, o in zip(value, old_seq, strict=True)]
        return items if isinstance(value, list) else tuple(items)
    return copy.deepcopy(value)


def _offload_tensor(value: Tensor, reuse: Any, devices: set[torch.device]) -> Tensor:
    if type(value) is not Tensor:
        value = value.detach()  # a Parameter detaches to a plain Tensor; other subclasses stay what they are
    if value.layout is not torch.strided or value.is_quantized or type(value) is not Tensor:
        return value.clone()  # no plain CPU buffer can hold these; see the module docstring
    on_cuda = value.is_cuda
    contiguous = value.is_contiguous()  # a cached flag: the common case costs no stride arithmetic
    # Otherwise the buffer takes the layout a fresh copy would get (empty_like keeps a dense tensor's
    # strides, channels_last included), computed on the meta device so that nothing is allocated.
    stride = None if contiguous else torch.empty_like(value, device="meta").stride()
    if (
        isinstance(reuse, Tensor)
        and reuse.device.type == "cpu"
        and reuse.shape == value.shape
        and reuse.dtype == value.dtype
        and (reuse.is_contiguous() if contiguous else reuse.stride() == stride)
        and (not on_cuda or reuse.is_pinned())  # an async copy from a GPU needs page-locked memory
    ):
        buffer = reuse
    else:
        # Pin only buffers that a GPU copies into: pinning a buffer for a CPU tensor buys nothing and
        # would initialise CUDA in a CPU run.
        buffer = (
            torch.empty(value.shape, dtype=value.dtype, device="cpu", pin_memory=on_cuda)
            if stride is None
            else torch.empty_strided(value.shape, stride, dtype=value.dtype, device="cpu", pin_memory=on_cuda)
        )
    if on_cuda:
        # Ordered on the current stream after the kernels that wrote ``value``; the host does not wait.
        buffer.copy_(value, non_blocking=True)
        devices.add(value.device)
    else:
        buffer.copy_(value)
    return buffer


def _offload(value: Any, reuse: Any, devices: set[torch.device]) -> Any:
    """Like :func:`copy_state`, but every strided tensor lands in a CPU buffer (``reuse``'s when it fits);
    the CUDA devices copied from are added to ``devices``."""
    if isinstance(value, Tensor):
        return _offload_tensor(value, reuse, devices)
    if isinstance(value, Mapping):
        old = reuse if isinstance(reuse, Mapping) else {}
        out: Any = type(value)((k, _offload(v, old.get(k), devices)) for k, v in value.items())  # type: ignore[call-arg]
        if hasattr(value, "_metadata"):  # module state_dicts carry per-module versions used on load
            out._metadata = copy.deepcopy(value._metadata)
        return out
    if isinstance(value, list | tuple):
        old_seq = reuse if isinstance(reuse, list | tuple) and len(reuse) == len(value) else [None] * len(value)
        items = [_offload(v, o, devices) for v, o in zip(value, old_seq, strict=True)]
        return items if isinstance(value, list) else tuple(items)
    return copy.deepcopy(value)


# ---------------------------------------------------------------------- RNG streams
def _plain_numpy(value: Any) -> Any:
    # numpy's state holds a uint32 key array; as a list with its dtype it pickles without numpy globals.
    if isinstance(value, np.ndarray):
        return {"ndarray_dtype": value.dtype.str, "values": value.tolist()}
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, dict):
        return {k: _plain_numpy(v) for k, v in value.items()}
    return value


def _from_plain_numpy(value: Any) -> Any:
    if isinstance(value, Mapping):
        if "ndarray_dtype" in value:
            return np.asarray(value["values"], dtype=np.dtype(value["ndarray_dtype"]))
        return {k: _from_plain_numpy(v) for k, v in value.items()}
    return value


def capture_rng() -> dict[str, Any]:
    """Every global RNG stream: python ``random``, numpy's ``np.random``, torch CPU and, once CUDA is
    initialised, every CUDA device. Plain values and CPU tensors only.

    Reading a CUDA generator's state reads its seed and offset on the host: no sync. A process that has
    not initialised CUDA has drawn nothing from it, so there is nothing to keep (and nothing is initialised).
    """
    state: dict[str, Any] = {
        "version": RNG_VERSION,
        "python": random.getstate(),
        # legacy=False gives the dict form, which also covers a bit generator other than MT19937
        # installed with np.random.set_bit_generator.
        "numpy": _plain_numpy(np.random.get_state(legacy=False)),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: Mapping[str, Any]) -> None:
    """Put back the streams of :func:`capture_rng`. An empty ``state`` (a snapshot taken with ``rng=False``)
    restores nothing.

    Raises:
        ValueError: unknown version, or CUDA states for a different number of devices.
    """
    if not state:
        return
    if state.get("version") != RNG_VERSION:
        raise ValueError(f"restore_rng: unknown RNG state version {state.get('version')!r}")
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))  # setstate wants tuples, not lists
    np.random.set_state(_from_plain_numpy(state["numpy"]))
    torch.set_rng_state(state["torch"])
    cuda = state.get("cuda")
    if cuda is None:
        return
    if not torch.cuda.is_available():
        # A GPU run's snapshot opened on a CPU machine: its CPU streams are back, the GPU ones have no home.
        log.warning("nanguard: snapshot holds RNG states of %d CUDA devices but CUDA is unavailable", len(cuda))
        return
    if len(cuda) != torch.cuda.device_count():
        raise ValueError(
            f"restore_rng: snapshot holds RNG states of {len(cuda)} CUDA devices, "
            f"this process sees {torch.cuda.device_count()}"
        )
    torch.cuda.set_rng_state_all(cuda)


# ---------------------------------------------------------------------- snapshots
@dataclass
class Snapshot:
    """Copies of each component's state, the RNG streams and the caller's ``extra`` at ``step``.

    Attributes:
        step: the step whose start this state is.
        states: component name -> its ``state_dict`` copy (tensors on the CPU).
        rng: what :func:`capture_rng` returned, or ``{}`` when captured with ``rng=False``.
        extra: the caller's values, copied like the states.
    """

    step: int
    states: dict[str, Any] = field(default_factory=dict)
    rng: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)
    _events: list[torch.cuda.Event] = field(default_factory=list, repr=False, compare=False)

    @classmethod
    @torch.no_grad()
    def capture(
        cls,
        step: int,
        components: Mapping[str, Stateful],
        *,
        extra: Mapping[str, Any] | None = None,
        reuse: Snapshot | None = None,
        rng: bool = True,
    ) -> Snapshot:
        """Copy every component's state (and the RNG streams, and ``extra``) into CPU buffers.

        Args:
            step: the step this state belongs to.
            components: name -> object with ``state_dict()`` / ``load_state_dict()``.
            extra: plain values and tensors to keep beside the states (copied too).
            reuse: an older snapshot whose buffers this one takes over where shapes match; it must not be
                used afterwards (its tensors now hold this state).
            rng: capture the RNG streams.

        Copies from a GPU may still be running when this returns; :meth:`wait` waits for them.
        """
        if reuse is not None:
            reuse.wait()  # its buffers may still be the target of copies in flight
        devices: set[torch.device] = set()
        old = reuse.states if reuse is not None else {}
        states = {name: _offload(comp.state_dict(), old.get(name), devices) for name, comp in components.items()}
        kept = _offload(dict(extra), reuse.extra if reuse is not None else None, devices) if extra else {}
        events = []
        for device in devices:
            event = torch.cuda.Event()
            event.record(torch.cuda.current_stream(device))
            events.append(event)
        return cls(step=step, states=states, rng=capture_rng() if rng else {}, extra=kept, _events=events)

    def wait(self) -> None:
        """Block until the copies of :meth:`capture` have landed (a no-op on CPU or once done)."""
        for event in self._events:
            event.synchronize()
        self._events.clear()

    @torch.no_grad()
    def restore(self, components: Mapping[str, Stateful], *, rng: bool = True) -> None:
        """Load every component's copy back, then the RNG streams (unless ``rng=False``).

        The snapshot stays usable for a later restore. Modules copy the values into their own tensors
        (``load_state_dict`` does ``param.copy_``), on whatever device they are; other components (optimizers
        keep the tensors they are given when dtype and device match) get a fresh copy.

        Raises:
            KeyError: a component has no state in this snapshot.
        """
        self.wait()
        missing = sorted(set(components) - set(self.states))
        if missing:
            have = sorted(self.states)
            raise KeyError(f"snapshot of step {self.step} has no state for {missing!r} (it has {have!r})")
        for name, comp in components.items():
            state = self.states[name]
            comp.load_state_dict(state if isinstance(comp, torch.nn.Module) else copy_state(state))
        if rng:
            restore_rng(self.rng)


class SnapshotRing:
    """The newest ``capacity`` snapshots in memory, oldest first.

    A capture when the ring is full reuses the oldest snapshot's buffers, so a running ring allocates
    nothing. Snapshots dropped by :meth:`drop_after` keep their buffers for the next captures: memory stays
    at ``capacity`` snapshots at most.
    """

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError(f"SnapshotRing: capacity must be >= 1, got {capacity!r}")
        self.capacity = capacity
        self._snapshots: list[Snapshot] = []
        self._spare: list[Snapshot] = []  # dropped snapshots, kept only for their buffers

    def add(
        self, step: int, components: Mapping[str, Stateful], *, extra: Mapping[str, Any] | None = None,
        rng: bool = True,
    ) -> Snapshot:
        """Capture the state at ``step`` and keep it as the newest.

        Snapshots at ``step`` or later are dropped first: they belong to a timeline that a rollback has
        abandoned (or, at the same step, this capture replaces them).
        """
        self._drop(lambda snap: snap.step >= step)
        reuse: Snapshot | None = None
        if len(self._snapshots) >= self.capacity:
            reuse = self._snapshots.pop(0)
        elif self._spare:
            reuse = self._spare.pop()
        snap = Snapshot.capture(step, components, extra=extra, reuse=reuse, rng=rng)
        self._snapshots.append(snap)
        return snap

    def newest(self, at_or_before_step: int | None = None) -> Snapshot | None:
        """The newest snapshot, or the newest whose step is ``<= at_or_before_step``; None when there is none."""
        for snap in reversed(self._snapshots):
            if at_or_before_step is None or snap.step <= at_or_before_step:
                return snap
        return None

    def drop_after(self, step: int) -> int:
        """Discard the snapshots newer than ``step`` (a rollback target); returns how many."""
        return self._drop(lambda snap: snap.step > step)

    def _drop(self, condition: Callable[[Snapshot], bool]) -> int:
        dropped = [snap for snap in self._snapshots if condition(snap)]
        self._snapshots = [snap for snap in self._snapshots if not condition(snap)]
        self._spare.extend(dropped)
        return len(dropped)

    def __len__(self) -> int:
        return len(self._snapshots)

    def __iter__(self) -> Iterator[Snapshot]:
        """Oldest first."""
        return iter(list(self._snapshots))
