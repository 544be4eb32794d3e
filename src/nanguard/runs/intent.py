"""intent.py owns what makes a rollback or an undo all-or-nothing: the intent record
``<run_dir>/.nanguard/intent.json``, and finishing one that a killed command left behind.

A command that changes the run folder (:func:`~nanguard.runs.ultralytics_disk.apply_rollback`,
:func:`~nanguard.runs.backups.undo_last`) writes its intent durably (atomic write, folder fsynced) before its
first change: the action, an id, the backup it works from. Its journal row (whose ``detail.intent`` is that
id) is the commit point; the intent is removed right after. The next rollback, undo or ``nanguard run`` on
the folder calls :func:`nanguard.runs.backups.recover_pending` under the run lock before anything else, and
says in one line what it did:

- the journal row exists: the command had committed; only the intent is removed.
- a rollback without its row: it is *reverted* from its backup (complete, since the backup's manifest is
  written before any file changes; without a manifest nothing was changed yet), the backup is marked
  ``reverted_at``/``undone_at`` so ``undo`` never restores it, and a ``disk_rollback_reverted`` row is written.
- an undo without its row: it is *completed* (restoring a backup is idempotent), with its ``disk_undo`` row.

Temp files a killed atomic write left next to the backed-up files are removed. This module reads, writes
and clears the record and tells whether it was committed; it changes no run file itself:
:mod:`~nanguard.runs.ultralytics_disk` and :mod:`~nanguard.runs.backups` do.
"""

from __future__ import annotations

import json
import os
import secrets
from pathlib import Path
from typing import Any

from nanguard.atomic import atomic_write_bytes, remove_durably
from nanguard.errors import JournalError
from nanguard.journal import JOURNAL_DIR, journal_path, read_actions
from nanguard.paths import BadPath, read_json_file
from nanguard.runs.base import RollbackRefused
from nanguard.runs.lock import utc_now

INTENT_FILE = "intent.json"
_INTENT_BYTES = 1 << 20
"""An intent record is a few hundred bytes; a bigger file is not one nanguard wrote and is refused unread."""


def intent_path(run: Path) -> Path:
    return run / JOURNAL_DIR / INTENT_FILE


def new_intent_id() -> str:
    """A fresh id for an intent (random: the journal row that commits it must name this one alone)."""
    return secrets.token_hex(8)


def write_intent(run: Path, record: dict[str, Any]) -> None:
    """Write the intent durably (temp file, fsync, rename, fsync the folder) before the first change."""
    atomic_write_bytes(intent_path(run), json.dumps({**record, "written": utc_now()}, indent=2).encode("utf-8"))


def clear_intent(run: Path) -> None:
    """Remove the intent durably: after the journal row, this ends the command."""
    remove_durably(intent_path(run))


def read_intent(run: Path) -> dict[str, Any] | None:
    """The pending intent of ``run``, or None.

    Raises:
        RollbackRefused: the file is not an intent nanguard wrote (too big, not a JSON object with an action
            and an id).
    """
    path = intent_path(run)
    if not os.path.lexists(path):
        return None
    try:
        data = read_json_file(path, _INTENT_BYTES, "intent record")  # a FIFO or folder: refused, never opened
    except BadPath as err:
        raise RollbackRefused(f"{err}; inspect the run folder, then remove it") from None
    except ValueError as err:
        raise RollbackRefused(f"{path}: unreadable intent record ({err}); inspect the run folder, then remove "
                              "it") from None
    if (not isinstance(data, dict) or data.get("action") not in ("disk_rollback", "disk_undo")
            or not isinstance(data.get("id"), str) or not isinstance(data.get("backup"), str)
            or Path(data["backup"]).name != data["backup"]):
        raise RollbackRefused(f"{path}: not a nanguard intent record; inspect the run folder, then remove it")
    return data


def committed(run: Path, action: str, intent_id: str) -> bool:
    """Whether the journal holds the ``action`` row of intent ``intent_id`` (the command's commit point)."""
    if not journal_path(run).is_file():
        return False
    try:
        rows = read_actions(run)
    except JournalError:  # a journal a kill left half-created holds no row at all
        return False
    return any(row["action"] == action and isinstance(row["detail"], dict) and row["detail"].get("intent") == intent_id
               for row in rows)


