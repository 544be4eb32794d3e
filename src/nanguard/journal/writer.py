"""writer.py holds :class:`Journal`, the only code that writes to a journal: it creates the schema, adds
columns an older journal lacks, and commits each write on its own (``synchronous=FULL``)."""

from __future__ import annotations

import json
import os
import socket
import sqlite3
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from nanguard.errors import JournalError
from nanguard.journal.base import (
    ADDED_COLUMNS,
    NONFINITE_KIND_PREFIX,
    SCHEMA,
    SCHEMA_VERSION,
    CheckpointRecord,
    IncidentRecord,
    MetricRecord,
    journal_path,
)
from nanguard.journal.readers import checked_row, checkpoint_dict, process_start_time, snapshot_dict


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
        db: sqlite3.Connection | None = None
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            probe = self.path.parent / f".write-test-{os.getpid()}"
            probe.touch()
            probe.unlink()
            self._attempts: dict[int, int] = {}
            db = self._db = sqlite3.connect(self.path, isolation_level=None, timeout=30)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            version = self._db.execute("PRAGMA user_version").fetchone()[0]
            if version not in (0, SCHEMA_VERSION):
                raise JournalError(f"{self.path}: journal schema version {version} is newer than this nanguard")
            # Tables and version in one transaction: a process killed while it first creates the journal leaves
            # either no schema or all of it, never some tables without the version the readers check.
            self._db.executescript(f"BEGIN IMMEDIATE;\n{SCHEMA}\nPRAGMA user_version={SCHEMA_VERSION};\nCOMMIT;")
            self._add_missing_columns()
        except (OSError, sqlite3.Error, JournalError) as err:
            if db is not None:
                db.close()  # a failed open leaves no connection (and so no -wal/-shm files) behind
            if isinstance(err, JournalError):
                raise
            raise JournalError(f"{self.path}: cannot create or open the journal ({err})") from None

    def _add_missing_columns(self) -> None:
        # The check and the change share one write transaction, so two processes opening the same old
        # journal do not both add a column (the second would fail on a duplicate name). ADD COLUMN with a
        # constant default rewrites nothing in SQLite: old rows read the default.
        def add() -> None:
            for table, column, declaration in ADDED_COLUMNS:
                names = {row[1] for row in self._db.execute(f"PRAGMA table_info({table})")}
                if column not in names:
                    self._db.execute(f"ALTER TABLE {table} ADD COLUMN {column} {declaration}")

        self._transaction(add)

    def start_run(self, *, policy: dict[str, Any], rank: int = 0, torch_version: str | None = None) -> int:
        from nanguard import __version__

        cursor = self._write(
            "INSERT INTO runs (started_at, status, host, pid, rank, nanguard_version, torch_version, policy,"
            " process_start) VALUES (?, 'running', ?, ?, ?, ?, ?, ?, ?)",
            (time.time(), socket.gethostname(), os.getpid(), rank, __version__, torch_version, json.dumps(policy),
             process_start_time(os.getpid())),
        )
        run_id = int(cursor.lastrowid or 0)
        self._attempts[run_id] = 0
        return run_id

    def next_attempt(self, run_id: int) -> int:
        """Start the run's next attempt (after an in-process rollback rewound its steps): rows written from now on
        carry it, so a step that repeats is told apart from its first try. Returns the new attempt number."""
        attempt = self._attempts.get(run_id, 0) + 1
        self._attempts[run_id] = attempt
        self._write("UPDATE runs SET attempts = ? WHERE id = ?", (attempt, run_id))
        return attempt

    def attempt(self, run_id: int) -> int:
        """The run's current attempt (0 until a rollback)."""
        return self._attempts.get(run_id, 0)

    def end_run(self, run_id: int, status: str) -> None:
        self._write("UPDATE runs SET ended_at = ?, status = ? WHERE id = ?", (time.time(), status, run_id))

    def record_incident(self, run_id: int, incident: IncidentRecord) -> int:
        loss, loss_text = _finite_or_text(incident.loss)
        norm, norm_text = _finite_or_text(incident.grad_norm)
        value, _ = _finite_or_text(incident.value)
        cursor = self._write(
            "INSERT INTO incidents (run_id, kind, epoch, step, batch_index, sample_ids, rank, loss, loss_text,"
            " grad_norm, grad_norm_text, value, threshold, tensors, action, wall_time, attempt, loop_step,"
            " micro_batch) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                run_id, incident.kind, incident.epoch, incident.step, incident.batch_index,
                None if incident.sample_ids is None else json.dumps(list(incident.sample_ids)),
                incident.rank, loss, loss_text, norm, norm_text, value, incident.threshold,
                json.dumps(list(incident.tensors)), incident.action, time.time(), self.attempt(run_id),
                incident.loop_step, incident.micro_batch,
            ),
        )
        return int(cursor.lastrowid or 0)

    def record_metrics(self, run_id: int, records: Sequence[MetricRecord]) -> None:
        """Store a batch of per-step metrics in one transaction (one fsync for the whole batch)."""
        rows = []
        for r in records:
            loss, loss_text = _finite_or_text(r.loss)
            norm, norm_text = _finite_or_text(r.grad_norm)
            rows.append((run_id, r.step, r.epoch, r.batch_index, loss, loss_text, norm, norm_text,
                         r.clip_threshold, r.lr, int(r.applied), r.wall_time, r.attempt, r.loop_step))
        if not rows:
            return

        def insert() -> None:
            self._db.executemany(
                "INSERT INTO metrics (run_id, step, epoch, batch_index, loss, loss_text, grad_norm, grad_norm_text,"
                " clip_threshold, lr, applied, wall_time, attempt, loop_step)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", rows)

        self._transaction(insert)

    def record_action(self, run_id: int, *, step: int, action: str, reason: str, detail: dict[str, Any],
                      loop_step: int | None = None) -> int:
        cursor = self._write(
            "INSERT INTO actions (run_id, step, action, reason, detail, wall_time, attempt, loop_step)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (run_id, step, action, reason, json.dumps(detail), time.time(), self.attempt(run_id), loop_step),
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
        return checkpoint_dict(dict(zip(names, row, strict=True)))

    def _taint_reason(self, record: CheckpointRecord) -> str | None:
        try:
            if record.mtime is not None:
                # An incident whose update was skipped never reached the state, and one that was rolled
                # back was undone: neither taints what is written later. Any other non-finite incident does.
                incident = self._db.execute(
                    "SELECT id, kind, step FROM incidents WHERE kind LIKE ? AND wall_time < ? AND rolled_back = 0"
                    " AND action NOT IN ('skip', 'scaler_skip') ORDER BY id LIMIT 1",
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

    def mark_rolled_back(self, run_id: int, from_step: int) -> int:
        """Mark every incident of ``run_id`` at ``from_step`` or later, not marked yet, as rolled back (a
        rollback to a snapshot of ``from_step`` undid those steps). Returns how many rows it marked."""
        cursor = self._write(
            "UPDATE incidents SET rolled_back = 1 WHERE run_id = ? AND step >= ? AND rolled_back = 0",
            (run_id, from_step),
        )
        return cursor.rowcount

    # ------------------------------------------------------------------ snapshots
    def record_snapshot(
        self,
        run_id: int,
        *,
        step: int,
        path: str,
        sha256: str,
        size: int,
        clean: bool,
        epoch: int | None = None,
        batch_index: int | None = None,
    ) -> int:
        """Store one snapshot file written by ``run_id``; returns the row id. Not pinned: see :meth:`set_pinned`.

        Args:
            path: the file, relative to the run folder (so that a moved run folder still finds it).
            sha256: the file's digest, checked again before the file is trusted.
            size: the file's size in bytes.
            clean: whether the state passed a scan before the snapshot was taken.
        """
        cursor = self._write(
            "INSERT INTO snapshots (run_id, step, epoch, batch_index, path, sha256, size, clean, wall_time)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (run_id, step, epoch, batch_index, path, sha256, size, int(clean), time.time()),
        )
        return int(cursor.lastrowid or 0)

    def mark_snapshot_deleted(self, snapshot_id: int) -> None:
        """Mark a snapshot row's file as removed (the row stays) and unpin it."""
        self._write("UPDATE snapshots SET deleted = 1, pinned = 0 WHERE id = ?", (snapshot_id,))

    def set_pinned(self, snapshot_id: int) -> None:
        """Pin one snapshot row and unpin every other one of this journal, in one transaction (a crash
        leaves the old pin or the new one, never none).

        Raises:
            JournalError: no live snapshot row has this id.
        """
        def pin() -> None:
            found = self._db.execute(
                "UPDATE snapshots SET pinned = 1 WHERE id = ? AND deleted = 0", (snapshot_id,)
            ).rowcount
            if found != 1:
                raise JournalError(f"{self.path}: no live snapshot with id {snapshot_id!r} to pin")
            self._db.execute("UPDATE snapshots SET pinned = 0 WHERE pinned = 1 AND id != ?", (snapshot_id,))

        self._transaction(pin)

    def snapshots(self) -> list[dict[str, Any]]:
        """Every snapshot row of this journal, oldest first, as :func:`read_snapshots` gives them."""
        try:
            cursor = self._db.execute("SELECT * FROM snapshots ORDER BY id")
            names = [column[0] for column in cursor.description]
            rows = [dict(zip(names, row, strict=True)) for row in cursor.fetchall()]
        except sqlite3.Error as err:
            raise JournalError(f"{self.path}: cannot read snapshots ({err})") from None
        return [snapshot_dict(checked_row(self.path, "snapshots", row)) for row in rows]

    def _transaction(self, body: Callable[[], None]) -> None:
        # BEGIN IMMEDIATE takes the write lock before the first read, so what ``body`` reads stays true
        # until COMMIT; any error rolls the whole body back.
        try:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                body()
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")
        except sqlite3.Error as err:
            raise JournalError(f"{self.path}: cannot write to the journal ({err})") from None

    def _write(self, sql: str, params: tuple[Any, ...]) -> sqlite3.Cursor:
        try:
            return self._db.execute(sql, params)
        except sqlite3.Error as err:
            raise JournalError(f"{self.path}: cannot write to the journal ({err})") from None

    def close(self) -> None:
        self._db.close()
