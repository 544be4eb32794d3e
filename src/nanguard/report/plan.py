"""plan.py owns ``nanguard plan``: the ways out of a run that went bad, in hours lost and ETA to the final epoch.

From a :class:`~nanguard.report.runinfo.RunInfo` it takes the decision point (the latest non-finite incident,
rollback or stop; the current position when there is none), the measured epoch time, the resume overhead and
the rollback target, and weighs three options:

a. finish the current epoch (and its validation), then roll back on disk to the last clean checkpoint and resume;
b. roll back on disk now and resume;
c. recover in process, as the guard does: restore the in-memory snapshot and skip the window since it.

"Hours lost" is the time spent on work that is thrown away plus the restart overhead: for (a) and (b) the
epochs after the checkpoint (redone after the resume), for (c) only the skipped window (its data is skipped,
not replayed, so it does not delay the finish). The ETA is the decision point plus the time each option still
needs. Every assumption is stated in the result (``assumptions``), and docs/report.md repeats them.

For an Ultralytics run the on-disk target is what :func:`nanguard.runs.plan_rollback` (dry: it audits and
changes nothing) picks among the checkpoints written before the decision point; when it refuses, the plan says
why and falls back to the journal's record of clean checkpoints. It renders Rich renderables and plain data;
it prints nothing and changes nothing.
"""

from __future__ import annotations

import statistics
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

from rich import box
from rich.console import RenderableType
from rich.table import Table
from rich.text import Text

from nanguard.errors import NanguardError
from nanguard.report.runinfo import RunInfo
from nanguard.report.status import clock_text, duration_text
from nanguard.report.timing import ROLLBACK, resume_overheads

DEFAULT_RESUME_OVERHEAD_S = 120.0
"""Restart overhead when the journal shows no restart to measure: stopping, loading the checkpoint, building the
model and data loaders, and the first step's warm-up. Two minutes is typical of a single-GPU Ultralytics run."""
TIMELINE_COLUMNS = 60
_SEGMENT_LOOK = {"finish": ("f", "black on yellow"), "overhead": ("·", "white on magenta"),
                 "redo": ("x", "white on red"), "new": ("█", "green")}
_SEGMENT_MEANING = {"finish": "finish the current epoch", "overhead": "stop, restore and restart",
                    "redo": "redo work that was thrown away", "new": "epochs not trained yet"}


class PlanError(NanguardError):
    """The run's numbers cannot support a plan (no measured epoch, unknown epoch count)."""


@dataclass(frozen=True)
class Segment:
    """One stretch of an option's future: ``kind`` (finish, overhead, redo, new), ``seconds``, ``lost``."""

    kind: str
    seconds: float
    lost: bool


@dataclass(frozen=True)
class Option:
    """One way out: ``key`` (a, b, c), ``title``, ``seconds_lost``, ``finish_seconds`` (from the decision point),
    ``eta`` (wall time), its ``segments`` and a ``note``; numbers are None when the option is not available."""

    key: str
    title: str
    seconds_lost: float | None
    finish_seconds: float | None
    eta: float | None
    segments: tuple[Segment, ...]
    note: str = ""


@dataclass
class Plan:
    """The result of :func:`make_plan`."""

    run_dir: str
    decision: dict[str, Any]
    epochs_total: int
    epoch_seconds: float
    step_seconds: float | None
    resume_overhead_s: float
    rollback_target: dict[str, Any] | None
    rollback_note: str | None
    options: list[Option]
    assumptions: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        for option in out["options"]:
            lost = option["seconds_lost"]
            option["hours_lost"] = None if lost is None else lost / 3600
        return out


def make_plan(info: RunInfo) -> Plan:
    """Weigh the three options for ``info``'s run (see the module docstring).

    Raises:
        PlanError: the total epochs or the epoch time is unknown.
    """
    if info.epochs_total is None:
        raise PlanError(f"{info.run_dir}: the run's total epochs are unknown (no args.yaml); pass --epochs N")
    if info.epoch_seconds is None:
        raise PlanError(f"{info.run_dir}: no complete epoch measured yet; plan needs one epoch's time")
    total, epoch_s = info.epochs_total, info.epoch_seconds
    decision = _decision(info)
    e_d, p_d, when = decision["epoch"], decision["position"], decision["wall_time"]
    steps = info.axis.steps_per_epoch
    step_s = epoch_s / steps if steps else None
    overheads = resume_overheads(info.guard_runs, info.metrics, info.actions)
    overhead = float(statistics.median(overheads)) if overheads else DEFAULT_RESUME_OVERHEAD_S
    target, note = _disk_target(info, e_d, when)
    resume_at = target["epoch"] + 1 if target is not None else 0
    assumptions = [
        f"epoch time {duration_text(epoch_s)}: {info.epoch_seconds_basis} (one cycle of training and "
        "validation; epochs redone after a rollback count once)",
        (f"resume overhead {duration_text(overhead)}: measured, median of {len(overheads)} restart(s) in the "
         "journal (from the end of one training process to the first step of the next)") if overheads else
        (f"resume overhead {duration_text(overhead)}: the default (DEFAULT_RESUME_OVERHEAD_S); the journal shows "
         "no restart to measure"),
        f"{total} epochs in all ({info.epochs_source}); the decision point is at epoch position {p_d:.2f}",
    ]
    if step_s is not None:
        assumptions.append(f"one optimizer step ≈ {duration_text(step_s)} (epoch time / {steps:g} steps per epoch)")
    remaining_new = max(total - p_d, 0.0) * epoch_s
    # (b) roll back now: redo from the checkpoint's next epoch to where the run is, then the rest.
    redo_b = max(p_d - resume_at, 0.0) * epoch_s
    option_b = _option("b", "roll back now (on disk), then resume", when, [
        Segment("overhead", overhead, True), Segment("redo", redo_b, True), Segment("new", remaining_new, False)])
    # (a) finish the epoch in progress (and validate it) first: that epoch is thrown away too.
    # After the resume it redoes the same work as (b); the finished epoch's rest counts as lost on its own.
    finish = max(min(e_d + 1, total) - p_d, 0.0) * epoch_s
    option_a = _option("a", "finish the epoch (validate), then roll back", when, [
        Segment("finish", finish, True), Segment("overhead", overhead, True),
        Segment("redo", redo_b, True), Segment("new", remaining_new, False)],
        note="only worth it when the epoch's validation decides; its work is thrown away")
    option_c = _in_process(info, decision, step_s, remaining_new, when)
    if target is None:
        option_a = _with_note(option_a, "no clean checkpoint before the fault: rolling back means starting over")
        option_b = _with_note(option_b, "no clean checkpoint before the fault: rolling back means starting over")
    return Plan(str(info.run_dir), decision, total, epoch_s, step_s, overhead, target, note,
                [option_a, option_b, option_c], assumptions)


def _option(key: str, title: str, when: float, segments: list[Segment], note: str = "") -> Option:
    lost = sum(s.seconds for s in segments if s.lost)
    finish = sum(s.seconds for s in segments)
    return Option(key, title, lost, finish, when + finish, tuple(s for s in segments if s.seconds > 0), note)


def _with_note(option: Option, note: str) -> Option:
    return Option(option.key, option.title, option.seconds_lost, option.finish_seconds, option.eta, option.segments,
                  "; ".join(n for n in (note, option.note) if n))


def _decision(info: RunInfo) -> dict[str, Any]:
    """The latest non-finite incident, rollback or stop, placed on the run's axis; else the current position."""
    bad = [row for row in info.incidents
           if row["kind"].startswith("nonfinite") or row["action"] in (ROLLBACK, "stop")]
    if bad:
        row = bad[-1]
        position = _incident_position(info, row)
        epoch = row.get("epoch")
        if epoch is None:
            epoch = int(position) if position is not None else info.progress.epochs_done
        if position is None:
            position = float(epoch) + 0.5
        return {"source": "incident", "incident_id": row["id"], "kind": row["kind"], "action": row["action"],
                "step": row["step"], "run_id": row["run_id"], "epoch": int(epoch),
                "batch_index": row.get("batch_index"),
                "position": position, "wall_time": row["wall_time"],
                "what": f"incident {row['id']}: {row['kind']} at step {row['step']} (epoch {epoch}, batch "
                        f"{row.get('batch_index')}), {row['action']}"}
    p = info.progress
    when = p.wall_time if p.wall_time is not None else info.gathered_at
    epoch = p.epoch if p.epoch is not None else max(p.epochs_done - 1, 0)
    return {"source": "now", "incident_id": None, "kind": None, "action": None, "step": None, "run_id": None,
            "epoch": int(epoch), "batch_index": p.batch, "position": p.position, "wall_time": when,
            "what": "no bad incident recorded: the options if the run went bad at its latest progress"}


def _incident_position(info: RunInfo, row: dict[str, Any]) -> float | None:
    match = None
    for point in info.axis.points:
        r = point.row
        if r["run_id"] == row["run_id"] and r["step"] == row["step"] and r["wall_time"] <= row["wall_time"] + 1e-3:
            match = point
    if match is not None:
        return match.x1
    return info.axis.place(row.get("epoch"), row.get("batch_index"), row["step"])


def _disk_target(info: RunInfo, e_d: int, when: float) -> tuple[dict[str, Any] | None, str | None]:
    """The newest clean resumable checkpoint written before epoch ``e_d`` finished, and a note on how it was found."""
    note = None
    if info.ultralytics:
        from nanguard.runs import RollbackRefused, plan_rollback

        try:
            dry = plan_rollback(info.run_dir)
            if dry.target_epoch < e_d:
                return {"path": str(dry.target), "epoch": dry.target_epoch, "source": "nanguard rollback (dry)",
                        "resume_command": dry.resume_command}, None
            before = [c for c in dry.candidates if c.usable and c.epoch is not None and 0 <= c.epoch < e_d]
            if before:
                pick = max(before, key=lambda c: (c.epoch or 0, c.path.name.startswith("epoch")))
                checked = plan_rollback(info.run_dir, to=str(pick.path))
                return {"path": str(checked.target), "epoch": checked.target_epoch,
                        "source": "nanguard rollback (dry), the newest clean checkpoint before the fault",
                        "resume_command": checked.resume_command}, None
            note = (f"nanguard rollback's newest clean checkpoint is from epoch {dry.target_epoch}, not before the "
                    f"fault in epoch {e_d}; no earlier one on disk")
        except RollbackRefused as err:
            note = f"nanguard rollback refuses: {err}"
        except NanguardError as err:  # an unreadable checkpoint folder: say so, plan from the journal
            note = f"nanguard rollback cannot plan: {err}"
    rows = [r for r in info.checkpoints if r["status"] == "clean" and not r["tainted"]
            and isinstance(r.get("epoch"), int) and 0 <= r["epoch"] < e_d and r["wall_time"] <= when]
    if rows:
        row = max(rows, key=lambda r: (r["epoch"], r["wall_time"]))
        return {"path": row["path"], "epoch": row["epoch"], "resume_command": None,
                "source": "the journal's audit record (the file may have been rewritten since)"}, note
    return None, (note + "; " if note else "") + f"no clean checkpoint recorded before epoch {e_d}"


def _in_process(info: RunInfo, decision: dict[str, Any], step_s: float | None, remaining: float, when: float
                ) -> Option:
    title = "recover in process (the guard: restore a snapshot, skip the window)"
    if not info.guard_runs or step_s is None:
        return Option("c", title, None, None, None, (),
                      note="needs the guard in the training process; this run's journal has no per-step record")
    rollbacks = [a for a in info.actions if a["action"] == ROLLBACK]
    restores = [a["wall_time"] - _incident_time(info, a) for a in rollbacks]
    restore = float(statistics.median(restores)) if restores else 0.0
    done = next((a for a in rollbacks if decision["step"] is not None and a["run_id"] == decision["run_id"]
                 and a["wall_time"] >= decision["wall_time"] and (a.get("detail") or {}).get("from_step", -1)
                 >= decision["step"]), None)
    if done is not None:
        detail = done["detail"]
        window = int(detail["from_step"]) - int(detail["to_step"]) + 1
        note = f"what the guard did: rolled back {window} step(s), step {detail['from_step']} → {detail['to_step']}"
    else:
        check = info.policy.get("check_every_steps")
        if not isinstance(check, int):
            from nanguard.policy import Policy

            check = Policy().check_every_steps
        step = decision["step"] if decision["step"] is not None else 0
        window = step % check + 1
        note = f"window estimated: steps since the last periodic check (check_every_steps={check})"
    if any(a["action"] == "stop" for a in info.actions):
        note += "; the guard stopped this run (escalation limits): in-process recovery gave up"
    lost = window * step_s + restore
    segments = (Segment("overhead", restore, True), Segment("new", remaining, False))
    return Option("c", title, lost, restore + remaining, when + restore + remaining,
                  tuple(s for s in segments if s.seconds > 0), note)


def _incident_time(info: RunInfo, action: dict[str, Any]) -> float:
    """When the incident a rollback answered was recorded (the rollback's own time when none is found)."""
    times = [r["wall_time"] for r in info.incidents if r["run_id"] == action["run_id"]
             and r["step"] == action["step"] and r["wall_time"] <= action["wall_time"]]
    return min(times) if times else action["wall_time"]


def plan_renderables(plan: Plan) -> Iterable[RenderableType]:
    """The plan: the decision point, a table of the options, their timelines, the target and the assumptions."""
    yield Text.assemble(("nanguard plan  ", "bold"), plan.run_dir)
    yield Text(f"decision point: {plan.decision['what']}, at {clock_text(plan.decision['wall_time'])}")
    table = Table(box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False, header_style="bold")
    table.add_column("option")
    table.add_column("hours lost", justify="right")
    table.add_column("to finish", justify="right")
    table.add_column("ETA")
    table.add_column("note")
    for option in plan.options:
        lost = "-" if option.seconds_lost is None else f"{option.seconds_lost / 3600:.2f} h " \
            f"({duration_text(option.seconds_lost)})"
        finish = "-" if option.finish_seconds is None else duration_text(option.finish_seconds)
        table.add_row(f"({option.key}) {option.title}", lost, finish, clock_text(option.eta), option.note)
    yield table
    yield Text("timeline from the decision point (one column ≈ "
               f"{duration_text(_scale(plan))}):", style="bold")
    for option in plan.options:
        yield _timeline(option, _scale(plan))
    yield Text("  " + "   ".join(f"{char} {_SEGMENT_MEANING[kind]}" for kind, (char, _) in _SEGMENT_LOOK.items()),
               style="dim")
    if plan.rollback_target is not None:
        target = plan.rollback_target
        yield Text(f"rollback target: {target['path']} (epoch {target['epoch']}; resume at epoch {target['epoch'] + 1})"
                   f", from {target['source']}")
    if plan.rollback_note:
        yield Text(f"note: {plan.rollback_note}", style="yellow")
    yield Text("assumptions:", style="bold")
    for line in plan.assumptions:
        yield Text(f"  - {line}")


def _scale(plan: Plan) -> float:
    longest = max((o.finish_seconds or 0.0 for o in plan.options), default=0.0)
    return max(longest, 1e-9) / TIMELINE_COLUMNS


def _timeline(option: Option, per_column: float) -> Text:
    text = Text(f"  ({option.key}) |")
    if option.finish_seconds is None:
        return Text.assemble(text, ("n/a", "dim"))
    for segment in option.segments:
        char, style = _SEGMENT_LOOK[segment.kind]
        text.append(char * max(1, round(segment.seconds / per_column)), style=style)
    text.append(f"| {clock_text(option.eta)}")
    return text
