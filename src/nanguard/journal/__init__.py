"""journal.py owns the run journal: the SQLite schema and every write to it.

A run folder's journal is ``<run_dir>/.nanguard/journal.db``, SQLite in WAL mode. It holds ``runs`` (one
row per guarded process), ``incidents`` (one row per anomaly: where, when, how bad, what was done, and
whether a rollback later undid its step), ``actions`` (what the guard did: skip, restore, stop, LR back-off),
``checkpoints`` (one row per checkpoint audit that ``nanguard audit --record`` stored, with its hash and
taint) and ``snapshots`` (one row per snapshot file the guard wrote, with its hash, whether it was clean,
pinned, or deleted by rotation). Each write is its own committed transaction with ``synchronous=FULL``: an
incident is on disk before training continues, so a crash right after it loses nothing. Writes happen only
when something happens, never per healthy step. Nothing is ever deleted: rolled-back incidents and
rotated snapshots are marked.

Readers (the CLI) use :func:`read_incidents`, :func:`read_actions`, :func:`read_checkpoints` and
:func:`read_snapshots`, which open the database read-only. This module imports no torch, so
``nanguard incidents`` stays fast; it does not write or delete snapshot files either
(:mod:`nanguard.snapshot_store` does).
"""

from __future__ import annotations

from nanguard.journal.base import (
    JOURNAL_DIR,
    JOURNAL_FILE,
    NONFINITE_KIND_PREFIX,
    SCHEMA_VERSION,
    CheckpointRecord,
    IncidentRecord,
    file_digest,
    journal_path,
)
from nanguard.journal.readers import read_actions, read_checkpoints, read_incidents, read_snapshots
from nanguard.journal.writer import Journal

__all__ = [
    "JOURNAL_DIR",
    "JOURNAL_FILE",
    "NONFINITE_KIND_PREFIX",
    "SCHEMA_VERSION",
    "CheckpointRecord",
    "IncidentRecord",
    "Journal",
    "file_digest",
    "journal_path",
    "read_actions",
    "read_checkpoints",
    "read_incidents",
    "read_snapshots",
]
