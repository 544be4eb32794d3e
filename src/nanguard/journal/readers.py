"""readers.py holds the read-only queries (the CLI's): each opens the journal with ``mode=ro``, reads, closes,
and gives back plain dicts with JSON columns decoded. A journal from an older nanguard reads with the
defaults of what it lacks."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path
from typing import Any

from nanguard.errors import JournalError
from nanguard.journal.base import journal_path


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


def _rows(run_dir: str | Path, table: str) -> list[sqlite3.Row]:
    """Every row of ``table``, oldest first; ``[]`` when the journal predates that table. One place opens
    the journal read-only and turns SQLite errors into one-line :class:`JournalError` messages."""
    db = _open_read_only(run_dir)
    try:
        exists = db.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?", (table,)).fetchone()
        # table is one of this module's own names, checked against sqlite_master above
        return db.execute(f"SELECT * FROM {table} ORDER BY id").fetchall() if exists else []
    except sqlite3.Error as err:
        raise JournalError(f"{journal_path(run_dir)}: cannot read {table} ({err})") from None
    finally:
        db.close()


def read_incidents(run_dir: str | Path) -> list[dict[str, Any]]:
    """Every incident of a run folder, oldest first, as plain dicts (JSON columns decoded, non-finite
    losses and norms given back as floats)."""
    return [_incident_dict(row) for row in _rows(run_dir, "incidents")]


def read_actions(run_dir: str | Path) -> list[dict[str, Any]]:
    """Every action of a run folder, oldest first."""
    return [{**dict(row), "detail": json.loads(row["detail"])} for row in _rows(run_dir, "actions")]


def read_checkpoints(run_dir: str | Path) -> list[dict[str, Any]]:
    """Every stored checkpoint audit of a run folder, oldest first (``findings`` decoded, ``tainted`` a
    bool). A journal written before the ``checkpoints`` table existed gives ``[]``."""
    return [_checkpoint_dict(dict(row)) for row in _rows(run_dir, "checkpoints")]


def read_snapshots(run_dir: str | Path) -> list[dict[str, Any]]:
    """Every snapshot row of a run folder, oldest first (``clean``, ``pinned``, ``deleted`` as bools;
    ``path`` relative to the run folder). A journal written before the ``snapshots`` table existed gives ``[]``."""
    return [_snapshot_dict(dict(row)) for row in _rows(run_dir, "snapshots")]


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    """Every per-step metrics row of a run folder in the order written (``applied`` a bool, non-finite
    losses and norms given back as floats). Steps repeat after an in-process rollback; a journal written
    before the ``metrics`` table existed gives ``[]``."""
    out = []
    for row in _rows(run_dir, "metrics"):
        item = _with_nonfinite(dict(row))
        item["applied"] = bool(item["applied"])
        out.append(item)
    return out


def read_runs(run_dir: str | Path) -> list[dict[str, Any]]:
    """Every process that wrote to the journal (``runs`` rows), oldest first, ``policy`` decoded."""
    return [{**dict(row), "policy": json.loads(row["policy"])} for row in _rows(run_dir, "runs")]


def _with_nonfinite(out: dict[str, Any]) -> dict[str, Any]:
    # SQLite stores NaN as NULL, so the writer keeps non-finite values as text beside a NULL number.
    for key in ("loss", "grad_norm"):
        text = out.pop(f"{key}_text")
        if text is not None:
            out[key] = float(text)
    return out


def _snapshot_dict(out: dict[str, Any]) -> dict[str, Any]:
    for key in ("clean", "pinned", "deleted"):
        out[key] = bool(out[key])
    return out


def _checkpoint_dict(out: dict[str, Any]) -> dict[str, Any]:
    out["findings"] = json.loads(out["findings"])
    out["tainted"] = bool(out["tainted"])
    if isinstance(out["epoch"], float) and out["epoch"].is_integer():
        out["epoch"] = int(out["epoch"])
    return out


def _incident_dict(row: sqlite3.Row) -> dict[str, Any]:
    out = _with_nonfinite(dict(row))
    out["sample_ids"] = None if out["sample_ids"] is None else json.loads(out["sample_ids"])
    out["tensors"] = json.loads(out["tensors"])
    # A journal opened only read-only since before the column existed has no such column: not rolled back.
    out["rolled_back"] = bool(out.get("rolled_back", 0))
    return out
