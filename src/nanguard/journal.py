"""journal.py owns the run journal: the SQLite schema and every write to it.

A run folder's journal is ``<run_dir>/.nanguard/journal.db``, SQLite in WAL mode. It holds ``runs`` (one
row per guarded process), ``incidents`` (one row per anomaly: where, when, how bad, what was done) and
``actions`` (what the guard did: skip, restore, stop, LR back-off) and ``checkpoints`` (one row per
checkpoint audit that ``nanguard audit --record`` stored, with its hash and taint). Each write is its own committed
transaction with ``synchronous=FULL``: an incident is on disk before training continues, so a crash right
after it loses nothing. Writes happen only when something happens, never per healthy step.

Readers (the CLI) use :func:`read_incidents` and :func:`read_checkpoints`, which open the database
read-only. This module imports no
torch, so ``nanguard incidents`` stays fast.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import sqlite3
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nanguard.errors import JournalError

SCHEMA_VERSION = 1
"""Bumped only for changes an older nanguard cannot read. New tables (``checkpoints``) are additive: created
with ``CREATE TABLE IF NOT EXISTS`` on open, ignored by older readers, so the version stays 1."""
JOURNAL_DIR = ".nanguard"
JOURNAL_FILE = "journal.db"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    id INTEGER PRIMARY KEY,
    started_at REAL NOT NULL,
    ended_at REAL,
    status TEXT NOT NULL,             -- running | finished | stopped | crashed
    host TEXT NOT NULL,
    pid INTEGER NOT NULL,
    rank INTEGER NOT NULL,
    nanguard_version TEXT NOT NULL,
    torch_version TEXT,
    policy TEXT NOT NULL              -- JSON
);
CREATE TABLE IF NOT EXISTS incidents (
    id INTEGER PRIMARY KEY,
    run_id INTEGER NOT NULL REFERENCES runs(id),
    kind TEXT NOT NULL,
    epoch INTEGER,
    step INTEGER NOT NULL,
    batch_index INTEGER,
    sample_ids TEXT,                  -- JSON list, or NULL when unknown
    rank INTEGER NOT NULL,
    loss REAL,                        -- NULL when non-finite or unknown; see loss_text
    loss_text TEXT,                   -- 'nan', 'inf', '-inf' when the loss was not finite
    grad_norm REAL,
    grad_norm_text TEXT,
    value REAL,                       -- the measured value that broke a threshold (spikes)
    threshold REAL,
    tensors TEXT NOT NULL,            -- JSON list of tensor names with non-finite values
    action TEXT NOT NULL,
    wall_time REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS incidents_by_step ON incidents(run_id, step);
CREATE TABLE IF NOT EXISTS actions (
    id INTEGER PRIMARY KEY,
    run_id INTEGER NOT NULL REFERENCES runs(id),
    step INTEGER NOT NULL,
    action TEXT NOT NULL,
    reason TEXT NOT NULL,
    detail TEXT NOT NULL,             -- JSON object
    wall_time REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS checkpoints (
    id INTEGER PRIMARY KEY,
    path TEXT NOT NULL,
    sha256 TEXT,                      -- NULL when the file could not be read
    size INTEGER,                     -- bytes; a folder checkpoint counts all its files
    format TEXT,
    epoch REAL,
    step INTEGER,
    status TEXT NOT NULL,             -- clean | dirty | unsafe | unreadable
    findings TEXT NOT NULL,           -- JSON list of objects (location, kind, count, first_index, area)
    parent_path TEXT,                 -- the checkpoint this one was resumed from, NULL when unknown
    tainted INTEGER NOT NULL,         -- 1 when written after a non-finite incident or from a bad parent
    taint_reason TEXT,
    mtime REAL,                       -- the file's modification time, NULL when missing
    wall_time REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS checkpoints_by_path ON checkpoints(path);
"""

NONFINITE_KIND_PREFIX = "nonfinite"
"""Incident kinds that start with this (``nonfinite_loss``, ``nonfinite_model``…) taint later checkpoints."""


@dataclass(frozen=True)
class IncidentRecord:
    """One incident as the guard reports it (plain values only)."""

    kind: str
    step: int
    action: str
    epoch: int | None = None
    batch_index: int | None = None
    sample_ids: Sequence[Any] | None = None
    rank: int = 0
    loss: float | None = None
    grad_norm: float | None = None
    value: float | None = None
    threshold: float | None = None
    tensors: Sequence[str] = field(default_factory=tuple)


@dataclass(frozen=True)
class CheckpointRecord:
    """One checkpoint audit to store (plain values only; the journal never imports the ckpt package)."""

    path: str
    status: str
    sha256: str | None = None
    size: int | None = None
    format: str | None = None
    epoch: float | None = None
    step: int | None = None
    findings: Sequence[dict[str, Any]] = field(default_factory=tuple)
    parent_path: str | None = None
    mtime: float | None = None


def file_digest(path: str | Path) -> tuple[str, int, float] | None:
    """SHA-256, size in bytes and latest mtime of a checkpoint file, or of every file under a checkpoint
    folder (relative names included in the hash, sorted); None when it cannot be read."""
    root = Path(path)
    try:
        files = sorted(p for p in root.rglob("*") if p.is_file()) if root.is_dir() else [root]
        digest, size, mtime = hashlib.sha256(), 0, 0.0
        for file in files:
            if root.is_dir():
                digest.update(file.relative_to(root).as_posix().encode() + b"\0")
            with file.open("rb") as handle:
                for block in iter(lambda: handle.read(1 << 20), b""):
                    digest.update(block)
                    size += len(block)
            mtime = max(mtime, file.stat().st_mtime)
    except OSError:
        return None
    if not files:
        return None
    return digest.hexdigest(), size, mtime


def journal_path(run_dir: str | Path) -> Path:
    return Path(run_dir) / JOURNAL_DIR / JOURNAL_FILE


def _finite_or_text(value: float | None) -> tuple[float | None, str | None]:
    # SQLite stores NaN as NULL, so a non-finite value is kept as text beside a NULL number.
    if value is None:
        return None, None
    if value != value or value in (float("inf"), float("-inf")):
        return None, str(value)
    return float(value), None


class Journal:
    """The writable journal of one run folder. Creates ``.nanguard/journal.db`` when missing."""

    def __init__(self, run_dir: str | Path) -> None:
        self.path = journal_path(run_dir)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            probe = self.path.parent / f".write-test-{os.getpid()}"
            probe.touch()
            probe.unlink()
            self._db = sqlite3.connect(self.path, isolation_level=None, timeout=30)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            version = self._db.execute("PRAGMA user_version").fetchone()[0]
            if version not in (0, SCHEMA_VERSION):
                raise JournalError(f"{self.path}: journal schema version {version} is newer than this nanguard")
            self._db.executescript(_SCHEMA)
            self._db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
        except (OSError, sqlite3.Error) as err:
            raise JournalError(f"{self.path}: cannot create or open the journal ({err})") from None

    def start_run(self, *, policy: dict[str, Any], rank: int = 0, torch_version: str | None = None) -> int:
        from nanguard import __version__

        cursor = self._write(
            "INSERT INTO runs (started_at, status, host, pid, rank, nanguard_version, torch_version, policy)"
            " VALUES (?, 'running', ?, ?, ?, ?, ?, ?)",
            (time.time(), socket.gethostname(), os.getpid(), rank, __version__, torch_version, json.dumps(policy)),
        )
        return int(cursor.lastrowid or 0)

    def end_run(self, run_id: int, status: str) -> None:
        self._write("UPDATE runs SET ended_at = ?, status = ? WHERE id = ?", (time.time(), status, run_id))

    def record_incident(self, run_id: int, incident: IncidentRecord) -> int:
        loss, loss_text = _finite_or_text(incident.loss)
        norm, norm_text = _finite_or_text(incident.grad_norm)
        value, _ = _finite_or_text(incident.value)
        cursor = self._write(
            "INSERT INTO incidents (run_id, kind, epoch, step, batch_index, sample_ids, rank, loss, loss_text,"
            " grad_norm, grad_norm_text, value, threshold, tensors, action, wall_time)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                run_id, incident.kind, incident.epoch, incident.step, incident.batch_index,
                None if incident.sample_ids is None else json.dumps(list(incident.sample_ids)),
                incident.rank, loss, loss_text, norm, norm_text, value, incident.threshold,
                json.dumps(list(incident.tensors)), incident.action, time.time(),
            ),
        )
        return int(cursor.lastrowid or 0)

    def record_action(self, run_id: int, *, step: int, action: str, reason: str, detail: dict[str, Any]) -> int:
        cursor = self._write(
            "INSERT INTO actions (run_id, step, action, reason, detail, wall_time) VALUES (?, ?, ?, ?, ?, ?)",
            (run_id, step, action, reason, json.dumps(detail), time.time()),
        )
        return int(cursor.lastrowid or 0)

    def record_checkpoint(self, record: CheckpointRecord) -> dict[str, Any]:
        """Store one checkpoint audit and return the stored row (as :func:`read_checkpoints` gives it).

        The checkpoint is tainted when the journal holds a non-finite incident recorded before the file's
        mtime (the weights may carry it), or when its parent's latest row is dirty, unsafe or tainted.
        """
        reason = self._taint_reason(record)
        cursor = self._write(
            "INSERT INTO checkpoints (path, sha256, size, format, epoch, step, status, findings, parent_path,"
            " tainted, taint_reason, mtime, wall_time) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                record.path, record.sha256, record.size, record.format, record.epoch, record.step, record.status,
                json.dumps(list(record.findings)), record.parent_path, int(reason is not None), reason,
                record.mtime, time.time(),
            ),
        )
        row = self._db.execute("SELECT * FROM checkpoints WHERE id = ?", (cursor.lastrowid,)).fetchone()
        names = [column[0] for column in self._db.execute("SELECT * FROM checkpoints LIMIT 0").description]
        return _checkpoint_dict(dict(zip(names, row, strict=True)))

    def _taint_reason(self, record: CheckpointRecord) -> str | None:
        try:
            if record.mtime is not None:
                incident = self._db.execute(
                    "SELECT id, kind, step FROM incidents WHERE kind LIKE ? AND wall_time < ? ORDER BY id LIMIT 1",
                    (NONFINITE_KIND_PREFIX + "%", record.mtime),
                ).fetchone()
                if incident is not None:
                    return f"written after non-finite incident {incident[0]} ({incident[1]} at step {incident[2]})"
            if record.parent_path is not None:
                parent = self._db.execute(
                    "SELECT status, tainted FROM checkpoints WHERE path = ? ORDER BY id DESC LIMIT 1",
                    (record.parent_path,),
                ).fetchone()
                if parent is not None and (parent[0] in ("dirty", "unsafe") or parent[1]):
                    state = "tainted" if parent[1] and parent[0] not in ("dirty", "unsafe") else parent[0]
                    return f"parent {record.parent_path} is {state}"
        except sqlite3.Error as err:
            raise JournalError(f"{self.path}: cannot read the journal ({err})") from None
        return None

    def _write(self, sql: str, params: tuple[Any, ...]) -> sqlite3.Cursor:
        try:
            return self._db.execute(sql, params)
        except sqlite3.Error as err:
            raise JournalError(f"{self.path}: cannot write to the journal ({err})") from None

    def close(self) -> None:
        self._db.close()


def _open_read_only(run_dir: str | Path) -> sqlite3.Connection:
    run_path = Path(run_dir)
    if not run_path.is_dir():
        raise JournalError(f"{run_path}: no such run folder")
    path = journal_path(run_path)
    if not path.is_file():
        raise JournalError(f"{run_path}: no nanguard journal (expected {path})")
    try:
        db = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True, timeout=30)
        db.row_factory = sqlite3.Row
        db.execute("SELECT count(*) FROM incidents").fetchone()
    except sqlite3.Error as err:
        raise JournalError(f"{path}: not a readable nanguard journal ({err})") from None
    return db


def read_incidents(run_dir: str | Path) -> list[dict[str, Any]]:
    """Every incident of a run folder, oldest first, as plain dicts (JSON columns decoded, non-finite
    losses and norms given back as floats)."""
    db = _open_read_only(run_dir)
    try:
        rows = db.execute("SELECT * FROM incidents ORDER BY id").fetchall()
    except sqlite3.Error as err:
        raise JournalError(f"{journal_path(run_dir)}: cannot read incidents ({err})") from None
    finally:
        db.close()
    return [_incident_dict(row) for row in rows]


def read_actions(run_dir: str | Path) -> list[dict[str, Any]]:
    """Every action of a run folder, oldest first."""
    db = _open_read_only(run_dir)
    try:
        rows = db.execute("SELECT * FROM actions ORDER BY id").fetchall()
    except sqlite3.Error as err:
        raise JournalError(f"{journal_path(run_dir)}: cannot read actions ({err})") from None
    finally:
        db.close()
    return [{**dict(row), "detail": json.loads(row["detail"])} for row in rows]


def read_checkpoints(run_dir: str | Path) -> list[dict[str, Any]]:
    """Every stored checkpoint audit of a run folder, oldest first (``findings`` decoded, ``tainted`` a
    bool). A journal written before the ``checkpoints`` table existed gives ``[]``."""
    db = _open_read_only(run_dir)
    try:
        exists = db.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'checkpoints'").fetchone()
        rows = db.execute("SELECT * FROM checkpoints ORDER BY id").fetchall() if exists else []
    except sqlite3.Error as err:
        raise JournalError(f"{journal_path(run_dir)}: cannot read checkpoints ({err})") from None
    finally:
        db.close()
    return [_checkpoint_dict(dict(row)) for row in rows]


def _checkpoint_dict(out: dict[str, Any]) -> dict[str, Any]:
    out["findings"] = json.loads(out["findings"])
    out["tainted"] = bool(out["tainted"])
    if isinstance(out["epoch"], float) and out["epoch"].is_integer():
        out["epoch"] = int(out["epoch"])
    return out


def _incident_dict(row: sqlite3.Row) -> dict[str, Any]:
    out = dict(row)
    for key in ("loss", "grad_norm"):
        text = out.pop(f"{key}_text")
        if text is not None:
            out[key] = float(text)
    out["sample_ids"] = None if out["sample_ids"] is None else json.loads(out["sample_ids"])
    out["tensors"] = json.loads(out["tensors"])
    return out
