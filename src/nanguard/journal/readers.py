"""readers.py holds the read-only queries (the CLI's): each opens the journal with ``mode=ro``, reads, closes,
and gives back plain dicts with JSON columns decoded. A journal from an older nanguard reads with the
defaults of what it lacks.

Every row is checked against :data:`COLUMN_KINDS` before anything uses it (:func:`checked_row`): SQLite
stores any value in any column, so a damaged or hostile journal can hold text where a step is, a JSON column
that is not JSON, a time no clock can show, or megabytes where a name is. Such a row is refused here, once
for every reader and command, with a :class:`~nanguard.errors.JournalError` naming the file, the table, the
row and the column, instead of a traceback deep in a renderer."""

from __future__ import annotations

import json
import os
import socket
import sqlite3
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from nanguard.errors import JournalError
from nanguard.journal.base import journal_path

MAX_TEXT_CHARS = 4096
"""Longest plain text column nanguard accepts (kinds, actions, reasons, hosts, paths). What nanguard writes is
far shorter; a path is at most PATH_MAX (4096 bytes on Linux). Anything longer is a damaged or hostile row,
refused rather than printed into a terminal or drawn into a report."""
MAX_JSON_CHARS = 16 << 20
"""Longest JSON column (16 Mi characters): a policy, an action's detail, an incident's tensor names and
sample ids, a checkpoint's findings. The longest nanguard writes are the lists of tensor names of a large
model, well under a megabyte."""
MAX_WALL_TIME = 253402300799.0
"""The last second of the year 9999 (UTC), the latest time ``datetime`` can show; wall times are 0 to this."""
NONFINITE_TEXTS = frozenset({"nan", "inf", "-inf"})
"""What the writer puts in a ``*_text`` column beside a NULL number."""


def _integer(value: object) -> str | None:
    return None if isinstance(value, int) else "is not an integer"


def _real(value: object) -> str | None:
    return None if isinstance(value, int | float) else "is not a number"


def _wall_time(value: object) -> str | None:
    if not isinstance(value, int | float):
        return "is not a time"
    return None if 0 <= value <= MAX_WALL_TIME else "is a time outside years 1970-9999"


def _text(value: object) -> str | None:
    if not isinstance(value, str):
        return "is not text"
    return None if len(value) <= MAX_TEXT_CHARS else f"is longer than {MAX_TEXT_CHARS} characters"


def _relative_path(value: object) -> str | None:
    # The snapshot store deletes run_dir / path on rotation: a path that leaves the run folder would let a
    # journal row delete any file the training process can write.
    problem = _text(value)
    if problem is not None or not isinstance(value, str):
        return problem
    parts = value.split("/")
    if not value or value.startswith("/") or "\\" in value or ".." in parts or "\0" in value:
        return "is not a relative path inside the run folder"
    return None


def _nonfinite_text(value: object) -> str | None:
    return None if value in NONFINITE_TEXTS else "is not one of nan, inf, -inf"


def _json(shape: type, items: type | None = None) -> Callable[[object], str | None]:
    def check(value: object) -> str | None:
        if not isinstance(value, str):
            return "is not JSON text"
        if len(value) > MAX_JSON_CHARS:
            return f"is longer than {MAX_JSON_CHARS} characters"
        try:
            decoded = json.loads(value)
        except (ValueError, RecursionError):  # RecursionError: nesting deeper than the interpreter's stack
            return "is not valid JSON"
        if not isinstance(decoded, shape):
            return f"is not a JSON {'list' if shape is list else 'object'}"
        if items is not None and isinstance(decoded, list) and not all(isinstance(item, items) for item in decoded):
            return f"holds an item that is not a JSON {'string' if items is str else 'object'}"
        return None
    return check


Check = Callable[[object], str | None]
_ID: dict[str, tuple[Check, bool]] = {"id": (_integer, True)}
_STEP: dict[str, tuple[Check, bool]] = {
    "run_id": (_integer, True), "step": (_integer, True), "epoch": (_integer, False),
    "batch_index": (_integer, False), "wall_time": (_wall_time, True),
}
_MEASURES: dict[str, tuple[Check, bool]] = {
    "loss": (_real, False), "loss_text": (_nonfinite_text, False),
    "grad_norm": (_real, False), "grad_norm_text": (_nonfinite_text, False),
}
COLUMN_KINDS: Mapping[str, Mapping[str, tuple[Check, bool]]] = {
    "runs": {**_ID, "started_at": (_wall_time, True), "ended_at": (_wall_time, False), "status": (_text, True),
             "host": (_text, True), "pid": (_integer, True), "rank": (_integer, True),
             "nanguard_version": (_text, True), "torch_version": (_text, False), "policy": (_json(dict), True),
             "attempts": (_integer, False), "process_start": (_real, False)},
    "incidents": {**_ID, **_STEP, **_MEASURES, "kind": (_text, True), "sample_ids": (_json(list), False),
                  "rank": (_integer, True), "value": (_real, False), "threshold": (_real, False),
                  "tensors": (_json(list, str), True), "action": (_text, True), "rolled_back": (_integer, False),
                  "attempt": (_integer, False), "loop_step": (_integer, False), "micro_batch": (_integer, False)},
    "actions": {**_ID, "run_id": (_integer, True), "step": (_integer, True), "action": (_text, True),
                "reason": (_text, True), "detail": (_json(dict), True), "wall_time": (_wall_time, True),
                "attempt": (_integer, False), "loop_step": (_integer, False)},
    "checkpoints": {**_ID, "path": (_text, True), "sha256": (_text, False), "size": (_integer, False),
                    "format": (_text, False), "epoch": (_real, False), "step": (_integer, False),
                    "status": (_text, True), "findings": (_json(list, dict), True), "parent_path": (_text, False),
                    "tainted": (_integer, True), "taint_reason": (_text, False), "mtime": (_real, False),
                    "wall_time": (_wall_time, True)},
    "snapshots": {**_ID, **_STEP, "path": (_relative_path, True), "sha256": (_text, True), "size": (_integer, True),
                  "clean": (_integer, True), "pinned": (_integer, True), "deleted": (_integer, True)},
    "metrics": {**_ID, **_STEP, **_MEASURES, "clip_threshold": (_real, False), "lr": (_real, False),
                "applied": (_integer, True), "attempt": (_integer, False), "loop_step": (_integer, False)},
}
"""Per table, per column: the check its value must pass, and whether it is required (NOT NULL). A real
number may be stored as an integer (SQLite's own choice); a boolean is an integer."""


def checked_row(path: Path, table: str, row: Mapping[str, Any]) -> dict[str, Any]:
    """``row`` as a dict once every known column of ``table`` holds what nanguard writes there.

    Raises:
        JournalError: naming ``path``, the table, the row id and the column, for the first bad value.
    """
    out = dict(row)
    for column, (check, required) in COLUMN_KINDS[table].items():
        if column not in out:
            continue  # an older journal's table lacks a later column; its reader fills the default
        value = out[column]
        problem = ("is missing (NULL)" if required else None) if value is None else check(value)
        if problem is not None:
            row_id = out.get("id")
            where = f"row {row_id}" if isinstance(row_id, int) else "a row"
            raise JournalError(f"{path}: not a readable nanguard journal ({table} {where}: {column} {problem})")
    return out


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


def _rows(run_dir: str | Path, table: str) -> list[dict[str, Any]]:
    """Every row of ``table``, oldest first, each through :func:`checked_row`; ``[]`` when the journal
    predates that table. One place opens the journal read-only and turns SQLite errors and rows of the wrong
    shape into one-line :class:`JournalError` messages."""
    db = _open_read_only(run_dir)
    try:
        exists = db.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?", (table,)).fetchone()
        # table is one of this module's own names, checked against sqlite_master above
        rows = db.execute(f"SELECT * FROM {table} ORDER BY id").fetchall() if exists else []
    except sqlite3.Error as err:
        raise JournalError(f"{journal_path(run_dir)}: cannot read {table} ({err})") from None
    finally:
        db.close()
    return [checked_row(journal_path(run_dir), table, row) for row in rows]


def read_incidents(run_dir: str | Path) -> list[dict[str, Any]]:
    """Every incident of a run folder in the order written, as plain dicts (JSON columns decoded, non-finite
    losses and norms given back as floats). Besides the columns: ``seq`` (the journal-wide order), ``attempt``
    (0, then +1 after each in-process rollback), ``loop_step``, ``micro_batch``, and ``replay``: the step was
    rolled back, so the same step number comes again in a later attempt."""
    return [_incident_dict(row) for row in _rows(run_dir, "incidents")]


def read_actions(run_dir: str | Path) -> list[dict[str, Any]]:
    """Every action of a run folder in the order written (``seq``, ``attempt`` and ``loop_step`` as for
    incidents)."""
    return [_ordered({**row, "detail": json.loads(row["detail"])}) for row in _rows(run_dir, "actions")]


def read_checkpoints(run_dir: str | Path) -> list[dict[str, Any]]:
    """Every stored checkpoint audit of a run folder, oldest first (``findings`` decoded, ``tainted`` a
    bool). A journal written before the ``checkpoints`` table existed gives ``[]``."""
    return [checkpoint_dict(row) for row in _rows(run_dir, "checkpoints")]


def read_snapshots(run_dir: str | Path) -> list[dict[str, Any]]:
    """Every snapshot row of a run folder, oldest first (``clean``, ``pinned``, ``deleted`` as bools;
    ``path`` relative to the run folder). A journal written before the ``snapshots`` table existed gives ``[]``."""
    return [snapshot_dict(row) for row in _rows(run_dir, "snapshots")]


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    """Every per-step metrics row of a run folder in the order written (``applied`` a bool, non-finite
    losses and norms given back as floats). Steps repeat after an in-process rollback: ``replay`` is true for
    a row whose step a later attempt of the same run ran again. A journal written before the ``metrics`` table
    existed gives ``[]``."""
    rows = [_ordered(_with_nonfinite(row)) for row in _rows(run_dir, "metrics")]
    latest: dict[tuple[int, int], int] = {}
    for item in rows:
        key = (item["run_id"], item["step"])
        latest[key] = max(latest.get(key, 0), item["attempt"])
    for item in rows:
        item["applied"] = bool(item["applied"])
        item["replay"] = item["attempt"] < latest[(item["run_id"], item["step"])]
    return rows


def read_runs(run_dir: str | Path) -> list[dict[str, Any]]:
    """Every process that wrote to the journal (``runs`` rows), oldest first, ``policy`` decoded. A run still
    marked ``running`` whose process is gone (same host: no such pid, or a pid reused by a process that started
    later) reads ``crashed``; ``recorded_status`` keeps what the journal says."""
    out = []
    for row in _rows(run_dir, "runs"):
        item = {**row, "policy": json.loads(row["policy"]), "recorded_status": row["status"]}
        item.setdefault("attempts", 0)
        if item["status"] == "running" and run_alive(item) is False:
            item["status"] = "crashed"
        out.append(item)
    return out


def process_start_time(pid: int) -> float | None:
    """When process ``pid`` started, in seconds since the epoch (Linux: ``/proc/<pid>/stat`` field 22 in clock
    ticks after boot, plus ``btime`` of ``/proc/stat``); ``None`` where that cannot be read."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        fields = stat[stat.rindex(")") + 2:].split()  # the command name may hold spaces and parentheses
        ticks = int(fields[19])  # field 22 of the whole line; fields[0] is field 3
        boot = next(int(line.split()[1]) for line in Path("/proc/stat").read_text().splitlines()
                    if line.startswith("btime "))
        return boot + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, StopIteration):
        return None


def run_alive(run: Mapping[str, Any]) -> bool | None:
    """Whether the process of a ``runs`` row still lives: ``None`` when this machine cannot tell (another host,
    no /proc)."""
    if run.get("host") != socket.gethostname() or not isinstance(run.get("pid"), int):
        return None
    started = process_start_time(int(run["pid"]))
    if started is None:
        return False if Path("/proc/self/stat").exists() else None
    recorded = run.get("process_start")
    # A start time other than the recorded one: the pid now belongs to another process.
    return not (isinstance(recorded, int | float) and abs(started - recorded) > 2.0)


def _ordered(out: dict[str, Any]) -> dict[str, Any]:
    out["seq"] = out["id"]
    out.setdefault("attempt", 0)
    out.setdefault("loop_step", None)
    return out


def _with_nonfinite(out: dict[str, Any]) -> dict[str, Any]:
    # SQLite stores NaN as NULL, so the writer keeps non-finite values as text beside a NULL number.
    for key in ("loss", "grad_norm"):
        text = out.pop(f"{key}_text")
        if text is not None:
            out[key] = float(text)
    return out


def snapshot_dict(out: dict[str, Any]) -> dict[str, Any]:
    for key in ("clean", "pinned", "deleted"):
        out[key] = bool(out[key])
    return out


def checkpoint_dict(out: dict[str, Any]) -> dict[str, Any]:
    out["findings"] = json.loads(out["findings"])
    out["tainted"] = bool(out["tainted"])
    if isinstance(out["epoch"], float) and out["epoch"].is_integer():
        out["epoch"] = int(out["epoch"])
    return out


def _incident_dict(row: dict[str, Any]) -> dict[str, Any]:
    out = _with_nonfinite(row)
    out["sample_ids"] = None if out["sample_ids"] is None else json.loads(out["sample_ids"])
    out["tensors"] = json.loads(out["tensors"])
    # A journal opened only read-only since before the column existed has no such column: not rolled back.
    out["rolled_back"] = bool(out.get("rolled_back", 0))
    out["replay"] = out["rolled_back"]
    out.setdefault("micro_batch", None)
    return _ordered(out)
