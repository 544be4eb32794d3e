"""recovery.py owns going back: snapshots at clean checks, rollback with data rewind and skipping, and
resuming from disk.

The guard calls :meth:`Recovery.snapshot` after each clean check, :meth:`Recovery.rollback` when the policy
decides to roll back, and :meth:`Recovery.resume` for ``Guard.resume``. A rollback restores the newest clean
snapshot taken before the first symptom (further back at higher escalation levels): model, optimizer,
scheduler, scaler, EMA, every RNG stream, the guard's statistics and position; then, when the loop draws its
batches from ``Guard.batches``, it rewinds the data to where it was and adds the policy's skip window, so
replaying is exact. The escalation history and the skip list are *not* restored: they are what the rollback
learned.

It does not decide anything (policy.py does) and does not scan tensors (checks.py does).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from torch.utils.data import DataLoader

from nanguard.data import Batch, BatchStream, SkipList
from nanguard.snapshot import Snapshot, SnapshotRing
from nanguard.snapshot_store import SnapshotStore

if TYPE_CHECKING:
    from nanguard.guard import Guard

log = logging.getLogger(__name__)

END_OF_EPOCH = 2**62
"""The last index of a skip window that runs to the end of its epoch."""


class Recovery:
    """Snapshots, rollback and resume for one :class:`~nanguard.guard.Guard`."""

    def __init__(self, guard: Guard, run_dir: str | Path) -> None:
        self.guard = guard
        policy = guard.policy
        self.ring = SnapshotRing(policy.snapshot_ring_size)
        self.skip = SkipList()
        self.stream: BatchStream | None = None
        self.current: Batch | None = None
        self._stream_start: dict[str, Any] | None = None
        self._pending_data: dict[str, Any] | None = None
        self.store = SnapshotStore(run_dir, guard.journal, guard.run_id, keep=policy.disk_snapshots_kept)
        self._last_disk_step: int | None = None

    # ------------------------------------------------------------------ data
    def batches(self, loader: DataLoader[Any], *, epochs: int | None) -> Iterator[Batch]:
        """Yield the loader's batches with their position, rewinding on rollback and honouring skips."""
        stream = BatchStream(loader, epochs=epochs, skip=self.skip)
        self.stream = stream
        self._stream_start = stream.state_dict()
        if self._pending_data is not None:  # Guard.resume() ran before the loop started
            stream.load_state_dict(self._pending_data)
            self._pending_data = None
        for batch in stream:
            self.current = batch
            yield batch

    # ------------------------------------------------------------------ snapshots
    def snapshot(self, step: int, *, to_disk: bool = True) -> Snapshot:
        """Keep the state at the start of ``step`` (call it at a step boundary, after a clean check), and
        write it to disk when the policy's interval has passed since the last file (or the start)."""
        snap = self.ring.add(step, self.guard._stateful(), extra=self._extra())
        every = self.guard.policy.disk_snapshot_every_steps
        if self._last_disk_step is None:
            self._last_disk_step = step  # the state the guard started from is the user's: nothing to save
        elif to_disk and every is not None and step - self._last_disk_step >= every:
            current = self.current
            self.store.save(snap, clean=True, epoch=current.epoch if current else self.guard.epoch,
                            batch_index=current.index if current else self.guard.batch_index)
            self._last_disk_step = step
        return snap

    def _extra(self) -> dict[str, Any]:
        guard = self.guard
        return {
            "guard": guard._position_state(),
            "data": self.stream.state_dict() if self.stream is not None else None,
            "skip": self.skip.state_dict(),
        }

    # ------------------------------------------------------------------ rollback
    def rollback(self, step: int, reason: str) -> dict[str, Any]:
        """Go back to the newest clean snapshot before the first symptom; returns the journal detail."""
        guard, policy = self.guard, self.guard.policy
        escalation = guard.escalation
        level = escalation.level
        first = escalation.first_symptom_step if escalation.first_symptom_step is not None else step
        target = self.ring.newest(at_or_before_step=first)
        for _ in range(level):  # a failed probation: go further back when the ring has it
            older = self.ring.newest(at_or_before_step=target.step - 1) if target is not None else None
            target = older or target
        if target is None:
            raise RuntimeError("nanguard: no snapshot to roll back to (the ring is never empty after construction)")
        windows = self._skip_windows(target, step, level)
        target.restore(guard._stateful())
        guard._save_buffers()
        guard._load_position_state(target.extra["guard"])
        data_rewound = False
        if self.stream is not None:
            for epoch, first_index, last_index in windows:
                self.skip.add_window(epoch, first_index, last_index)
            self.stream.load_state_dict(self._data_state(target.extra["data"]))
            data_rewound = True
        self.ring.drop_after(target.step)
        marked = guard.journal.mark_rolled_back(guard.run_id, from_step=target.step)
        escalation.note_rollback(incident_step=step, to_step=target.step, probation_steps=policy.lr_probation_steps)
        if "rollback" in policy.lr_backoff_on:
            guard.lr_backoff.start(target.step, policy, level=level)
        detail = {
            "from_step": step, "to_step": target.step, "level": level, "data_rewound": data_rewound,
            "skipped_windows": [list(w) for w in windows] if data_rewound else [],
            "incidents_rolled_back": marked,
            "lr_factor": guard.lr_backoff.factor if "rollback" in policy.lr_backoff_on else 1.0,
            "probation_until": escalation.probation_until,
        }
        log.warning("nanguard: rollback from step %d to step %d", step, target.step)
        return detail

    def _skip_windows(self, target: Snapshot, step: int, level: int) -> list[tuple[int, int, int]]:
        """The batches not to feed again after rolling back from ``step`` to ``target``."""
        mode = self.guard.policy.rollback_skip
        if level > 0 and mode != "window":
            mode = "window"  # a failed probation widens the skip to the whole window
        current = self.current
        if mode == "none" or current is None or self.stream is None:
            return []
        if mode == "faulted":
            faulted = {(i.epoch, i.batch_index) for i in self.guard.incidents
                       if i.step >= target.step and i.epoch is not None and i.batch_index is not None}
            faulted.add((current.epoch, current.index))
            return [(e, b, b) for e, b in sorted(faulted)]
        start = self._data_state(target.extra["data"])
        start_epoch, start_index = int(start["epoch"]), int(start["index"])
        end_epoch, end_index = current.epoch, current.index
        if start_epoch == end_epoch:
            return [(start_epoch, start_index, end_index)]
        windows = [(start_epoch, start_index, END_OF_EPOCH)]
        windows += [(e, 0, END_OF_EPOCH) for e in range(start_epoch + 1, end_epoch)]
        windows.append((end_epoch, 0, end_index))
        return windows

    def _data_state(self, saved: dict[str, Any] | None) -> dict[str, Any]:
        """A snapshot's data position; snapshots taken before the loop started mean its beginning."""
        if saved is not None:
            return saved
        assert self._stream_start is not None  # only called with a stream
        return self._stream_start

    # ------------------------------------------------------------------ resume
    def resume(self) -> int | None:
        """Restore the newest clean snapshot on disk; returns its step, or ``None`` when there is none."""
        path = self.store.newest_clean()
        if path is None:
            return None
        snap = self.store.load(path)
        guard = self.guard
        snap.restore(guard._stateful())
        guard._save_buffers()
        guard._load_position_state(snap.extra["guard"], history=True)
        self.skip.load_state_dict(snap.extra["skip"])
        if self.stream is not None:
            self.stream.load_state_dict(self._data_state(snap.extra["data"]))
        else:
            self._pending_data = snap.extra["data"]
        self.ring.drop_after(-1)
        self.ring.add(snap.step, guard._stateful(), extra=snap.extra)
        self._last_disk_step = snap.step
        return snap.step
