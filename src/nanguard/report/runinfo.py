"""runinfo.py owns reading everything about one run folder into a :class:`RunInfo`: the one reader that
``nanguard status``, ``nanguard report`` and ``nanguard plan`` share.

:func:`gather_run` reads the journal (read-only, through :mod:`nanguard.journal`'s readers), results.csv,
``args.yaml`` (the run's epoch count) and the supervisor's state file, probes the processes with psutil, and
derives progress, measured epoch times, the ETA, incidents per epoch, the last clean checkpoint, rollbacks,
the LR and the probation state. It changes nothing and imports neither torch nor a plotting library.

It does not place rows on the run's axis or measure times (:mod:`~nanguard.report.timing`), nor read the
supervisor's file or processes (:mod:`~nanguard.report.processes`); it renders nothing.
"""

from __future__ import annotations

import math
import re
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nanguard.journal import read_actions, read_checkpoints, read_incidents, read_metrics, read_runs
from nanguard.report.processes import ProcessState, SupervisorState, probe, read_supervisor, timestamp
from nanguard.report.timing import (
    DISK_ROLLBACK,
    ROLLBACK,
    Axis,
    EpochTime,
    build_axis,
    epoch_times,
    median_epoch_seconds,
)
from nanguard.runs.base import MAX_EPOCHS, RESULTS_CSV
from nanguard.runs.results_csv import read_results

ARGS_YAML = "args.yaml"
ARGS_YAML_BYTES = 1 << 20
"""How much of ``args.yaml`` is read for its ``epochs:`` line (1 MiB; Ultralytics writes about 2 KB)."""
PROBATION_EVENTS = ("probation_passed", "probation_failed")
_EPOCHS_LINE = re.compile(r"^epochs:\s*(\d{1,12})\s*$", re.MULTILINE)


@dataclass(frozen=True)
class Progress:
    """Where training is.

    Attributes:
        epoch: the 0-based epoch in progress (or the last one, when finished).
        batch: batches of it done, when known.
        batches: batches per epoch, when known.
        epochs_done: complete epochs.
        position: the same as a point on the run's axis (epochs with a fraction).
        wall_time: when that progress was recorded.
        source: ``journal``, ``results.csv`` or ``supervisor``.
    """

    epoch: int | None
    batch: int | None
    batches: int | None
    epochs_done: int
    position: float
    wall_time: float | None
    source: str


@dataclass(frozen=True)
class LRState:
    """The learning rate and the guard's back-off and probation, as the journal shows them now.

    Attributes:
        lr: the LR the last step applied (the first param group, after back-off), else results.csv's ``lr/pg0``.
        source: where ``lr`` came from.
        backoff: the latest back-off (``factor``, ``start_step``, ``probation_steps``, ``recovery_steps``,
            ``phase``: backed_off, ramping or over), or None when there was none.
        probation: the latest rollback's probation (``until_step``, ``level``, ``state``: on, passed, failed,
            or over), or None when no rollback happened.
    """

    lr: float | None
    source: str | None
    backoff: dict[str, Any] | None
    probation: dict[str, Any] | None


@dataclass
class RunInfo:
    """Everything nanguard knows about a run folder; built by :func:`gather_run`.

    The lists hold journal rows as the journal's readers give them, oldest first. Times are seconds
    (wall times: since the epoch).
    """

    run_dir: Path
    gathered_at: float
    runs: list[dict[str, Any]]
    incidents: list[dict[str, Any]]
    actions: list[dict[str, Any]]
    checkpoints: list[dict[str, Any]]
    metrics: list[dict[str, Any]]
    results: list[dict[str, float | None]]
    axis: Axis
    ultralytics: bool
    epochs_total: int | None
    epochs_source: str | None
    progress: Progress
    epoch_times: list[EpochTime]
    epoch_seconds: float | None
    epoch_seconds_basis: str
    remaining_s: float | None
    eta: float | None
    state: str
    lr: LRState
    last_clean_checkpoint: dict[str, Any] | None
    supervisor: SupervisorState
    processes: list[ProcessState] = field(default_factory=list)
    policy: dict[str, Any] = field(default_factory=dict)

    @property
    def incidents_per_epoch(self) -> dict[int | None, int]:
        """Incident count per 0-based epoch (None: the incident recorded no epoch), in epoch order."""
        counts = Counter(row.get("epoch") for row in self.incidents)
        return dict(sorted(counts.items(), key=lambda item: (item[0] is None, item[0] or 0)))

    @property
    def rollbacks(self) -> list[dict[str, Any]]:
        """The in-process ``rollback`` and on-disk ``disk_rollback`` actions, oldest first."""
        return [a for a in self.actions if a["action"] in (ROLLBACK, DISK_ROLLBACK)]

    @property
    def guard_runs(self) -> list[dict[str, Any]]:
        """The journal's ``runs`` rows written by a guard (the CLI's own rows record a ``command``)."""
        return [run for run in self.runs if "command" not in run["policy"]]


def gather_run(
    run_dir: str | Path, *, epochs: int | None = None, probe_processes: bool = True, now: float | None = None
) -> RunInfo:
    """Read a run folder (its ``.nanguard/journal.db`` must exist) into a :class:`RunInfo`.

    Args:
        run_dir: the training run's folder.
        epochs: the run's total epochs, overriding ``args.yaml`` and the supervisor's progress.
        probe_processes: ask psutil about the guard's and the supervisor's processes (slower by ~0.1 s each).
        now: the time to report as "now" (tests); ``time.time()`` by default.

    Raises:
        JournalError: no such folder, no journal, or an unreadable one; results.csv unreadable.
    """
    run = Path(run_dir)
    incidents = read_incidents(run)  # raises the one-line JournalError for a bad folder or journal
    runs, actions, checkpoints, metrics = read_runs(run), read_actions(run), read_checkpoints(run), read_metrics(run)
    results = read_results(run / RESULTS_CSV)
    axis = build_axis(metrics, actions, runs, results)
    guard_runs = [r for r in runs if "command" not in r["policy"]]
    latest = guard_runs[-1] if guard_runs else None
    supervisor = read_supervisor(run, probe_processes=probe_processes)
    processes = list(supervisor.processes)
    if latest is not None and latest["status"] == "running" and probe_processes:
        processes.append(probe("guard", int(latest["pid"]), host=latest["host"], started_before=latest["started_at"]))
    state = _state(latest, processes, supervisor)
    finished = state == "finished"
    total, total_source = _epochs_total(run, epochs, supervisor)
    progress = _progress(axis, metrics, results, supervisor, finished=finished, total=total)
    times = epoch_times(axis, results, incidents, finished=finished)
    epoch_s, basis = median_epoch_seconds(times)
    remaining = eta = None
    if total is not None and epoch_s is not None:
        remaining = 0.0 if finished else max(total - progress.position, 0.0) * epoch_s
        eta = (progress.wall_time or (now or time.time())) + remaining
    return RunInfo(
        run_dir=run, gathered_at=now if now is not None else time.time(), runs=runs, incidents=incidents,
        actions=actions, checkpoints=checkpoints, metrics=metrics, results=results, axis=axis,
        ultralytics=(run / ARGS_YAML).is_file() or (run / "weights").is_dir(), epochs_total=total,
        epochs_source=total_source, progress=progress, epoch_times=times, epoch_seconds=epoch_s,
        epoch_seconds_basis=basis, remaining_s=remaining, eta=eta, state=state,
        lr=_lr_state(metrics, results, actions, latest), last_clean_checkpoint=last_clean_checkpoint(checkpoints),
        supervisor=supervisor, processes=processes, policy=latest["policy"] if latest else {},
    )


def last_clean_checkpoint(checkpoints: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The newest checkpoint whose latest audit is clean and untainted and whose file is still the audited one
    (same size and mtime): resumable ones (epoch ≥ 0) first, then the newest epoch, an ``epochN`` file at a tie."""
    latest: dict[str, dict[str, Any]] = {}
    for row in checkpoints:
        latest[row["path"]] = row
    usable = []
    for row in latest.values():
        if row["status"] != "clean" or row["tainted"]:
            continue
        path = Path(row["path"])
        try:
            stat = path.stat()
        except OSError:
            continue  # moved (quarantined), deleted or rotated since the audit
        if row.get("size") is not None and stat.st_size != row["size"] and not path.is_dir():
            continue
        if row.get("mtime") is not None and abs(stat.st_mtime - row["mtime"]) > 1e-3 and not path.is_dir():
            continue  # rewritten since its audit: the verdict no longer describes it
        usable.append(row)
    if not usable:
        return None

    def rank(row: dict[str, Any]) -> tuple[bool, float, bool, float]:
        epoch = row.get("epoch")
        number = float(epoch) if isinstance(epoch, int | float) else -1.0
        resumable = number >= 0
        return (resumable, number, Path(row["path"]).name.startswith("epoch"),
                row["wall_time"])

    best = max(usable, key=rank)
    return {"path": best["path"], "epoch": best.get("epoch"), "sha256": best.get("sha256"),
            "audited_at": best["wall_time"], "resumable": rank(best)[0]}


def _state(latest: dict[str, Any] | None, processes: list[ProcessState], supervisor: SupervisorState) -> str:
    """finished, stopped, running, crashed (the journal says running, the process is gone), or unknown."""
    sup = supervisor.state if supervisor.present and supervisor.error is None else None
    if sup in ("running", "starting", "stopping", "rolling_back", "waiting"):
        return "running"
    if latest is None:
        return sup or "unknown"
    status = str(latest["status"])
    if status == "running":
        guard = next((p for p in processes if p.role == "guard"), None)
        if guard is not None and guard.alive is False:
            return "crashed"
    return status


def _epochs_total(run: Path, epochs: int | None, supervisor: SupervisorState) -> tuple[int | None, str | None]:
    if epochs is not None:
        return epochs, "--epochs"
    args = run / ARGS_YAML
    if args.is_file():
        try:
            with args.open("rb") as handle:  # Ultralytics writes ~2 KB; the first MiB holds `epochs:` or nothing
                match = _EPOCHS_LINE.search(handle.read(ARGS_YAML_BYTES).decode("utf-8", "replace"))
        except OSError:
            match = None
        if match and 1 <= int(match.group(1)) <= MAX_EPOCHS:  # a larger count is damage: unknown, not trusted
            return int(match.group(1)), ARGS_YAML
    progress = supervisor.data.get("last_progress") if supervisor.error is None else None
    if isinstance(progress, dict) and isinstance(progress.get("epochs"), int) and 1 <= progress["epochs"] <= MAX_EPOCHS:
        return int(progress["epochs"]), "supervisor.json"
    return None, None


def _progress(axis: Axis, metrics: list[dict[str, Any]], results: list[dict[str, float | None]],
              supervisor: SupervisorState, *, finished: bool, total: int | None) -> Progress:
    numbers = [r.get("epoch") for r in results]
    done_results = max((int(n) for n in numbers if n is not None and math.isfinite(n)), default=0)
    best = Progress(None, None, axis.batches, done_results, float(done_results), None, "results.csv")
    if metrics and axis.kind == "epoch":
        last = axis.points[-1]
        epoch, batch = last.row["epoch"], last.row.get("batch_index")
        position = last.x1
        done = max(int(position) if position.is_integer() else epoch, done_results)
        best = Progress(epoch, None if batch is None else batch + 1, axis.batches, done, max(position, float(done)),
                        last.row["wall_time"], "journal")
    progress = supervisor.data.get("last_progress") if supervisor.error is None else None
    updated = timestamp(supervisor.data.get("updated_at"))
    if isinstance(progress, dict) and isinstance(progress.get("epoch"), int) and updated is not None \
            and (best.wall_time is None or updated > best.wall_time):
        # The supervisor's log scanner gives 0-based indices (the epoch, and the batch last shown in the epoch).
        epoch = int(progress["epoch"])
        index, batches = progress.get("batch"), progress.get("batches")
        batch = index + 1 if isinstance(index, int) else None  # batches done
        fraction = batch / batches if batch is not None and isinstance(batches, int) and batches > 0 else 0.0
        best = Progress(epoch, batch,
                        batches if isinstance(batches, int) else axis.batches, max(epoch, best.epochs_done),
                        epoch + min(fraction, 1.0), updated, "supervisor")
    if finished and total is not None:
        best = Progress(best.epoch, best.batch, best.batches, max(best.epochs_done, total), float(total),
                        best.wall_time, best.source)
    return best


def _lr_state(metrics: list[dict[str, Any]], results: list[dict[str, float | None]], actions: list[dict[str, Any]],
              latest: dict[str, Any] | None) -> LRState:
    lr = source = None
    applied = [row for row in metrics if row.get("lr") is not None]
    if applied:
        lr, source = float(applied[-1]["lr"]), "journal: the last step, as applied"
    elif results and results[-1].get("lr/pg0") is not None:
        lr, source = results[-1]["lr/pg0"], "results.csv: lr/pg0 of the last epoch"
    if latest is None:
        return LRState(lr, source, None, None)
    run_id, policy = latest["id"], latest["policy"]
    mine = [a for a in actions if a["run_id"] == run_id]
    steps = [row["step"] for row in metrics if row["run_id"] == run_id]
    step = steps[-1] + 1 if steps else None  # the next step to run
    backoff: dict[str, Any] | None = None
    probation: dict[str, Any] | None = None
    for action in mine:
        detail = action.get("detail") or {}
        if action["action"] == "lr_backoff":
            backoff = {"factor": detail.get("factor"), "start_step": action["step"] + 1,
                       "probation_steps": detail.get("probation_steps"), "recovery_steps": detail.get("recovery_steps")}
        elif action["action"] == ROLLBACK:
            if detail.get("lr_factor", 1.0) != 1.0:
                backoff = {"factor": detail.get("lr_factor"), "start_step": detail.get("to_step"),
                           "probation_steps": policy.get("lr_probation_steps"),
                           "recovery_steps": policy.get("lr_recovery_steps")}
            probation = {"until_step": detail.get("probation_until"), "level": detail.get("level"), "state": "on",
                         "since_step": detail.get("to_step")}
        elif action["action"] in PROBATION_EVENTS and probation is not None:
            probation = {**probation, "state": action["action"].removeprefix("probation_"),
                         "ended_step": action["step"]}
    if backoff is not None:
        backoff["phase"] = _backoff_phase(backoff, step)
    if probation is not None and probation["state"] == "on" and step is not None \
            and isinstance(probation.get("until_step"), int):
        probation["steps_left"] = max(probation["until_step"] - step, 0)
        if probation["steps_left"] == 0:
            probation["state"] = "over"
    return LRState(lr, source, backoff, probation)


def _backoff_phase(backoff: dict[str, Any], step: int | None) -> str:
    start, hold, ramp = backoff.get("start_step"), backoff.get("probation_steps"), backoff.get("recovery_steps")
    if step is None or not isinstance(start, int) or not isinstance(hold, int) or not isinstance(ramp, int):
        return "unknown"
    since = step - start
    if since < hold:
        return "backed_off"
    return "ramping" if since - hold < ramp else "over"
