"""timing.py owns where a run's work lies on its axis and how long it took: pure functions over journal rows.

It places each per-step metrics row on the run's x axis (epochs with fractions for batches, or optimizer steps
when the loop records no epochs), marks rows whose update was undone (an in-process ``rollback`` or an on-disk
``disk_rollback``) and rows superseded by a later attempt at the same position, and measures epoch times, step
times and the resume overhead from wall times. It reads nothing itself: :mod:`~nanguard.report.runinfo`
hands it the rows of the journal and of results.csv. It draws and prints nothing.

Timing rules (docs/report.md repeats them):

- A step's duration is its wall time minus the previous step's of the same process (the first step of a
  process: minus the process's start in the ``runs`` table). The pause for validation after epoch ``e`` lands
  in the first step of epoch ``e + 1``, so an epoch's time is one full cycle of training and validation.
- An epoch's time from the journal is the sum of its kept steps' durations. A step superseded by a later step
  at the same position (the epoch replayed after a rollback, in process or on disk) is not counted: an epoch
  redone after a rollback counts once, with the redone attempt's time.
- results.csv's ``time`` is seconds since the writing process started training, so an epoch's time is the
  difference to the row before it, or the value itself when a new process wrote the row (``time`` went down,
  or the journal shows another process trained that epoch).
"""

from __future__ import annotations

import itertools
import math
import statistics
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

ROLLBACK = "rollback"
DISK_ROLLBACK = "disk_rollback"


@dataclass(frozen=True)
class StepPoint:
    """One metrics row placed on the run's axis.

    Attributes:
        row: the row as :func:`nanguard.journal.read_metrics` gives it.
        x0, x1: where the step starts and ends on the axis (epochs with fractions, or steps).
        duration_s: seconds since the previous step of the same process (None when unknown).
        superseded: a later step sits at the same position (its time is not counted).
        undone: a rollback discarded its update.
    """

    row: dict[str, Any]
    x0: float
    x1: float
    duration_s: float | None
    superseded: bool = False
    undone: bool = False


@dataclass(frozen=True)
class Span:
    """A stretch of work a rollback discarded, for shading.

    Attributes:
        kind: ``in_process`` (the guard's ``rollback``) or ``disk`` (``disk_rollback``).
        x0, x1: the stretch on the run's axis.
        wall_time: when the rollback happened.
        label: a short description.
    """

    kind: str
    x0: float
    x1: float
    wall_time: float
    label: str


@dataclass(frozen=True)
class EpochTime:
    """How long one epoch took, measured.

    Attributes:
        epoch: the 0-based epoch index.
        seconds: its duration.
        source: ``journal`` (per-step wall times) or ``results.csv`` (its ``time`` column).
        clean: no incident was recorded in it.
    """

    epoch: int
    seconds: float
    source: str
    clean: bool


@dataclass
class Axis:
    """The run's x axis: ``epoch`` (an epoch index plus the fraction of its batches) or ``step``.

    Attributes:
        kind: ``epoch`` or ``step``.
        batches: batch positions per epoch (max batch index + 1 seen), when the axis is epochs.
        steps_per_epoch: optimizer steps recorded per complete epoch (median), when known.
    """

    kind: str
    batches: int | None = None
    steps_per_epoch: float | None = None
    points: list[StepPoint] = field(default_factory=list)
    spans: list[Span] = field(default_factory=list)

    def place(self, epoch: int | None, batch_index: int | None, step: int | None) -> float | None:
        """Where the end of a step at (epoch, batch_index) or ``step`` lies on this axis."""
        if self.kind == "step":
            return None if step is None else float(step + 1)
        if epoch is None:
            return None
        if batch_index is None or not self.batches:
            return epoch + 0.5
        return epoch + min(batch_index + 1, self.batches) / self.batches


def build_axis(
    metrics: Sequence[dict[str, Any]], actions: Sequence[dict[str, Any]], runs: Sequence[dict[str, Any]],
    results: Sequence[dict[str, float | None]],
) -> Axis:
    """Place every metrics row, mark undone and superseded rows, and collect the rolled-back spans."""
    epoch_mode = not metrics or all(row.get("epoch") is not None for row in metrics)
    batch_indices = [row["batch_index"] for row in metrics if row.get("batch_index") is not None]
    axis = Axis("epoch" if epoch_mode else "step", batches=(max(batch_indices) + 1) if batch_indices else None)
    starts = {run["id"]: run["started_at"] for run in runs}
    previous: dict[int, float] = {}
    points = []
    for row in metrics:
        end = axis.place(row.get("epoch"), row.get("batch_index"), row["step"])
        assert end is not None  # epoch mode needs epochs, step mode always has steps
        width = 1.0 if axis.kind == "step" or not axis.batches else 1.0 / axis.batches
        before = previous.get(row["run_id"], starts.get(row["run_id"]))
        duration = row["wall_time"] - before if before is not None else None
        previous[row["run_id"]] = row["wall_time"]
        points.append(StepPoint(row, end - width, end, duration))
    later_keys: set[tuple[Any, ...]] = set()
    marked: list[StepPoint] = []
    for point in reversed(points):  # the last attempt at a position wins
        key = _position_key(axis, point.row)
        marked.append(StepPoint(point.row, point.x0, point.x1, point.duration_s, superseded=key in later_keys))
        later_keys.add(key)
    axis.points = list(reversed(marked))
    axis.spans = _rollback_spans(axis, actions, results)
    axis.steps_per_epoch = _steps_per_epoch(axis)
    return axis


def _position_key(axis: Axis, row: dict[str, Any]) -> tuple[Any, ...]:
    if axis.kind == "step":
        return (row["step"],)
    return (row["epoch"], row.get("batch_index"), row["step"] if row.get("batch_index") is None else None)


def _rollback_spans(axis: Axis, actions: Sequence[dict[str, Any]], results: Sequence[dict[str, float | None]]
                    ) -> list[Span]:
    """Mark the rows each rollback undid (``axis.points`` in place) and return the spans, oldest first."""
    spans = []
    undone = [False] * len(axis.points)
    for action in sorted(actions, key=lambda a: a["wall_time"]):
        name, detail, when = action["action"], action.get("detail") or {}, action["wall_time"]
        if name == ROLLBACK and isinstance(detail.get("to_step"), int) and isinstance(detail.get("from_step"), int):
            lo, hi = detail["to_step"], detail["from_step"]
            latest: dict[int, int] = {}
            for i, point in enumerate(axis.points):
                row = point.row
                if row["run_id"] == action["run_id"] and row["wall_time"] <= when and lo <= row["step"] <= hi \
                        and not undone[i]:
                    latest[row["step"]] = i
            if not latest:
                continue
            for i in latest.values():
                undone[i] = True
            x0 = min(axis.points[i].x0 for i in latest.values())
            x1 = max(axis.points[i].x1 for i in latest.values())
            spans.append(Span("in_process", x0, x1, when, f"rollback: step {hi} → {lo}"))
        elif name == DISK_ROLLBACK and axis.kind == "epoch" and isinstance(detail.get("resume_epoch"), int):
            resume = detail["resume_epoch"]
            hit = [i for i, p in enumerate(axis.points)
                   if p.row["wall_time"] < when and (p.row.get("epoch") or 0) >= resume]
            for i in hit:
                undone[i] = True
            dropped = detail.get("results_rows_dropped")
            end = max((axis.points[i].x1 for i in hit), default=None)
            if end is None and isinstance(dropped, int) and dropped > 0:
                end = float(resume + dropped)
            if end is None and results:
                end = max((r["epoch"] or 0.0) for r in results)
            if end is not None and end > resume:
                spans.append(Span("disk", float(resume), end, when, f"disk rollback to epoch {resume - 1}"))
    axis.points = [StepPoint(p.row, p.x0, p.x1, p.duration_s, p.superseded, undone[i] or p.undone)
                   for i, p in enumerate(axis.points)]
    return spans


def _steps_per_epoch(axis: Axis) -> float | None:
    if axis.kind != "epoch":
        return None
    per_epoch: dict[int, int] = defaultdict(int)
    for point in axis.points:
        if not point.superseded:
            per_epoch[point.row["epoch"]] += 1
    complete = [count for epoch, count in per_epoch.items() if epoch + 1 in per_epoch]
    counts = complete or list(per_epoch.values())
    return float(statistics.median(counts)) if counts else None


def epoch_times(
    axis: Axis, results: Sequence[dict[str, float | None]], incidents: Sequence[dict[str, Any]],
    *, finished: bool,
) -> list[EpochTime]:
    """Measured duration of each complete epoch, oldest first (see the module docstring for the rules).

    results.csv is preferred where it has the epoch (its ``time`` includes validation); the journal's step
    times fill in the rest. ``finished``: the last recorded epoch is complete (the run ended normally).
    """
    bad_epochs = {row["epoch"] for row in incidents if row.get("epoch") is not None}
    from_journal = _journal_epoch_times(axis, finished=finished)
    from_results = _results_epoch_times(axis, results)
    out = []
    for epoch in sorted(set(from_journal) | set(from_results)):
        seconds, source = (from_results[epoch], "results.csv") if epoch in from_results else \
            (from_journal[epoch], "journal")
        out.append(EpochTime(epoch, seconds, source, clean=epoch not in bad_epochs))
    return out


def _journal_epoch_times(axis: Axis, *, finished: bool) -> dict[int, float]:
    if axis.kind != "epoch" or not axis.points:
        return {}
    totals: dict[int, float] = defaultdict(float)
    unknown: set[int] = set()
    for point in axis.points:
        if point.superseded:
            continue
        epoch = point.row["epoch"]
        if point.duration_s is None:
            unknown.add(epoch)
        else:
            totals[epoch] += point.duration_s
    last = max(point.row["epoch"] for point in axis.points)
    return {epoch: seconds for epoch, seconds in totals.items()
            if epoch not in unknown and (epoch < last or finished)}


def _results_epoch_times(axis: Axis, results: Sequence[dict[str, float | None]]) -> dict[int, float]:
    """Epoch index → seconds from results.csv's ``time`` column (rows numbered from 1; last row wins)."""
    trainer_of: dict[int, int] = {}  # epoch → the process whose kept steps trained it (from the journal)
    for point in axis.points:
        if not point.superseded and axis.kind == "epoch":
            trainer_of[point.row["epoch"]] = point.row["run_id"]
    out: dict[int, float] = {}
    prev_time: float | None = None
    prev_epoch: int | None = None
    for row in results:
        time_s, number = row.get("time"), row.get("epoch")
        if time_s is None or number is None or not math.isfinite(time_s):
            prev_time, prev_epoch = None, None
            continue
        epoch = int(number) - 1
        same_process = prev_time is not None and time_s > prev_time
        if same_process and prev_epoch in trainer_of and epoch in trainer_of:
            same_process = trainer_of[prev_epoch] == trainer_of[epoch]
        out[epoch] = time_s - prev_time if same_process and prev_time is not None else time_s
        prev_time, prev_epoch = time_s, epoch
    return out


def median_epoch_seconds(times: Sequence[EpochTime]) -> tuple[float | None, str]:
    """The median of the clean epochs' times (of all measured epochs when none is clean), and how it was got."""
    clean = [t.seconds for t in times if t.clean]
    if clean:
        return float(statistics.median(clean)), f"median of {len(clean)} clean measured epoch(s)"
    if times:
        return float(statistics.median(t.seconds for t in times)), \
            f"median of {len(times)} measured epoch(s); none was free of incidents"
    return None, "no complete epoch measured yet"


def resume_overheads(
    runs: Sequence[dict[str, Any]], metrics: Sequence[dict[str, Any]], actions: Sequence[dict[str, Any]]
) -> list[float]:
    """Seconds from the end of one training process (or a ``disk_rollback`` after it) to the first step of the
    next one, for each restart the journal shows. Includes any wait before the restart: none under a
    supervisor, the time a person took when done by hand."""
    first: dict[int, float] = {}
    last: dict[int, float] = {}
    for row in metrics:
        first.setdefault(row["run_id"], row["wall_time"])
        last[row["run_id"]] = row["wall_time"]
    trainers = [run for run in runs if run["id"] in first]
    out = []
    for before, after in itertools.pairwise(trainers):
        ended = max(t for t in (before.get("ended_at"), last[before["id"]]) if t is not None)
        disk = [a["wall_time"] for a in actions if a["action"] in (DISK_ROLLBACK, "disk_undo")
                and ended <= a["wall_time"] <= after["started_at"]]
        start = max([ended, *disk])
        if first[after["id"]] > start:
            out.append(first[after["id"]] - start)
    return out
