"""plots.py owns the report's figures: loss, gradient norm and LR over the run, and a timeline of actions, as PNG bytes.

It imports matplotlib inside :func:`render_plots` only, and draws through ``matplotlib.figure.Figure`` with the
Agg canvas, never pyplot: no global backend is switched and no window can open. The core never imports this
module; ``nanguard report`` does.

Curves share the run's x axis (:class:`~nanguard.report.timing.Axis`: epochs with fractions, or steps). Work a
rollback discarded is shaded (in process: orange; on disk: red) and its points drawn faded; incidents are
marked at the top of each curve by kind (a non-finite value has no y to draw). Without per-step metrics in the
journal (an unguarded run) the loss and LR come from results.csv, one point per epoch. The timeline's x axis
is wall time since the run's first process started.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from nanguard.report.runinfo import RunInfo
from nanguard.report.timing import ROLLBACK, StepPoint

if TYPE_CHECKING:
    from matplotlib.axes import Axes

FIG_SIZE = (10.0, 3.4)
"""Inches; with :data:`DPI` a plot is 1100 × 374 pixels, readable in a browser without zooming."""
DPI = 110
_KIND_LOOK = {  # marker, colour
    "nonfinite_loss": ("X", "#d62728"), "nonfinite_grad": ("v", "#ff7f0e"), "nonfinite_model": ("D", "#8c1515"),
    "nonfinite_ema": ("s", "#9467bd"), "nonfinite_optimizer": ("P", "#e377c2"), "loss_spike": ("^", "#1f77b4"),
    "grad_spike": ("^", "#17becf"), "amp_overflow": ("o", "#7f7f7f"),
}
_SPAN_LOOK = {"in_process": ("#ff7f0e", "rolled back in process"), "disk": ("#d62728", "rolled back on disk")}
_VERDICT_COLOURS = {"clean": "#2ca02c", "dirty": "#d62728", "unsafe": "#e377c2", "unreadable": "#7f7f7f",
                    "tainted": "#ff7f0e"}
LANES = ("processes", "skips", "rollbacks", "LR back-off, probation", "checkpoints", "on disk", "other")
"""The timeline's rows, top to bottom."""
_LANE_OF = {"rollback": "rollbacks", "stop": "rollbacks", "lr_backoff": "LR back-off, probation",
            "probation_passed": "LR back-off, probation", "probation_failed": "LR back-off, probation",
            "checkpoint_replaced": "checkpoints", "checkpoint_quarantined": "checkpoints",
            "checkpoint_not_replaced": "checkpoints", "disk_rollback": "on disk", "disk_undo": "on disk",
            "resume": "on disk"}


@dataclass(frozen=True)
class Plot:
    """One figure: ``name`` (file stem), ``title``, ``caption`` (what it shows), ``png`` (the image bytes)."""

    name: str
    title: str
    caption: str
    png: bytes


def render_plots(info: RunInfo) -> list[Plot]:
    """The report's figures for ``info``, in reading order: loss, gradient norm, LR, timeline."""
    from matplotlib.figure import Figure

    def figure(left: float) -> tuple[Any, Axes]:
        fig = Figure(figsize=FIG_SIZE, dpi=DPI)
        # Fixed margins, not a layout engine: every curve's axes sit at the same place whatever its legend holds,
        # so the epochs line up when the plots are read one above the other. The legend goes in the right margin.
        fig.subplots_adjust(left=left, right=0.74, bottom=0.15, top=0.93)
        ax = fig.add_subplot()
        ax.grid(True, alpha=0.3)
        ax.spines[["top", "right"]].set_visible(False)
        return fig, ax

    plots = []
    for name, title, draw in (("loss", "Loss", _loss), ("grad_norm", "Gradient norm", _grad_norm),
                              ("lr", "Learning rate", _lr), ("timeline", "Timeline of actions", _timeline)):
        fig, ax = figure(0.17 if name == "timeline" else 0.08)  # the timeline's lane names need room
        caption = draw(info, ax)
        buffer = io.BytesIO()
        fig.savefig(buffer, format="png", dpi=DPI)
        plots.append(Plot(name, title, caption, buffer.getvalue()))
    return plots


# ---- curves ---------------------------------------------------------------------------------------------------


def _loss(info: RunInfo, ax: Axes) -> str:
    points = info.axis.points
    if points:
        _curve(ax, points, "loss", "#1f77b4", "loss per step")
        _scale_y(ax, [p.row["loss"] for p in points])
        caption = "Training loss of every optimizer step recorded by the guard"
    else:
        columns = [c for c in (info.results[0] if info.results else {}) if c.startswith("train/")]
        rows = [r for r in info.results if r.get("epoch") is not None]
        for column in columns:
            ax.plot([_finite(r["epoch"]) for r in rows], [_finite(r.get(column)) for r in rows], marker="o",
                    label=column)
        bad = [_finite(r["epoch"]) for r in rows if any(math.isnan(_finite(r.get(c))) for c in columns)]
        if bad:  # a NaN row is a gap in the lines; mark it where the eye looks for incidents
            ax.scatter(bad, [0.96] * len(bad), transform=ax.get_xaxis_transform(), marker="X", color="#d62728", s=60,
                       zorder=5, clip_on=False, label="non-finite loss in results.csv")
        caption = "Training losses per epoch from results.csv (the journal has no per-step metrics)"
        if not columns:
            _empty(ax, "no loss recorded (no per-step metrics, no results.csv)")
    ax.set_ylabel("loss")
    _decorate(info, ax)
    return caption + "; rolled-back work shaded, incidents marked at the top by kind."


def _grad_norm(info: RunInfo, ax: Axes) -> str:
    points = info.axis.points
    if not points:
        _empty(ax, "no per-step metrics in the journal (an unguarded run, or a journal from before metrics)")
        _decorate(info, ax)
        return "Gradient norm per step: not recorded for this run."
    _curve(ax, points, "grad_norm", "#2ca02c", "gradient norm (before clipping)")
    xs, ys = [], []
    for p in points:
        if p.row.get("clip_threshold") is not None:
            xs += [p.x0, p.x1]
            ys += [p.row["clip_threshold"], p.row["clip_threshold"]]
        elif xs and not math.isnan(ys[-1]):
            xs.append(p.x1)
            ys.append(math.nan)
    if xs:
        ax.plot(xs, ys, color="#d62728", linestyle="--", linewidth=1.2, label="clip threshold")
    _scale_y(ax, [p.row["grad_norm"] for p in points] + [y for y in ys if not math.isnan(y)])
    ax.set_ylabel("gradient norm")
    _decorate(info, ax)
    return "Gradient norm of every step before clipping, with the norm it was clipped to (dashed)."


def _lr(info: RunInfo, ax: Axes) -> str:
    points = [p for p in info.axis.points if p.row.get("lr") is not None]
    caption = []
    if points:
        _curve(ax, points, "lr", "#9467bd", "LR as applied (after back-off)")
        caption.append("LR each step applied, after the guard's back-off")
    epochs = [r for r in info.results if r.get("epoch") is not None and r.get("lr/pg0") is not None]
    if epochs and info.axis.kind == "epoch":
        # results.csv logs the scheduler's LR at the end of each epoch (before any back-off).
        ax.step([_finite(r["epoch"]) for r in epochs], [_finite(r["lr/pg0"]) for r in epochs], where="pre",
                color="#7f7f7f", linestyle=":", linewidth=1.5, label="lr/pg0 per epoch (results.csv)")
        caption.append("the scheduler's LR per epoch from results.csv (dotted)")
    for x0, x1 in _probation_spans(info):
        ax.axvspan(x0, x1, color="#bcbd22", alpha=0.15, label="probation")
    if not caption:
        _empty(ax, "no LR recorded")
    ax.set_ylabel("learning rate")
    ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
    _decorate(info, ax)
    return "; ".join(caption or ["no LR recorded"]) + "; probation windows after a rollback shaded."


def _curve(ax: Axes, points: list[StepPoint], key: str, colour: str, label: str) -> None:
    """Kept steps as a line, steps a rollback discarded or a replay superseded as faded dots."""
    kept = [p for p in points if not (p.undone or p.superseded)]
    gone = [p for p in points if p.undone or p.superseded]
    xs: list[float] = []
    ys: list[float] = []
    for point in points:  # write order; a discarded step breaks the line, so it never bridges a rolled-back span
        if point.undone or point.superseded:
            if ys and not math.isnan(ys[-1]):
                xs.append(point.x1)
                ys.append(math.nan)
            continue
        xs.append(point.x1)
        ys.append(_finite(point.row.get(key)))
    ax.plot(xs, ys, color=colour, linewidth=1.4, marker="." if len(kept) < 200 else None, markersize=5, label=label)
    if gone:
        ax.plot([p.x1 for p in gone], [_finite(p.row.get(key)) for p in gone], linestyle="none", marker="o",
                markersize=4, color=colour, alpha=0.35, label="discarded by a rollback")


def _decorate(info: RunInfo, ax: Axes) -> None:
    """Shade the rolled-back spans, mark incidents at the top, label the x axis, add the legend."""
    from matplotlib.ticker import MaxNLocator

    for span in info.axis.spans:
        colour, label = _SPAN_LOOK[span.kind]
        ax.axvspan(span.x0, span.x1, color=colour, alpha=0.18, label=label, linewidth=0)
    top = ax.get_xaxis_transform()  # x in data units, y as a fraction of the axes: non-finite values have no y
    for row, (kind, xs) in enumerate(_incident_xs(info).items()):
        marker, colour = _KIND_LOOK.get(kind, ("*", "#000000"))
        # One row per kind, so kinds recorded at the same step (a NaN loss and the NaN weight behind it) all show.
        ax.scatter(xs, [0.96 - 0.07 * (row % 6)] * len(xs), transform=top, marker=marker, color=colour, s=60, zorder=5,
                   label=f"incident: {kind}", clip_on=False)
        for x in xs:
            ax.axvline(x, color=colour, linestyle=":", linewidth=0.8, alpha=0.6)
    ax.set_xlabel("epoch" if info.axis.kind == "epoch" else "optimizer step")
    if info.axis.kind == "epoch":
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        right = max([float(info.epochs_total or 0), *(p.x1 for p in info.axis.points),
                     *((r.get("epoch") or 0.0) for r in info.results)])
        ax.set_xlim(0, max(right, 1.0))
    handles, labels = ax.get_legend_handles_labels()
    unique = dict(zip(labels, handles, strict=True))  # one entry per label (several spans share one)
    if unique:
        ax.legend(unique.values(), unique.keys(), loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8,
                  frameon=False)


def _incident_xs(info: RunInfo) -> dict[str, list[float]]:
    out: dict[str, list[float]] = {}
    for row in info.incidents:
        x = None
        for point in info.axis.points:
            r = point.row
            if r["run_id"] == row["run_id"] and r["step"] == row["step"] and r["wall_time"] <= row["wall_time"] + 1e-3:
                x = point.x1
        if x is None:
            x = info.axis.place(row.get("epoch"), row.get("batch_index"), row["step"])
        if x is not None:
            out.setdefault(row["kind"], []).append(x)
    return out


def _probation_spans(info: RunInfo) -> list[tuple[float, float]]:
    """Each rollback's probation on the axis: from the first step after it to ``probation_until`` (or the end)."""
    spans = []
    points = info.axis.points
    for action in info.actions:
        detail = action.get("detail") or {}
        until = detail.get("probation_until")
        if action["action"] != ROLLBACK or not isinstance(until, int):
            continue
        after = [p for p in points if p.row["run_id"] == action["run_id"] and p.row["wall_time"] > action["wall_time"]]
        if not after:
            continue
        inside = [p for p in after if p.row["step"] < until]
        end = inside[-1].x1 if inside else after[0].x1
        if len(inside) == len(after) or not inside:
            end = max(end, after[-1].x1)
        spans.append((after[0].x0, end))
    return spans


def _scale_y(ax: Axes, values: list[Any]) -> None:
    finite = [v for v in values if isinstance(v, int | float) and math.isfinite(v) and v > 0]
    if finite and max(finite) / min(finite) > 50:
        ax.set_yscale("log")


def _finite(value: Any) -> float:
    return float(value) if isinstance(value, int | float) and math.isfinite(value) else math.nan


def _empty(ax: Axes, message: str) -> None:
    ax.set_xticks([])
    ax.set_yticks([])
    ax.text(0.5, 0.5, message, transform=ax.transAxes, ha="center", va="center", color="#7f7f7f")


# ---- timeline -------------------------------------------------------------------------------------------------


def _timeline(info: RunInfo, ax: Axes) -> str:
    events = _events(info)
    starts = [r["started_at"] for r in info.runs] + [t for t, *_ in events]
    if not starts:
        _empty(ax, "nothing recorded")
        return "Timeline: nothing recorded."
    origin = min(starts)
    end = max([*(t for t, *_ in events), *(r.get("ended_at") or r["started_at"] for r in info.runs),
               *(m["wall_time"] for m in info.metrics[-1:])])
    unit, div = _time_unit(end - origin)
    lane_y = {lane: len(LANES) - 1 - i for i, lane in enumerate(LANES)}
    for run in info.runs:
        stop = run.get("ended_at") or end
        colour = {"finished": "#2ca02c", "stopped": "#ff7f0e", "dirty": "#d62728",
                  "crashed": "#d62728"}.get(run["status"], "#1f77b4")
        command = run["policy"].get("command") if isinstance(run["policy"], dict) else None
        label = f"process: {run['status']}" if command is None else "process: nanguard CLI"
        ax.plot([(run["started_at"] - origin) / div, (stop - origin) / div], [lane_y["processes"]] * 2,
                linewidth=8, solid_capstyle="butt", color=colour if command is None else "#bbbbbb", label=label)
    for when, lane, name, colour, marker in events:
        ax.scatter([(when - origin) / div], [lane_y[lane]], color=colour, marker=marker, s=70, zorder=5,
                   label=name, edgecolors="black", linewidths=0.4)
    ax.set_yticks(list(lane_y.values()), list(lane_y.keys()))
    ax.set_ylim(-0.7, len(LANES) - 0.3)
    ax.set_xlabel(f"time since the run started ({unit})")
    handles, labels = ax.get_legend_handles_labels()
    unique = dict(zip(labels, handles, strict=True))
    ax.legend(unique.values(), unique.keys(), loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8,
              frameon=False)
    return ("Every action the journal holds, by wall time: the processes that wrote it, skipped steps, rollbacks, "
            "LR back-offs and probation results, checkpoint verdicts and replacements, disk rollbacks and undos, "
            "and other actions (supervisor, Ultralytics hand-overs).")


def _events(info: RunInfo) -> list[tuple[float, str, str, str, str]]:
    """(wall time, lane, legend label, colour, marker) of every event to draw."""
    events = []
    for row in info.incidents:
        if row["action"] in ("skip", "scaler_skip"):
            events.append((row["wall_time"], "skips", f"skip ({row['kind']})", _KIND_LOOK.get(row["kind"],
                           ("*", "#000000"))[1], "v"))
    for action in info.actions:
        name = action["action"]
        lane = _LANE_OF.get(name, "other")
        colour = {"rollback": "#ff7f0e", "stop": "#d62728", "lr_backoff": "#9467bd", "probation_passed": "#2ca02c",
                  "probation_failed": "#d62728", "disk_rollback": "#d62728", "disk_undo": "#1f77b4",
                  "checkpoint_replaced": "#ff7f0e", "checkpoint_quarantined": "#d62728"}.get(name, "#7f7f7f")
        events.append((action["wall_time"], lane, name, colour, "o" if lane != "rollbacks" else "D"))
    for row in info.checkpoints:
        verdict = "tainted" if row["tainted"] and row["status"] == "clean" else row["status"]
        events.append((row["wall_time"], "checkpoints", f"checkpoint {verdict}",
                       _VERDICT_COLOURS.get(verdict, "#7f7f7f"), "s"))
    return sorted(events)


def _time_unit(seconds: float) -> tuple[str, float]:
    if seconds >= 3 * 3600:
        return "hours", 3600.0
    if seconds >= 180:
        return "minutes", 60.0
    return "seconds", 1.0
