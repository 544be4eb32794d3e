"""recovery.py owns going back: snapshots at clean checks, rollback with data rewind and skipping, and resuming
from disk.

:meth:`Recovery.snapshot` keeps the state at a step boundary after a clean check (and writes it to disk every
``disk_snapshot_every_steps``); :meth:`Recovery.rollback` restores the newest clean snapshot taken before the first
symptom (further back at higher escalation levels): model, optimizer, scheduler, scaler, EMA and every RNG stream;
then, when the loop draws its batches from :meth:`Recovery.batches`, it rewinds the data to where it was and adds
the skip windows, so replaying is exact. It returns what it did (:class:`RollbackDone`, with the guard state the
snapshot kept, for the caller to load) and knows no Guard: the components, the guard's state and the positions of
the faulted batches are handed in. It does not decide anything (the controller does) and scans no tensor.

Which batches a rollback skips (``rollback_skip``):

- ``faulted``: the batches whose steps had an incident since the snapshot;
- ``window``: those, and every batch from the snapshot's position to the current one. A window that crosses epochs
  covers the rest of the first epoch and the start of the last; whole epochs in between are never dropped (a
  persistent fault would otherwise skip its way through the data and "finish" on an untrained model);
- ``none``: nothing.

A failed probation (``level`` > 0) widens ``faulted`` and ``none`` to ``window``.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch.utils.data import DataLoader

from nanguard.data import Batch, BatchStream, SkipList
from nanguard.journal import Journal
from nanguard.policy import Policy
from nanguard.snapshot import Snapshot, SnapshotRing, Stateful
from nanguard.snapshot_store import SnapshotStore

log = logging.getLogger("nanguard.guard")

END_OF_EPOCH = 2**62
"""The last index of a skip window that runs to the end of its epoch."""

Position = tuple[int, int]
"""(epoch, batch index) of one batch."""


@dataclass(frozen=True)
class RollbackDone:
    """What :meth:`Recovery.rollback` did.

    Attributes:
        to_step: the snapshot's step, where training continues.
        guard_state: the guard's state the snapshot kept (position and statistics), for the caller to load.
        detail: the journal's description of the rollback.
    """

    to_step: int
    guard_state: dict[str, Any]
    detail: dict[str, Any]


class Recovery:
    """Snapshots, rollback and resume of one guarded training."""

    def __init__(self, policy: Policy, run_dir: str | Path, journal: Journal, run_id: int) -> None:
        self.policy = policy
        self.ring = SnapshotRing(policy.snapshot_ring_size)
        self.skip = SkipList()
        self.stream: BatchStream | None = None
        self.current: Batch | None = None
        self.stream_start: dict[str, Any] | None = None
        self.pending_data: dict[str, Any] | None = None
        self.journal, self.run_id = journal, run_id
        self.store = SnapshotStore(run_dir, journal, run_id, keep=policy.disk_snapshots_kept)
        self.last_disk_step: int | None = None

    # ------------------------------------------------------------------ data
    def batches(self, loader: DataLoader[Any], *, epochs: int | None) -> Iterator[Batch]:
        """Yield the loader's batches with their position, rewinding on rollback and honouring skips."""
        stream = BatchStream(loader, epochs=epochs, skip=self.skip)
        self.stream = stream
        self.stream_start = stream.state_dict()
        if self.pending_data is not None:  # a resume ran before the loop started
            stream.load_state_dict(self.pending_data)
            self.pending_data = None
        for batch in stream:
            self.current = batch
            yield batch

    # ------------------------------------------------------------------ snapshots
    def snapshot(self, step: int, components: Mapping[str, Stateful], guard_state: dict[str, Any], *,
                 to_disk: bool = True) -> Snapshot:
        """Keep the state at the start of ``step`` (at a step boundary, after a clean check), and write it to disk
        when the policy's interval has passed since the last file (or the start)."""
        snap = self.ring.add(step, components, extra=self.extra(guard_state))
        every = self.policy.disk_snapshot_every_steps
        if self.last_disk_step is None:
            self.last_disk_step = step  # the state the guard started from is the user's: nothing to save
        elif to_disk and every is not None and step - self.last_disk_step >= every:
            current = self.current
            self.store.save(snap, clean=True, epoch=current.epoch if current else guard_state.get("epoch"),
                            batch_index=current.index if current else guard_state.get("batch_index"))
            self.last_disk_step = step
        return snap

    def rebase(self, step: int, components: Mapping[str, Stateful], guard_state: dict[str, Any]) -> None:
        """Forget every snapshot and keep the current state as the only one (after the guard's state was loaded
        from a checkpoint: older snapshots belong to a timeline that no longer is)."""
        self.ring.drop_after(-1)
        self.ring.add(step, components, extra=self.extra(guard_state))

    def extra(self, guard_state: dict[str, Any]) -> dict[str, Any]:
        return {"guard": guard_state, "data": self.stream.state_dict() if self.stream is not None else None,
                "skip": self.skip.state_dict()}

    def restore_newest(self, components: Mapping[str, Stateful]) -> Snapshot:
        """Put the newest snapshot in memory back (every one was taken after a clean check), without rewinding the
        data: what a stop or a dirty end leaves in the model, so whatever the user saves next is clean."""
        snap = self.ring.newest()
        if snap is None:
            raise RuntimeError("nanguard: no snapshot to restore (the ring is never empty after construction)")
        snap.restore(components)
        return snap

    # ------------------------------------------------------------------ rollback
    def rollback(
        self,
        step: int,
        components: Mapping[str, Stateful],
        *,
        first_symptom: int | None,
        level: int,
        faulted: list[tuple[int, int, int]],
    ) -> RollbackDone:
        """Go back to the newest clean snapshot at or before ``first_symptom`` (``step`` when unknown), ``level``
        snapshots further when the ring has them; rewind the data and skip what :meth:`skip_windows` says.
        ``faulted`` is ``(step, epoch, batch index)`` of each incident so far; those since the snapshot count."""
        target = self.ring.newest(at_or_before_step=first_symptom if first_symptom is not None else step)
        for _ in range(level):  # a failed probation: go further back when the ring has it
            older = self.ring.newest(at_or_before_step=target.step - 1) if target is not None else None
            target = older or target
        if target is None:
            raise RuntimeError("nanguard: no snapshot to roll back to (the ring is never empty after construction)")
        hit = {(epoch, index) for at, epoch, index in faulted if at >= target.step}
        windows = self.skip_windows(target, level, hit)
        target.restore(components)
        data_rewound = False
        if self.stream is not None:
            for epoch, first_index, last_index in windows:
                self.skip.add_window(epoch, first_index, last_index)
            self.stream.load_state_dict(self.data_state(target.extra["data"]))
            data_rewound = True
        self.ring.drop_after(target.step)
        marked = self.journal.mark_rolled_back(self.run_id, from_step=target.step)
        detail = {
            "from_step": step, "to_step": target.step, "level": level, "data_rewound": data_rewound,
            "skipped_windows": [list(w) for w in windows] if data_rewound else [],
            "incidents_rolled_back": marked,
        }
        log.warning("nanguard: rollback from step %d to step %d", step, target.step)
        return RollbackDone(target.step, dict(target.extra["guard"]), detail)

    def skip_windows(self, target: Snapshot, level: int, faulted: set[Position]) -> list[tuple[int, int, int]]:
        """The batches not to feed again after rolling back to ``target`` (see the module docstring)."""
        mode = self.policy.rollback_skip
        if level > 0:
            mode = "window"  # a failed probation widens the skip to the whole window
        current = self.current
        if mode == "none" or current is None or self.stream is None:
            return []
        hit = set(faulted) | {(current.epoch, current.index)}
        singles = [(e, b, b) for e, b in sorted(hit)]
        if mode == "faulted":
            return singles
        start = self.data_state(target.extra["data"])
        start_epoch, start_index = int(start["epoch"]), int(start["index"])
        end_epoch, end_index = current.epoch, current.index
        if start_epoch == end_epoch:
            windows = [(start_epoch, start_index, end_index)]
        else:
            windows = [(start_epoch, start_index, END_OF_EPOCH), (end_epoch, 0, end_index)]
        covered = [(e, b, b) for e, b, _ in singles
                   if not any(e == we and wf <= b <= wl for we, wf, wl in windows)]
        return windows + covered

    def data_state(self, saved: dict[str, Any] | None) -> dict[str, Any]:
        """A snapshot's data position; snapshots taken before the loop started mean its beginning."""
        if saved is not None:
            return saved
        assert self.stream_start is not None  # only called with a stream
        return self.stream_start

    # ------------------------------------------------------------------ resume
    def resume(self, components: Mapping[str, Stateful]) -> tuple[int, dict[str, Any]] | None:
        """Restore the newest clean snapshot on disk; returns its step and the guard state it kept, or ``None``
        when there is none."""
        path = self.store.newest_clean()
        if path is None:
            return None
        snap = self.store.load(path)
        snap.restore(components)
        self.skip.load_state_dict(snap.extra["skip"])
        if self.stream is not None:
            self.stream.load_state_dict(self.data_state(snap.extra["data"]))
        else:
            self.pending_data = snap.extra["data"]
        self.ring.drop_after(-1)
        self.ring.add(snap.step, components, extra=snap.extra)
        self.last_disk_step = snap.step
        return snap.step, dict(snap.extra["guard"])
