"""journal.py owns the run journal: the SQLite schema and every write to it.

A run folder's journal is ``<run_dir>/.nanguard/journal.db``, SQLite in WAL mode. It holds ``runs`` (one
row per guarded process), ``incidents`` (one row per anomaly: where, when, how bad, what was done, and
whether a rollback later undid its step), ``actions`` (what the guard did: skip, restore, stop, LR back-off),
``checkpoints`` (one row per checkpoint audit that ``nanguard audit --record`` stored, with its hash and
taint) and ``snapshots`` (one row per snapshot file the guard wrote, with its hash, whether it was clean,
pinned, or deleted by rotation) and ``metrics`` (what each step measured: loss, gradient norm, clip
threshold, LR, whether the update was applied). Each write is its own committed transaction with
``synchronous=FULL``: an incident is on disk before training continues, so a crash right after it loses
nothing. Metrics are the exception that keeps healthy steps cheap: the guard buffers them and writes a batch
every few hundred steps or seconds (a crash loses at most that batch of curve points, never an incident).
Nothing is ever deleted: rolled-back incidents and rotated snapshots are marked.

Readers (the CLI) use :func:`read_incidents`, :func:`read_actions`, :func:`read_checkpoints`,
:func:`read_snapshots`, :func:`read_metrics` and :func:`read_runs`, which open the database read-only. This
module imports no torch, so ``nanguard incidents`` stays fast; it does not write or delete snapshot files
either (:mod:`nanguard.snapshot_store` does).
"""

from __future__ import annotations

from nanguard.journal.base import (
    JOURNAL_DIR,
    JOURNAL_FILE,
    NONFINITE_KIND_PREFIX,
    SCHEMA_VERSION,
    CheckpointRecord,
    IncidentRecord,
    MetricRecord,
    file_digest,
    journal_path,
)
from nanguard.journal.readers import (
    read_actions,
    read_checkpoints,
    read_incidents,
    read_metrics,
    read_runs,
    read_snapshots,
)
from nanguard.journal.writer import Journal

__all__ = [
    "JOURNAL_DIR",
    "JOURNAL_FILE",
    "NONFINITE_KIND_PREFIX",
    "SCHEMA_VERSION",
    "CheckpointRecord",
    "IncidentRecord",
    "Journal",
    "MetricRecord",
    "file_digest",
    "journal_path",
    "read_actions",
    "read_checkpoints",
    "read_incidents",
    "read_metrics",
    "read_runs",
    "read_snapshots",
]
