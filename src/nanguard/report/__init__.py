"""nanguard.report owns reading a run from outside its process and showing it: the ``nanguard status``
dashboard, the HTML report with its plots, and the recovery planner.

    info = gather_run("runs/detect/train")          # one read of journal, results.csv, args.yaml, supervisor
    for renderable in status_renderables(info): console.print(renderable)
    write_report(info, "report.html")               # + report_loss.png, ... beside it (needs matplotlib)
    plan = make_plan(info)                          # options (a) (b) (c) in hours lost and ETA

The package is split by role: :mod:`~.runinfo` gathers a :class:`RunInfo` (the one reader all three share),
:mod:`~.timing` places steps on the run's axis and measures times, :mod:`~.processes` reads the supervisor's
state file and probes processes, :mod:`~.status` renders the dashboard, :mod:`~.plan` weighs the options,
:mod:`~.plots` draws (matplotlib, imported only when drawing) and :mod:`~.html` writes the report. Nothing
here imports torch at load time, and nothing changes the run folder.
"""

from __future__ import annotations

from nanguard.report.html import ReportError, WrittenReport, write_report
from nanguard.report.plan import DEFAULT_RESUME_OVERHEAD_S, Plan, PlanError, make_plan, plan_renderables
from nanguard.report.processes import SUPERVISOR_FILE, ProcessState, SupervisorState, read_supervisor
from nanguard.report.runinfo import LRState, Progress, RunInfo, gather_run, read_results
from nanguard.report.status import status_dict, status_renderables

__all__ = [
    "DEFAULT_RESUME_OVERHEAD_S",
    "SUPERVISOR_FILE",
    "LRState",
    "Plan",
    "PlanError",
    "ProcessState",
    "Progress",
    "ReportError",
    "RunInfo",
    "SupervisorState",
    "WrittenReport",
    "gather_run",
    "make_plan",
    "plan_renderables",
    "read_results",
    "read_supervisor",
    "status_dict",
    "status_renderables",
    "write_report",
]
