"""snapshot_store.py owns snapshots on disk: writing them atomically, recording them in the journal,
rotating old files away, and finding and loading the newest clean one.

Files are ``<run_dir>/.nanguard/snapshots/step-<step:09d>.pt``, written with
:func:`nanguard.ckpt.save_checkpoint` (temp file, fsync, rename) and read with
:func:`nanguard.ckpt.load_checkpoint` without ``trust``: the payload is plain containers and tensors only
(checked before writing), so the inert reader finds no global outside the allowlist. The payload::

    {"format": "nanguard.snapshot", "version": 1, "step": int, "clean": bool, "epoch": int | None,
     "batch_index": int | None, "states": {name: state_dict}, "rng": capture_rng(), "extra": {...}}

A file is recorded in the journal only after it is complete on disk, and rotation deletes files only
after that record, so a crash at any point leaves every earlier file and row as it was. Rotation keeps
the newest ``keep`` files of the run folder and the pinned one: the newest snapshot saved as clean.

It does not decide when to save or which snapshot to roll back to (``recovery.py`` does), and it never
deletes a file the journal does not list (a temp file left by a killed process stays).
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import Any

from torch import Tensor

from nanguard.ckpt import is_allowed_global, load_checkpoint, save_checkpoint
from nanguard.errors import JournalError, UnreadableCheckpoint
from nanguard.journal import JOURNAL_DIR, Journal, file_digest
from nanguard.snapshot import Snapshot

log = logging.getLogger(__name__)

SNAPSHOT_DIR = "snapshots"
"""The folder of snapshot files, under ``<run_dir>/.nanguard``."""
FORMAT = "nanguard.snapshot"
FORMAT_VERSION = 1
"""Version of the payload; :meth:`SnapshotStore.load` rejects any other."""

_PLAIN_LEAVES = (type(None), bool, int, float, complex, str, bytes)
_PLAIN_CONTAINERS = (dict, list, tuple, set, frozenset)


def check_plain(value: Any, where: str = "snapshot") -> None:
    """Raise ``TypeError`` when ``value`` holds anything ``load_checkpoint`` would refuse without trust.

    Accepted: ``None``, bool, int, float, complex, str, bytes, tensors, dict/list/tuple/set and any other
    object whose class is on the allowlist (``collections.OrderedDict``, ``torch.Size``, ``torch.dtype``…).
    Exact types are checked, because pickle names a subclass (an ``IntEnum``, a namedtuple) by its own class.
    """
    kind = type(value)
    if kind in _PLAIN_LEAVES or isinstance(value, Tensor):
        return
    if kind not in _PLAIN_CONTAINERS and not is_allowed_global(f"{kind.__module__}.{kind.__qualname__}"):
        raise TypeError(
            f"{where}: {kind.__module__}.{kind.__qualname__} is not a plain value; a snapshot holds plain "
            "containers and tensors only, so that it loads without --trust"
        )
    if isinstance(value, dict):
        for key, item in value.items():
            check_plain(key, f"{where} key {key!r}")
            check_plain(item, f"{where}[{key!r}]")
    elif isinstance(value, list | tuple | set | frozenset):
        for index, item in enumerate(value):
            check_plain(item, f"{where}[{index}]")
    for name, item in getattr(value, "__dict__", {}).items():  # pickled too (a state_dict's _metadata)
        check_plain(item, f"{where}.{name}")


class SnapshotStore:
    """Snapshot files of one run folder, recorded in its journal.

    Args:
        run_dir: the run folder; files go to ``<run_dir>/.nanguard/snapshots``.
        journal: the run folder's journal (rows are written through it).
        run_id: the run that saves (journal ``runs.id``).
        keep: how many of the newest files rotation keeps, besides the pinned one; at least 2.
    """

    def __init__(self, run_dir: str | Path, journal: Journal, run_id: int, *, keep: int = 2) -> None:
        if keep < 2:
            raise ValueError(f"SnapshotStore: keep must be >= 2, got {keep!r}")
        self.run_dir = Path(run_dir)
        self.folder = self.run_dir / JOURNAL_DIR / SNAPSHOT_DIR
        self.journal = journal
        self.run_id = run_id
        self.keep = keep

    def save(
        self, snapshot: Snapshot, *, clean: bool, epoch: int | None = None, batch_index: int | None = None
    ) -> Path:
        """Write ``snapshot``, record it, pin it when ``clean``, then rotate.

        Args:
            snapshot: what to write (its GPU copies are waited for first).
            clean: whether the state passed a scan; only clean snapshots are pinned and found by
                :meth:`newest_clean`.
            epoch: the data epoch, for the journal row.
            batch_index: the batch index in that epoch, for the journal row.

        Returns:
            The file written.

        Raises:
            TypeError: the snapshot holds something other than plain values and tensors (nothing is written).
        """
        snapshot.wait()  # torch.save reads the CPU buffers: the non_blocking copies must have landed
        payload = {
            "format": FORMAT, "version": FORMAT_VERSION, "step": snapshot.step, "clean": clean,
            "epoch": epoch, "batch_index": batch_index,
            "states": snapshot.states, "rng": snapshot.rng, "extra": snapshot.extra,
        }
        check_plain(payload)
        self.folder.mkdir(parents=True, exist_ok=True)
        path = save_checkpoint(payload, self._free_path(snapshot.step))
        # Hash what is on disk, not what was meant to be: the row vouches for these bytes.
        digest = file_digest(path)
        if digest is None:
            raise JournalError(f"{path}: cannot read back the snapshot just written")
        sha256, size, _ = digest
        row_id = self.journal.record_snapshot(
            self.run_id, step=snapshot.step, path=path.relative_to(self.run_dir).as_posix(), sha256=sha256,
            size=size, clean=clean, epoch=epoch, batch_index=batch_index,
        )
        if clean:
            self.journal.set_pinned(row_id)
        self._rotate()
        log.debug("nanguard: saved snapshot of step %d to %s (clean=%s)", snapshot.step, path, clean)
        return path

    def _free_path(self, step: int) -> Path:
        # A step saved again (after a rollback, or by a resumed process) must not overwrite a file that a
        # live row still vouches for (the pinned clean one above all): it gets a numbered name instead.
        # A file no live row lists (left by a crash before its row was written) is overwritten.
        taken = {row["path"] for row in self.journal.snapshots() if not row["deleted"]}
        name, n = f"step-{step:09d}", 1
        path = self.folder / f"{name}.pt"
        while path.relative_to(self.run_dir).as_posix() in taken:
            n += 1
            path = self.folder / f"{name}-{n}.pt"
        return path

    def _rotate(self) -> None:
        # Newest means most recently written (row id), not highest step: after a rollback the replayed
        # steps are the newest. Rows are marked deleted before the file goes, so no live row ever names a
        # missing file because of rotation (a crash in between leaves an unlisted file, harmless).
        live = [row for row in self.journal.snapshots() if not row["deleted"]]
        kept = {row["id"] for row in live[-self.keep :]} | {row["id"] for row in live if row["pinned"]}
        for row in live:
            if row["id"] in kept:
                continue
            self.journal.mark_snapshot_deleted(row["id"])
            with contextlib.suppress(FileNotFoundError):
                (self.run_dir / row["path"]).unlink()
            log.debug("nanguard: rotated away snapshot %s", row["path"])

    def newest_clean(self, at_or_before_step: int | None = None) -> Path | None:
        """The most recently written clean snapshot whose file is still there with the recorded size and
        SHA-256 (optionally only those of step ``<= at_or_before_step``); None when there is none.

        Hashing reads the whole file: this is for resuming and rolling back, not for every step.
        """
        for row in reversed(self.journal.snapshots()):
            if row["deleted"] or not row["clean"]:
                continue
            if at_or_before_step is not None and row["step"] > at_or_before_step:
                continue
            path = self.run_dir / row["path"]
            try:
                size_ok = path.stat().st_size == row["size"]
            except OSError:
                log.warning("nanguard: snapshot %s of step %d is missing; trying an older one", path, row["step"])
                continue
            digest = file_digest(path) if size_ok else None
            if digest is None or digest[0] != row["sha256"]:
                log.warning("nanguard: snapshot %s of step %d changed since it was written; trying an older one",
                            path, row["step"])
                continue
            return path
        return None

    def load(self, path: str | Path) -> Snapshot:
        """Read a snapshot file back (tensors on the CPU; :meth:`Snapshot.restore` moves them).

        Raises:
            UnsafeCheckpoint: the file names a global outside the allowlist (it is not loaded).
            UnreadableCheckpoint: unreadable, or not a nanguard snapshot of a known version.
        """
        data = load_checkpoint(path)  # the inert reader checks every global first; never trusted
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise UnreadableCheckpoint(f"{path}: not a nanguard snapshot")
        if data.get("version") != FORMAT_VERSION:
            raise UnreadableCheckpoint(f"{path}: nanguard snapshot version {data.get('version')!r} is unknown")
        return Snapshot(step=data["step"], states=data["states"], rng=data["rng"], extra=data["extra"])
