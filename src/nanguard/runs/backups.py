"""backups.py owns a run folder's backups: taking one before a rollback writes anything, and putting the
newest one back (``nanguard undo``).

A backup is ``<run_dir>/.nanguard/backups/<UTC time>/`` holding a copy of each file of :data:`BACKED_UP` that
exists, and ``manifest.json`` (what the files were, their SHA-256, which action took it, whether it was
undone). The manifest is written last: a folder without one is an interrupted backup and never restored.
:func:`undo_last` restores the newest backup not yet undone, byte for byte, under the run lock
(:mod:`~nanguard.runs.lock`), records a ``disk_undo`` action in the journal and marks it used. It does not
decide what a rollback changes: :mod:`~nanguard.runs.ultralytics_disk` does, and calls :func:`take_backup`.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nanguard.atomic import atomic_copy, atomic_write_bytes
from nanguard.journal import JOURNAL_DIR, Journal
from nanguard.runs.base import RESULTS_CSV, WEIGHTS_DIR, RollbackRefused
from nanguard.runs.lock import run_lock, utc_now

BACKUPS_DIR = "backups"
MANIFEST = "manifest.json"
BACKED_UP = (f"{WEIGHTS_DIR}/last.pt", f"{WEIGHTS_DIR}/best.pt", RESULTS_CSV)
"""The files a rollback may change, relative to the run folder; each is backed up before anything is written."""


@dataclass(frozen=True)
class UndoResult:
    """What :func:`undo_last` did: the backup restored, the files put back and the files removed (they did not
    exist when the backup was taken), and the journal action id."""

    run_dir: Path
    backup_dir: Path
    restored: list[str]
    removed: list[str]
    action_id: int

    def to_dict(self) -> dict[str, Any]:
        return {"run_dir": str(self.run_dir), "backup_dir": str(self.backup_dir), "restored": list(self.restored),
                "removed": list(self.removed), "action_id": self.action_id}


def take_backup(run: Path, about: dict[str, Any]) -> Path:
    """Copy every file of :data:`BACKED_UP` that exists into a new ``.nanguard/backups/<UTC time>/`` and write
    its manifest (the manifest comes last: a folder without one is an interrupted backup and never restored)."""
    root = run / JOURNAL_DIR / BACKUPS_DIR
    root.mkdir(parents=True, exist_ok=True)
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%S.%fZ")
    folder = root / stamp
    folder.mkdir()
    files: dict[str, dict[str, Any]] = {}
    for name in BACKED_UP:
        source = run / name
        if source.is_file():
            copy = folder / name
            copy.parent.mkdir(parents=True, exist_ok=True)
            atomic_copy(source, copy)
            files[name] = {"existed": True, "sha256": sha256_file(copy), "size": copy.stat().st_size}
        else:
            files[name] = {"existed": False}
    manifest = {"created": utc_now(), **about, "files": files, "undone_at": None}
    atomic_write_bytes(folder / MANIFEST, json.dumps(manifest, indent=2).encode("utf-8"))
    return folder


def undo_last(run_dir: str | Path) -> UndoResult:
    """Restore the newest backup not yet undone, byte for byte, under the run's lock; record it; mark it used.

    A file the backup says did not exist is removed.

    Raises:
        RollbackRefused: no run folder, no backup left to undo, or a backup file that no longer matches its
            recorded SHA-256.
        RunLocked: another process holds the lock.
    """
    run = Path(run_dir)
    if not run.is_dir():
        raise RollbackRefused(f"{run}: no such run folder")
    with run_lock(run, "undo"):
        folder, manifest = _newest_backup(run)
        files: dict[str, dict[str, Any]] = manifest["files"]
        for name, info in files.items():
            if info.get("existed") and sha256_file(folder / name) != info.get("sha256"):
                raise RollbackRefused(f"{folder / name}: backup copy does not match its recorded SHA-256; "
                                      "nothing restored")
        journal = Journal(run)
        try:
            restored: list[str] = []
            removed: list[str] = []
            for name, info in files.items():
                target = run / name
                if info.get("existed"):
                    atomic_copy(folder / name, target)
                    restored.append(name)
                elif target.exists():
                    target.unlink()
                    removed.append(name)
            import torch

            run_id = journal.start_run(policy={"command": "nanguard undo"}, torch_version=torch.__version__)
            action_id = journal.record_action(
                run_id, step=-1, action="disk_undo", reason=f"restored backup {folder.name}",
                detail={"backup": str(folder.resolve()), "restored": restored, "removed": removed,
                        "undid": manifest.get("action")},
            )
            journal.end_run(run_id, "finished")
            manifest["undone_at"] = utc_now()
            atomic_write_bytes(folder / MANIFEST, json.dumps(manifest, indent=2).encode("utf-8"))
        finally:
            journal.close()
    return UndoResult(run, folder, restored, removed, action_id)


def _newest_backup(run: Path) -> tuple[Path, dict[str, Any]]:
    root = run / JOURNAL_DIR / BACKUPS_DIR
    folders = sorted((p for p in root.iterdir() if p.is_dir()), reverse=True) if root.is_dir() else []
    for folder in folders:
        try:
            manifest = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue  # an interrupted backup: no manifest
        if not manifest.get("undone_at"):
            return folder, manifest
    raise RollbackRefused(f"{root}: no backup left to undo")


# Not nanguard.journal.file_digest: that one returns None when the file cannot be read (and also hashes
# folders), where a missing or unreadable file here must raise, as it always has.
def sha256_file(path: Path) -> str:
    """The SHA-256 of a file's bytes, hex."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
