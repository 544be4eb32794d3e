"""backups.py owns a run folder's backups: taking one before a rollback writes anything, and putting the
newest one back (``nanguard undo``).

A backup is ``<run_dir>/.nanguard/backups/<UTC time>/`` holding a copy of each file of :data:`BACKED_UP` that
exists, and ``manifest.json`` (what the files were, their SHA-256, which action took it, whether it was
undone or reverted). The manifest is written last: a folder without one is an interrupted backup and never
restored. :func:`undo_last` restores the newest backup not yet undone, byte for byte, under the run lock
(:mod:`~nanguard.runs.lock`) after an intent record (:mod:`~nanguard.runs.intent`), records a ``disk_undo``
action in the journal and marks it used. It does not
decide what a rollback changes: :mod:`~nanguard.runs.ultralytics_disk` does, and calls :func:`take_backup`.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nanguard.atomic import atomic_copy, atomic_write_bytes, remove_durably
from nanguard.journal import JOURNAL_DIR, Journal
from nanguard.paths import BadPath, read_json_file, require_regular_file
from nanguard.runs.base import RESULTS_CSV, WEIGHTS_DIR, RollbackRefused
from nanguard.runs.intent import clear_intent, committed, intent_path, new_intent_id, read_intent, write_intent
from nanguard.runs.lock import folder_writer, utc_now

BACKUPS_DIR = "backups"
MANIFEST = "manifest.json"
MAX_MANIFEST_BYTES = 1 << 20
"""Largest manifest read (1 MiB): it lists three files with their SHA-256; a larger one is not nanguard's."""
BACKED_UP = (f"{WEIGHTS_DIR}/last.pt", f"{WEIGHTS_DIR}/best.pt", RESULTS_CSV)
"""The files a rollback may change, relative to the run folder; each is backed up before anything is written."""


@dataclass(frozen=True)
class UndoResult:
    """What :func:`undo_last` did: the backup restored, the files put back and the files removed (they did not
    exist when the backup was taken), the journal action id, and what was recovered first (a killed rollback
    reverted or a killed undo completed), if anything."""

    run_dir: Path
    backup_dir: Path
    restored: list[str]
    removed: list[str]
    action_id: int
    recovered: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"run_dir": str(self.run_dir), "backup_dir": str(self.backup_dir), "restored": list(self.restored),
                "removed": list(self.removed), "action_id": self.action_id, "recovered": self.recovered}


def require_replaceable(run: Path) -> None:
    """Raise :class:`RollbackRefused` when a file rollback and undo replace (:data:`BACKED_UP`) is there but is
    no regular file (a folder, a FIFO, a device, a symlink loop): checked before anything is written, so such a
    run folder is refused whole instead of failing half-way through a restore."""
    for name in BACKED_UP:
        path = run / name
        if os.path.lexists(path):
            try:
                require_regular_file(path)
            except BadPath as err:
                raise RollbackRefused(f"{err}; rollback and undo replace it, so they change nothing") from None


def backup_root(run: Path) -> Path:
    """``<run>/.nanguard/backups``."""
    return run / JOURNAL_DIR / BACKUPS_DIR


def new_backup_name() -> str:
    """The folder name of the next backup: its UTC time, to the microsecond (newest sorts last)."""
    return dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%S.%fZ")


def take_backup(run: Path, about: dict[str, Any], name: str | None = None) -> Path:
    """Copy every file of :data:`BACKED_UP` that exists into a new ``.nanguard/backups/<name>/`` (default: the
    UTC time) and write its manifest (the manifest comes last: a folder without one is an interrupted backup
    and never restored)."""
    root = backup_root(run)
    root.mkdir(parents=True, exist_ok=True)
    folder = root / (name or new_backup_name())
    folder.mkdir()
    files: dict[str, dict[str, Any]] = {}
    for entry in BACKED_UP:
        source = run / entry
        if source.is_file():
            copy = folder / entry
            copy.parent.mkdir(parents=True, exist_ok=True)
            atomic_copy(source, copy)
            files[entry] = {"existed": True, "sha256": sha256_file(copy), "size": copy.stat().st_size}
        else:
            files[entry] = {"existed": False}
    manifest = {"created": utc_now(), **about, "files": files, "undone_at": None}
    atomic_write_bytes(folder / MANIFEST, json.dumps(manifest, indent=2).encode("utf-8"))
    return folder


def read_manifest(folder: Path) -> dict[str, Any] | None:
    """The backup's manifest, or None when it has none (an interrupted backup) or it is not a JSON object with
    a ``files`` object."""
    try:
        manifest = read_json_file(folder / MANIFEST, MAX_MANIFEST_BYTES, "backup manifest")
    except (BadPath, ValueError):
        return None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), dict):
        return None
    return manifest


def mark_backup(folder: Path, manifest: dict[str, Any], **fields: Any) -> None:
    """Rewrite the backup's manifest with ``fields`` set (``undone_at``, ``reverted_at``)."""
    manifest.update(fields)
    atomic_write_bytes(folder / MANIFEST, json.dumps(manifest, indent=2).encode("utf-8"))


def restore_backup(run: Path, folder: Path, manifest: dict[str, Any]) -> tuple[list[str], list[str]]:
    """Put the backup's files back byte for byte (a file it says did not exist is removed); idempotent, so a
    killed restore is finished by running it again. Returns (restored, removed).

    Raises:
        RollbackRefused: a backup copy no longer matches its recorded SHA-256 (checked before any change).
    """
    files: dict[str, Any] = manifest["files"]
    for name, info in files.items():
        if name not in BACKED_UP or not isinstance(info, dict):
            raise RollbackRefused(f"{folder / MANIFEST}: names {name!r}, not a file a rollback changes; nothing "
                                  "restored")
        if info.get("existed") and sha256_file_or_none(folder / name) != info.get("sha256"):
            raise RollbackRefused(f"{folder / name}: backup copy does not match its recorded SHA-256; "
                                  "nothing restored")
    restored: list[str] = []
    removed: list[str] = []
    for name, info in files.items():
        target = run / name
        if info.get("existed"):
            if sha256_file_or_none(target) != info.get("sha256"):
                atomic_copy(folder / name, target)
            restored.append(name)
        elif target.exists():
            remove_durably(target)
            removed.append(name)
    return restored, removed


def undo_last(run_dir: str | Path) -> UndoResult:
    """Restore the newest backup not yet undone, byte for byte, under the run's lock; record it; mark it used.

    A file the backup says did not exist is removed. Before that, what a killed rollback or undo left is
    completed or reverted (:func:`~nanguard.runs.intent.recover_pending`; ``recovered`` says what). The
    intent record written first makes the undo all-or-nothing: a killed one is completed by the next command.
    A folder with no ``.nanguard/backups`` is refused before anything is created.

    Raises:
        RollbackRefused: no run folder, no backup left to undo, or a backup file that no longer matches its
            recorded SHA-256.
        RunLocked: another process holds the lock (or a live Guard writes snapshots into the folder).
    """
    run = Path(run_dir)
    if not run.is_dir():
        raise RollbackRefused(f"{run}: no such run folder")
    if not (run / JOURNAL_DIR).is_dir():  # not a folder nanguard ever rolled back: create nothing
        raise RollbackRefused(f"{backup_root(run)}: no backup left to undo")
    require_replaceable(run)
    with folder_writer(run, "undo"):
        recovered = recover_pending(run)
        folder, manifest = _newest_backup(run)
        journal = Journal(run)
        try:
            intent_id = new_intent_id()
            write_intent(run, {"action": "disk_undo", "id": intent_id, "backup": folder.name})
            restored, removed = restore_backup(run, folder, manifest)
            import torch

            run_id = journal.start_run(policy={"command": "nanguard undo"}, torch_version=torch.__version__)
            action_id = journal.record_action(
                run_id, step=-1, action="disk_undo", reason=f"restored backup {folder.name}",
                detail={"backup": str(folder.resolve()), "restored": restored, "removed": removed,
                        "undid": manifest.get("action"), "intent": intent_id},
            )
            journal.end_run(run_id, "finished")
            mark_backup(folder, manifest, undone_at=utc_now())
            clear_intent(run)
        finally:
            journal.close()
    return UndoResult(run, folder, restored, removed, action_id, recovered)


def recover_pending(run: Path) -> str | None:
    """Complete or revert what a killed rollback or undo left (see :mod:`~nanguard.runs.intent`); returns the one line
    that says what was done, or None when nothing was pending. Call it under the run lock.

    Raises:
        RollbackRefused: an unreadable intent, or a backup that no longer matches its recorded SHA-256.
    """
    intent = read_intent(run)
    if intent is None:
        return None
    for name in BACKED_UP:  # temp files of an atomic write the kill interrupted
        target = run / name
        for tmp in target.parent.glob(f".{target.name}.*.tmp") if target.parent.is_dir() else ():
            with contextlib.suppress(OSError):
                tmp.unlink()
    action, intent_id = intent["action"], intent["id"]
    folder = backup_root(run) / intent["backup"]
    manifest = read_manifest(folder)
    if committed(run, action, intent_id):
        if action == "disk_undo" and manifest is not None and not manifest.get("undone_at"):
            mark_backup(folder, manifest, undone_at=utc_now())
        clear_intent(run)
        what = "rollback" if action == "disk_rollback" else "undo"
        return f"{intent_path(run)}: the last {what} had finished; its intent record was removed"
    if manifest is None:  # killed before the backup was complete: nothing else had been changed
        if action == "disk_rollback":
            shutil.rmtree(folder, ignore_errors=True)
            clear_intent(run)
            return (f"{intent_path(run)}: a killed rollback had changed nothing yet; its partial backup was "
                    "removed")
        raise RollbackRefused(f"{folder}: the backup an interrupted undo restores has no manifest; inspect it")
    journal = Journal(run)
    try:
        restored, removed = restore_backup(run, folder, manifest)
        run_id = journal.start_run(policy={"command": "nanguard recovery"})
        if action == "disk_rollback":
            journal.record_action(run_id, step=-1, action="disk_rollback_reverted",
                                  reason=f"reverted a rollback killed before it finished (backup {folder.name})",
                                  detail={"intent": intent_id, "backup": str(folder.resolve()),
                                          "restored": restored, "removed": removed})
            now = utc_now()
            mark_backup(folder, manifest, undone_at=now, reverted_at=now)
            line = (f"{run}: reverted a rollback killed before it finished (from backup {folder.name}); the "
                    "folder is as it was before it")
        else:
            journal.record_action(run_id, step=-1, action="disk_undo",
                                  reason=f"completed an undo killed before it finished (backup {folder.name})",
                                  detail={"intent": intent_id, "backup": str(folder.resolve()),
                                          "restored": restored, "removed": removed, "undid": manifest.get("action")})
            mark_backup(folder, manifest, undone_at=utc_now())
            line = f"{run}: completed an undo killed before it finished (backup {folder.name})"
        journal.end_run(run_id, "finished")
    finally:
        journal.close()
    clear_intent(run)
    return line


def _newest_backup(run: Path) -> tuple[Path, dict[str, Any]]:
    root = backup_root(run)
    folders = sorted((p for p in root.iterdir() if p.is_dir()), reverse=True) if root.is_dir() else []
    for folder in folders:
        manifest = read_manifest(folder)
        if manifest is None:
            continue  # an interrupted backup: no manifest
        if not manifest.get("undone_at"):
            return folder, manifest
    raise RollbackRefused(f"{root}: no backup left to undo")


def sha256_file_or_none(path: Path) -> str | None:
    """:func:`sha256_file`, or None when ``path`` is not a readable file."""
    try:
        return sha256_file(path)
    except OSError:
        return None


# Not nanguard.journal.file_digest: that one returns None when the file cannot be read (and also hashes
# folders), where a missing or unreadable file here must raise, as it always has.
def sha256_file(path: Path) -> str:
    """The SHA-256 of a file's bytes, hex."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
