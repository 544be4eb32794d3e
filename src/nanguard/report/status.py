"""status.py owns the ``nanguard status`` dashboard: a :class:`~nanguard.report.runinfo.RunInfo` as Rich renderables
(:func:`status_renderables`) and as plain JSON data (:func:`status_dict`).

It computes nothing new: every number comes from the RunInfo, so the dashboard, ``--json``, the report and the
plan agree. It prints nothing (the CLI does) and builds no RunInfo itself.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable
from datetime import datetime
from typing import Any

from rich import box
from rich.console import Group, RenderableType
from rich.panel import Panel
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

from nanguard.report.runinfo import RunInfo

_STATE_STYLES = {"running": "bold green", "finished": "green", "stopped": "bold yellow", "dirty": "bold red",
                 "crashed": "bold red", "failed": "bold red"}
BAR_WIDTH = 30


def status_dict(info: RunInfo) -> dict[str, Any]:
    """The dashboard's numbers as plain data (the ``--json`` output)."""
    progress = info.progress
    return {
        "run_dir": str(info.run_dir),
        "state": info.state,
        "gathered_at": info.gathered_at,
        "epochs_total": info.epochs_total,
        "epochs_total_source": info.epochs_source,
        "epochs_done": progress.epochs_done,
        "epoch": progress.epoch,
        "batch": progress.batch,
        "batches": progress.batches,
        "position": progress.position,
        "progress_source": progress.source,
        "progress_wall_time": progress.wall_time,
        "epoch_seconds": info.epoch_seconds,
        "epoch_seconds_basis": info.epoch_seconds_basis,
        "epoch_times": [{"epoch": t.epoch, "seconds": t.seconds, "source": t.source, "clean": t.clean}
                        for t in info.epoch_times],
        "remaining_seconds": info.remaining_s,
        "eta": info.eta,
        "eta_iso": _iso(info.eta),
        "incidents": len(info.incidents),
        "incidents_replayed": sum(1 for row in info.incidents if row.get("replay")),
        "attempts": _attempts(info),
        "incidents_per_epoch": [{"epoch": epoch, "count": count} for epoch, count in info.incidents_per_epoch.items()],
        "last_clean_checkpoint": info.last_clean_checkpoint,
        "rollbacks": [_rollback_dict(a) for a in info.rollbacks],
        "lr": {"lr": info.lr.lr, "source": info.lr.source, "backoff": info.lr.backoff, "probation": info.lr.probation},
        "processes": [p.to_dict() for p in info.processes],
        "supervisor": info.supervisor.to_dict() if info.supervisor.present else None,
        "steps_recorded": len(info.metrics),
    }


def status_renderables(info: RunInfo) -> Iterable[RenderableType]:
    """The dashboard, top to bottom: state, progress and ETA, health, LR, processes, supervisor."""
    title = Text.assemble(("nanguard status  ", "bold"), (str(info.run_dir), ""), "  ",
                          (info.state, _STATE_STYLES.get(info.state, "bold")))
    yield title
    yield Panel(_progress(info), title="progress", title_align="left", expand=False, box=box.ROUNDED)
    yield Panel(_health(info), title="health", title_align="left", expand=False, box=box.ROUNDED)
    yield Panel(_lr(info), title="learning rate", title_align="left", expand=False, box=box.ROUNDED)
    yield Panel(_processes(info), title="processes", title_align="left", expand=False, box=box.ROUNDED)
    yield Text(f"as of {clock_text(info.gathered_at)}", style="dim")


def _progress(info: RunInfo) -> RenderableType:
    p = info.progress
    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="bold")
    grid.add_column()
    total = info.epochs_total
    if total:
        bar = ProgressBar(total=float(total), completed=min(p.position, float(total)), width=BAR_WIDTH)
        grid.add_row("epochs", _beside(bar, Text(f"{p.epochs_done}/{total} done" + _in_progress(info))))
    else:
        grid.add_row("epochs", Text(f"{p.epochs_done} done (total unknown: no args.yaml; pass --epochs)"
                                    + _in_progress(info)))
    if p.batches and p.batch is not None and info.state != "finished":
        bar = ProgressBar(total=float(p.batches), completed=float(min(p.batch, p.batches)), width=BAR_WIDTH)
        grid.add_row("batch", _beside(bar, Text(f"{p.batch}/{p.batches} of epoch {p.epoch}")))
    if info.epoch_seconds is not None:
        grid.add_row("epoch time", Text(f"{duration_text(info.epoch_seconds)} ({info.epoch_seconds_basis}; rolled-back "
                                        "work excluded)"))
    else:
        grid.add_row("epoch time", Text(info.epoch_seconds_basis, style="dim"))
    if info.state == "finished":
        grid.add_row("ETA", Text("finished", style="green"))
    elif info.remaining_s is not None:
        grid.add_row("ETA", Text(f"{clock_text(info.eta)} ({duration_text(info.remaining_s)} left)"))
    else:
        grid.add_row("ETA", Text("unknown", style="dim"))
    if p.wall_time is not None:
        grid.add_row("last progress", Text(f"{clock_text(p.wall_time)} (from {p.source})"))
    return grid


def _beside(bar: ProgressBar, text: Text) -> Table:
    row = Table.grid(padding=(0, 1))
    row.add_row(bar, text)
    return row


def _in_progress(info: RunInfo) -> str:
    p = info.progress
    if info.state == "finished" or p.epoch is None or p.epoch < p.epochs_done:
        return ""
    return f"; epoch {p.epoch} in progress"


def _health(info: RunInfo) -> RenderableType:
    parts: list[RenderableType] = []
    if info.incidents:
        table = Table(box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False, header_style="bold")
        table.add_column("epoch", justify="right")
        table.add_column("incidents", justify="right")
        table.add_column("kinds")
        by_epoch: dict[int | None, Counter[str]] = {}
        for row in info.incidents:
            by_epoch.setdefault(row.get("epoch"), Counter())[row["kind"]] += 1
        for epoch, count in info.incidents_per_epoch.items():
            kinds = ", ".join(f"{k} {n}" for k, n in by_epoch[epoch].most_common())
            table.add_row("-" if epoch is None else str(epoch), str(count), kinds)
        parts.append(table)
        replayed = sum(1 for row in info.incidents if row.get("replay"))
        if replayed:
            parts.append(Text(f"{replayed} of them on steps a rollback undid and ran again "
                              f"(attempt {_attempts(info)} now)", style="dim"))
    else:
        parts.append(Text("no incidents", style="green"))
    ckpt = info.last_clean_checkpoint
    if ckpt is None:
        parts.append(Text("last clean checkpoint: none recorded", style="yellow"))
    else:
        epoch = ckpt["epoch"]
        where = f"epoch {epoch}" if ckpt["resumable"] else "final, stripped (not resumable)"
        parts.append(Text(f"last clean checkpoint: {ckpt['path']} ({where})"))
    rollbacks = info.rollbacks
    if not rollbacks:
        parts.append(Text("rollbacks: none"))
    for action in rollbacks:
        parts.append(Text(f"{_rollback_line(action)}  at {clock_text(action['wall_time'])}", style="yellow"))
    return Group(*parts)


def _lr(info: RunInfo) -> RenderableType:
    lr = info.lr
    lines = [Text(f"LR: {lr.lr:.6g} ({lr.source})" if lr.lr is not None else "LR: unknown")]
    backoff = lr.backoff
    if backoff is not None:
        phase = {"backed_off": "backed off now", "ramping": "ramping back to 1 now", "over": "over",
                 "unknown": "phase unknown"}[backoff["phase"]]
        lines.append(Text(f"back-off: ×{backoff['factor']} from step {backoff['start_step']} for "
                          f"{backoff['probation_steps']} steps, then {backoff['recovery_steps']} to ramp back; {phase}",
                          style="yellow" if backoff["phase"] in ("backed_off", "ramping") else ""))
    else:
        lines.append(Text("back-off: none"))
    if info.state != "running" and (backoff is not None or lr.probation is not None):
        lines.append(Text(f"(as the guard left it: the run is {info.state})", style="dim"))
    probation = lr.probation
    if probation is None:
        lines.append(Text("probation: none (no rollback)"))
    elif probation["state"] == "on":
        lines.append(Text(f"probation: ON until step {probation['until_step']} ({probation.get('steps_left', '?')} "
                          f"steps left), level {probation['level']}", style="bold yellow"))
    else:
        ended = f" at step {probation['ended_step']}" if "ended_step" in probation else ""
        lines.append(Text(f"probation: {probation['state']}{ended} (until step {probation['until_step']})",
                          style="bold red" if probation["state"] == "failed" else "green"))
    return Group(*lines)


def _processes(info: RunInfo) -> RenderableType:
    parts: list[RenderableType] = []
    sup = info.supervisor
    if not sup.present:
        parts.append(Text("supervisor: none (no .nanguard/supervisor.json)", style="dim"))
    elif sup.error is not None:
        parts.append(Text(f"supervisor: {sup.path.name} is malformed: {sup.error}", style="bold red"))
    if sup.present and sup.data:
        d = sup.data
        parts.append(Text(f"supervisor: {d.get('state', '?')}, attempt {d.get('attempt', '?')}, restarts "
                          f"{d.get('restarts', '?')}/{d.get('max_restarts', '?')}"
                          + (f", last trigger: {d['last_trigger']}" if d.get("last_trigger") else "")))
        for key in ("command", "resume_command", "log"):
            if d.get(key):
                value = d[key] if isinstance(d[key], str) else " ".join(map(str, d[key]))
                parts.append(Text(f"  {key}: {value}", style="dim"))
    if info.processes:
        table = Table(box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False, header_style="bold")
        for name in ("role", "pid", "alive", "CPU %", "RSS", "note"):
            table.add_column(name, justify="right" if name in ("pid", "CPU %", "RSS") else "left")
        for proc in info.processes:
            alive = {True: Text("yes", style="green"), False: Text("no", style="bold red"),
                     None: Text("?", style="dim")}[proc.alive]
            table.add_row(proc.role, str(proc.pid), alive,
                          "-" if proc.cpu_percent is None else f"{proc.cpu_percent:.0f}",
                          "-" if proc.rss_bytes is None else f"{proc.rss_bytes / 2**20:.0f} MiB", proc.note or "")
        parts.append(table)
    elif info.state != "running":
        parts.append(Text(f"no live process to watch (the guard's last run is {info.state})", style="dim"))
    return Group(*parts)


def _attempts(info: RunInfo) -> int:
    """The latest guard run's attempt: 0, then +1 after each in-process rollback."""
    runs = info.guard_runs
    return int(runs[-1].get("attempts") or 0) if runs else 0


def _rollback_dict(action: dict[str, Any]) -> dict[str, Any]:
    detail = action.get("detail") or {}
    kind = "in_process" if action["action"] == "rollback" else "disk"
    out = {"kind": kind, "action_id": action["id"], "wall_time": action["wall_time"], "reason": action["reason"]}
    keys = ("from_step", "to_step", "level", "data_rewound", "skipped_windows") if kind == "in_process" else \
        ("target", "target_epoch", "resume_epoch", "results_rows_dropped", "lr_scale")
    out.update({key: detail.get(key) for key in keys})
    return out


def _rollback_line(action: dict[str, Any]) -> str:
    d = action.get("detail") or {}
    if action["action"] == "rollback":
        return f"in-process rollback: step {d.get('from_step')} → {d.get('to_step')} ({action['reason']})"
    return f"disk rollback: to epoch {d.get('target_epoch')}, resume at epoch {d.get('resume_epoch')}"


def clock_text(when: float | None) -> str:
    """A wall time as local ``YYYY-MM-DD HH:MM:SS`` (``-`` when unknown); shared by status, plan and report."""
    return "-" if when is None else datetime.fromtimestamp(when).strftime("%Y-%m-%d %H:%M:%S")


def _iso(when: float | None) -> str | None:
    return None if when is None else datetime.fromtimestamp(when).astimezone().isoformat(timespec="seconds")


def duration_text(seconds: float) -> str:
    """A duration as a person reads it (``1h 02m``, ``3m 20s``, ``4.2s``); shared by status, plan and report."""
    if not math.isfinite(seconds):
        return "?"
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes, secs = divmod(round(seconds), 60)
    if minutes < 60:
        return f"{minutes}m {secs:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h {minutes:02d}m"

