"""base.py holds what the journal's writer and readers share: where the journal lives, its schema, the
record types the guard fills in, and file hashing. No SQL runs here."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SCHEMA_VERSION = 1
"""Bumped only for changes an older nanguard cannot read. New tables (``checkpoints``, ``snapshots``, ``metrics``) and
new columns (``incidents.rolled_back``) are additive: created on open (see :data:`ADDED_COLUMNS`), ignored
by older readers, so the version stays 1."""
JOURNAL_DIR = ".nanguard"
JOURNAL_FILE = "journal.db"

SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    id INTEGER PRIMARY KEY,
    started_at REAL NOT NULL,
    ended_at REAL,
    status TEXT NOT NULL,             -- running | finished | stopped | dirty | crashed
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
    wall_time REAL NOT NULL,
    rolled_back INTEGER NOT NULL DEFAULT 0  -- 1 once a rollback went back to before this incident's step
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
CREATE TABLE IF NOT EXISTS snapshots (
    id INTEGER PRIMARY KEY,
    run_id INTEGER NOT NULL REFERENCES runs(id),
    step INTEGER NOT NULL,
    epoch INTEGER,
    batch_index INTEGER,
    path TEXT NOT NULL,               -- relative to the run folder, POSIX separators
    sha256 TEXT NOT NULL,
    size INTEGER NOT NULL,            -- bytes
    clean INTEGER NOT NULL,           -- 1 when the state passed a scan before it was taken
    pinned INTEGER NOT NULL DEFAULT 0,  -- 1 for the newest clean snapshot: rotation never deletes it
    deleted INTEGER NOT NULL DEFAULT 0, -- 1 once rotation removed the file
    wall_time REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS snapshots_by_step ON snapshots(run_id, step);
CREATE TABLE IF NOT EXISTS metrics (
    id INTEGER PRIMARY KEY,
    run_id INTEGER NOT NULL REFERENCES runs(id),
    step INTEGER NOT NULL,            -- repeats after an in-process rollback rewinds the step counter
    epoch INTEGER,
    batch_index INTEGER,
    loss REAL,                        -- NULL when non-finite; see loss_text
    loss_text TEXT,
    grad_norm REAL,
    grad_norm_text TEXT,
    clip_threshold REAL,              -- the norm the gradients were clipped to, NULL when not clipped
    lr REAL,                          -- the first param group's LR as applied (after back-off), NULL when unknown
    applied INTEGER NOT NULL,         -- 1 when the update was applied
    wall_time REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS metrics_by_step ON metrics(run_id, step);
"""

ADDED_COLUMNS = (
    ("incidents", "rolled_back", "INTEGER NOT NULL DEFAULT 0"),
    # The attempt: 0 at the run's start, +1 after each in-process rollback (steps repeat in a new attempt).
    ("incidents", "attempt", "INTEGER NOT NULL DEFAULT 0"),
    ("actions", "attempt", "INTEGER NOT NULL DEFAULT 0"),
    ("metrics", "attempt", "INTEGER NOT NULL DEFAULT 0"),
    # The training loop's own step counter (nanoGPT's iter_num) when the loop gave one.
    ("incidents", "loop_step", "INTEGER"),
    ("actions", "loop_step", "INTEGER"),
    ("metrics", "loop_step", "INTEGER"),
    # Which micro-batch of a gradient-accumulation step a loss incident came from (0-based).
    ("incidents", "micro_batch", "INTEGER"),
    ("runs", "attempts", "INTEGER NOT NULL DEFAULT 0"),
    # The process's start time (Linux: clock ticks since boot, /proc/<pid>/stat field 22, plus btime), so a
    # reader tells a live run from one whose process died (or whose pid was reused): see readers.run_alive.
    ("runs", "process_start", "REAL"),
)
"""Columns added after their table first shipped: ``(table, column, declaration)``. A journal created
before them gets them on open (``ALTER TABLE ... ADD COLUMN``); readers of an old journal fill the default."""

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
    loop_step: int | None = None
    """The training loop's own step counter, when the loop gave one."""
    micro_batch: int | None = None
    """Which micro-batch of a gradient-accumulation step a loss incident came from (0-based)."""


@dataclass(frozen=True)
class MetricRecord:
    """What one step measured, for curves (``nanguard report``) and progress (``nanguard status``)."""

    step: int
    epoch: int | None
    batch_index: int | None
    loss: float | None
    grad_norm: float | None
    clip_threshold: float | None
    lr: float | None
    applied: bool
    wall_time: float
    loop_step: int | None = None
    attempt: int = 0
    """The run's attempt the step belongs to (the journal's at the time the step ran, since rows are buffered)."""


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
