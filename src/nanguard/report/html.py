"""html.py owns ``nanguard report``'s output: one self-contained HTML file and the PNGs beside it.

The HTML embeds every plot as a base64 ``data:`` URI and its CSS inline, and references nothing outside itself
(no fonts, scripts or images from the network), so it can be mailed or archived as one file. A small inline
script counts the images the browser decoded into ``<body data-images-loaded>``, which tests read in headless
Chromium. Every file is written atomically (:func:`nanguard.atomic.atomic_write_bytes`): the plots are drawn
in memory first, so a failure leaves no half-written report. It draws nothing itself (:mod:`~.plots` does).
"""

from __future__ import annotations

import base64
import html
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nanguard import __version__
from nanguard.atomic import atomic_write_bytes
from nanguard.errors import NanguardError
from nanguard.report.runinfo import RunInfo
from nanguard.report.status import clock_text, duration_text

MAX_TABLE_ROWS = 500
"""Rows per table in the HTML; longer tables say how many were left out (``nanguard incidents --json`` has all)."""

_CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 2em auto; max-width: 1200px;
       color: #222; padding: 0 1em; }
h1 { font-size: 1.5em; margin-bottom: 0.2em; }
h2 { font-size: 1.2em; margin-top: 1.6em; border-bottom: 1px solid #ddd; }
.sub { color: #666; margin-top: 0; }
dl.summary { display: grid; grid-template-columns: max-content auto; gap: 0.25em 1.5em; }
dl.summary dt { font-weight: 600; } dl.summary dd { margin: 0; }
figure { margin: 1.2em 0; } figure img { max-width: 100%; height: auto; border: 1px solid #eee; }
figcaption { color: #555; font-size: 0.9em; }
table { border-collapse: collapse; font-size: 0.85em; width: 100%; }
th, td { border-bottom: 1px solid #e5e5e5; padding: 0.25em 0.5em; text-align: left; vertical-align: top; }
th { background: #f6f6f6; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
.clean { color: #2a7d2a; font-weight: 600; } .dirty, .unsafe, .bad { color: #c0392b; font-weight: 600; }
.tainted, .unreadable { color: #b8860b; font-weight: 600; } .muted { color: #888; }
"""
_SCRIPT = """
window.addEventListener("load", function () {
  var loaded = Array.prototype.filter.call(document.images, function (img) { return img.naturalWidth > 0; });
  document.body.setAttribute("data-images-loaded", String(loaded.length));
});
"""


class ReportError(NanguardError):
    """The report cannot be written: matplotlib is missing, or the output folder does not exist."""


@dataclass(frozen=True)
class WrittenReport:
    """What :func:`write_report` wrote: the HTML file and the PNGs, in plot order."""

    html: Path
    pngs: list[Path]


def write_report(info: RunInfo, output: str | Path, *, png_dir: str | Path | None = None) -> WrittenReport:
    """Draw the plots, write them as PNGs (into ``png_dir``, default: ``output``'s folder) and write ``output``.

    PNGs are named ``<output stem>_<plot>.png``.

    Raises:
        ReportError: ``output``'s folder does not exist, or matplotlib is not installed.
    """
    output = Path(output)
    if not output.parent.is_dir():
        raise ReportError(f"{output}: its folder {output.parent} does not exist")
    if output.is_dir():
        raise ReportError(f"{output}: is a folder; -o takes the HTML file to write")
    try:
        from nanguard.report.plots import render_plots

        plots = render_plots(info)
    except ImportError as err:
        raise ReportError(f"nanguard report needs matplotlib (pip install matplotlib): {err}") from None
    folder = Path(png_dir) if png_dir is not None else output.parent
    folder.mkdir(parents=True, exist_ok=True)
    pngs = []
    for plot in plots:
        path = folder / f"{output.stem}_{plot.name}.png"
        atomic_write_bytes(path, plot.png)
        pngs.append(path)
    figures = [
        f'<figure id="{plot.name}"><img alt="{_e(plot.title)}" src="data:image/png;base64,'
        f'{base64.b64encode(plot.png).decode("ascii")}"><figcaption><b>{_e(plot.title)}.</b> {_e(plot.caption)}'
        "</figcaption></figure>"
        for plot in plots
    ]
    atomic_write_bytes(output, render_html(info, figures).encode("utf-8"))
    return WrittenReport(output, pngs)


def render_html(info: RunInfo, figures: list[str]) -> str:
    """The report page for ``info`` with ``figures`` (ready ``<figure>`` elements) in its plots section."""
    title = f"nanguard report: {info.run_dir.name or info.run_dir}"
    parts = [
        "<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{_e(title)}</title><style>{_CSS}</style></head><body>",
        f"<h1>{_e(title)}</h1>",
        f'<p class="sub">{_e(str(info.run_dir))} · written {_e(clock_text(time.time()))} by nanguard {__version__}</p>',
        "<h2>Summary</h2>", _summary(info),
        "<h2>Plots</h2>", *figures,
        f"<h2>Incidents ({len(info.incidents)})</h2>", _incidents(info),
        f"<h2>Checkpoint verdicts ({len(info.checkpoints)})</h2>", _checkpoints(info),
        f"<h2>Actions ({len(info.actions)})</h2>", _actions(info),
        f"<script>{_SCRIPT}</script>", "</body></html>",
    ]
    return "\n".join(parts) + "\n"


def _summary(info: RunInfo) -> str:
    p = info.progress
    total = "?" if info.epochs_total is None else str(info.epochs_total)
    ckpt = info.last_clean_checkpoint
    rows = [
        ("state", info.state),
        ("epochs done", f"{p.epochs_done} of {total}"),
        ("epoch time", f"{duration_text(info.epoch_seconds)} ({info.epoch_seconds_basis})"
         if info.epoch_seconds is not None else info.epoch_seconds_basis),
        ("steps recorded", str(len(info.metrics))),
        ("incidents", f"{len(info.incidents)}" + (" — per epoch: " + ", ".join(
            f"{'?' if e is None else e}: {n}" for e, n in info.incidents_per_epoch.items()) if info.incidents else "")),
        ("rollbacks", f"{sum(a['action'] == 'rollback' for a in info.rollbacks)} in process, "
                      f"{sum(a['action'] == 'disk_rollback' for a in info.rollbacks)} on disk"),
        ("last clean checkpoint", "none recorded" if ckpt is None else
         f"{ckpt['path']} (epoch {ckpt['epoch']})" if ckpt["resumable"] else f"{ckpt['path']} (final, stripped)"),
        ("LR (latest)", "unknown" if info.lr.lr is None else f"{info.lr.lr:.6g} ({info.lr.source})"),
    ]
    items = "".join(f"<dt>{_e(k)}</dt><dd>{_e(v)}</dd>" for k, v in rows)
    return f'<dl class="summary">{items}</dl>'


def _table(headers: list[str], rows: list[list[tuple[str, str]]], empty: str) -> str:
    """An HTML table; each cell is (text, css class)."""
    if not rows:
        return f'<p class="muted">{_e(empty)}</p>'
    shown = rows[:MAX_TABLE_ROWS]
    head = "".join(f"<th>{_e(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f'<td class="{c}">{_e(t)}</td>' if c else f"<td>{_e(t)}</td>" for t, c in row)
                   + "</tr>" for row in shown)
    more = f'<p class="muted">… {len(rows) - len(shown)} more rows not shown</p>' if len(rows) > len(shown) else ""
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>{more}"


def _incidents(info: RunInfo) -> str:
    rows = []
    for r in info.incidents:
        tensors = r.get("tensors") or []
        shown = ", ".join(tensors[:3]) + (f", … +{len(tensors) - 3} more" if len(tensors) > 3 else "")
        bad = "bad" if r["kind"].startswith("nonfinite") else ""
        rows.append([(str(r["id"]), "num"), (str(r["step"]), "num"), (_opt(r.get("epoch")), "num"),
                     (_opt(r.get("batch_index")), "num"), (_opt(r.get("micro_batch")), "num"),
                     (_opt(r.get("attempt")), "num"), (r["kind"], bad),
                     (r["action"], ""), (_num(r.get("loss")), "num"), (_num(r.get("grad_norm")), "num"),
                     ("yes" if r.get("rolled_back") else "", ""), (shown or "-", ""), (clock_text(r["wall_time"]), "")])
    return _table(["id", "step", "epoch", "batch", "micro-batch", "attempt", "kind", "action", "loss", "grad norm",
                   "rolled back", "non-finite tensors", "time"], rows, "No incidents.")


def _checkpoints(info: RunInfo) -> str:
    rows = []
    for r in info.checkpoints:
        verdict = "tainted" if r["tainted"] and r["status"] == "clean" else r["status"]
        epoch = r.get("epoch")
        rows.append([(Path(r["path"]).name, ""), (_opt(epoch) if epoch != -1 else "final (stripped)", "num"),
                     (verdict, verdict), (str(len(r.get("findings") or [])), "num"), (r.get("taint_reason") or "", ""),
                     (clock_text(r["wall_time"]), ""), (r["path"], "muted")])
    return _table(["file", "epoch", "verdict", "findings", "taint reason", "audited", "path"], rows,
                  "No checkpoint audits recorded (the guard records them as Ultralytics saves; "
                  "nanguard audit --record adds others).")


def _actions(info: RunInfo) -> str:
    rows = [[(str(a["id"]), "num"), (clock_text(a["wall_time"]), ""), (a["action"], ""), (str(a["step"]), "num"),
             (a["reason"], ""), (_detail(a.get("detail") or {}), "muted")] for a in info.actions]
    return _table(["id", "time", "action", "step", "reason", "detail"], rows, "No actions recorded.")


def _detail(detail: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in detail.items() if not isinstance(v, dict | list) or len(str(v)) < 80)


def _opt(value: Any) -> str:
    return "-" if value is None else str(value)


def _num(value: Any) -> str:
    if value is None:
        return "-"
    return f"{value:.6g}" if isinstance(value, float) and math.isfinite(value) else str(value)


def _e(text: str) -> str:
    return html.escape(text, quote=True)
