"""recorder.py owns what the guard writes down: incidents, actions and per-step metrics in the run's journal.

It decides nothing. The Guard hands it each step decided and done (:class:`~nanguard.guard.step.Judged`), each move
of the controller's state table (:class:`~nanguard.guard.control.Change`) and each rollback or stop; it writes one
incident row per step for the step's symptom (a NaN loss also makes every gradient NaN, a loss spike comes with a
gradient spike) plus one per contaminated place, commits it before the step returns, and buffers the metrics
(:data:`METRICS_FLUSH_ROWS` rows or :data:`METRICS_FLUSH_SECONDS` seconds per write).
"""

from __future__ import annotations

import logging
import time
from typing import Any

from torch import Tensor

from nanguard.checks import Finding, Kind
from nanguard.guard.control import Change
from nanguard.guard.step import Judged
from nanguard.journal import IncidentRecord, Journal, MetricRecord
from nanguard.policy import Action, Policy

log = logging.getLogger("nanguard.guard")

METRICS_FLUSH_ROWS = 512
"""Per-step metrics are written to the journal in batches of this many rows (one transaction, one fsync) ..."""
METRICS_FLUSH_SECONDS = 15.0
"""... or when this much time passed since the last batch, so ``nanguard status`` stays current on slow steps."""

SYMPTOM_ORDER = (Kind.NONFINITE_LOSS, Kind.NONFINITE_GRAD, Kind.AMP_OVERFLOW, Kind.LOSS_SPIKE, Kind.GRAD_SPIKE)
"""A step's symptoms, most telling first: the journal keeps the first one the step had."""


class Recorder:
    """Journal rows and metrics of one guarded run (one process)."""

    def __init__(self, journal: Journal, run_id: int, policy: Policy, *, rank: int) -> None:
        self.journal, self.run_id, self.policy, self.rank = journal, run_id, policy, rank
        self.incidents: list[IncidentRecord] = []
        self.metrics: list[MetricRecord] = []
        self.metrics_written_at = time.monotonic()

    # ------------------------------------------------------------------ steps
    def step(self, judged: Judged, *, as_action: Action | None = None) -> list[IncidentRecord]:
        """Record one step: its incidents (committed now) and its metrics row (buffered). ``as_action`` is what
        the incidents say was done when it differs from the decision (the sync-free engine skipped on the device
        a step whose rollback comes at the flush)."""
        seen = judged.seen
        action = (as_action or judged.decision.action).value
        written = []
        for finding in one_symptom(list(judged.findings)):
            done = "scaler_skip" if finding.kind is Kind.AMP_OVERFLOW and not judged.applied else action
            written.append(self.incident(finding, step=seen.step, action=done, epoch=seen.epoch,
                                         batch_index=seen.batch_index, sample_ids=self.sample_ids_of(judged, finding),
                                         loss=seen.loss, grad_norm=seen.grad_norm, loop_step=seen.loop_step))
        self.metrics.append(MetricRecord(
            step=seen.step, epoch=seen.epoch, batch_index=seen.batch_index, loss=seen.loss, grad_norm=seen.grad_norm,
            clip_threshold=judged.clip_to, lr=judged.lr, applied=judged.applied, wall_time=time.time(),
            loop_step=seen.loop_step, attempt=self.journal.attempt(self.run_id)))
        if (len(self.metrics) >= METRICS_FLUSH_ROWS
                or time.monotonic() - self.metrics_written_at >= METRICS_FLUSH_SECONDS):
            self.write_metrics()
        return written

    @staticmethod
    def sample_ids_of(judged: Judged, finding: Finding) -> Any:
        """The sample ids an incident names: the micro-batch's own when the finding is a micro-batch's."""
        micro = judged.seen.micro_sample_ids
        at = finding.micro_batch
        if at is not None and at < len(micro) and micro[at] is not None:
            return micro[at]
        return judged.seen.sample_ids

    def incident(self, finding: Finding, *, step: int, action: str, epoch: int | None, batch_index: int | None,
                 sample_ids: Any = None, loss: float | None = None, grad_norm: float | None = None,
                 loop_step: int | None = None) -> IncidentRecord:
        """Commit one incident row (and keep it in :attr:`incidents`)."""
        incident = IncidentRecord(
            kind=finding.kind.value, step=step, action=action, epoch=epoch, batch_index=batch_index,
            sample_ids=plain_ids(sample_ids), rank=self.rank, loss=loss, grad_norm=grad_norm, value=finding.value,
            threshold=finding.threshold, tensors=finding.tensors, loop_step=loop_step, micro_batch=finding.micro_batch)
        self.incidents.append(incident)
        self.journal.record_incident(self.run_id, incident)
        where = f"micro-batch {finding.micro_batch} of " if finding.micro_batch is not None else ""
        log.warning("nanguard: %s at %sstep %d (epoch %s, batch %s): %s", finding.kind.value, where, step, epoch,
                    batch_index, action)
        return incident

    # ------------------------------------------------------------------ actions
    def changes(self, changes: list[Change], *, reason: str, at_step: int) -> None:
        """Record the controller's moves that are journal actions (back-off, probation passed or failed)."""
        for change in changes:
            name = change.journal_action
            if name == "lr_backoff":
                self.action(at_step, name, reason, {
                    "factor": self.policy.lr_backoff_factor, "probation_steps": self.policy.lr_probation_steps,
                    "recovery_steps": self.policy.lr_recovery_steps})
            elif name is not None:
                self.action(at_step, name, "", {"level": change.level,
                                                "rollbacks_without_progress": change.rollbacks_without_progress})

    def action(self, step: int, action: str, reason: str, detail: dict[str, Any], *,
               loop_step: int | None = None) -> None:
        self.journal.record_action(self.run_id, step=step, action=action, reason=reason, detail=detail,
                                   loop_step=loop_step)

    # ------------------------------------------------------------------ metrics
    def write_metrics(self) -> None:
        """Write the buffered metrics now (before a rollback rewinds the steps, and at close)."""
        rows, self.metrics = self.metrics, []
        self.metrics_written_at = time.monotonic()
        if rows:
            self.journal.record_metrics(self.run_id, rows)

    def report(self) -> list[str]:
        """One line per incident of this process, oldest first."""
        lines = []
        for i in self.incidents:
            micro = f", micro-batch {i.micro_batch}" if i.micro_batch is not None else ""
            tensors = f" [{', '.join(i.tensors)}]" if i.tensors else ""
            lines.append(f"step {i.step} (epoch {i.epoch}, batch {i.batch_index}{micro}): {i.kind} -> {i.action}"
                         + tensors)
        return lines


def one_symptom(findings: list[Finding]) -> list[Finding]:
    """The journal rows of one step: its symptom — the first of :data:`SYMPTOM_ORDER` (a NaN loss also makes every
    gradient NaN, a loss spike comes with a gradient spike) — once per micro-batch that had a loss symptom, plus
    each contaminated-state finding, which names its own tensors. Non-finite gradients at finite losses are
    recorded beside micro-batch loss spikes: they tell more than the spike."""
    symptoms = sorted((f for f in findings if f.kind in SYMPTOM_ORDER), key=lambda f: SYMPTOM_ORDER.index(f.kind))
    per_micro: dict[int, Finding] = {}
    for f in symptoms:
        if f.micro_batch is not None:
            per_micro.setdefault(f.micro_batch, f)
    step_level = [f for f in symptoms if f.micro_batch is None]
    chosen = [per_micro[i] for i in sorted(per_micro)]
    if not chosen:
        chosen = step_level[:1]
    elif step_level and all(f.kind is Kind.LOSS_SPIKE for f in chosen) and step_level[0].kind in (
            Kind.NONFINITE_GRAD, Kind.AMP_OVERFLOW):
        chosen.append(step_level[0])
    return chosen + [f for f in findings if f.kind not in SYMPTOM_ORDER]


def plain_ids(sample_ids: Any) -> list[Any] | None:
    """Sample ids as a JSON-friendly list (tensors and numpy arrays become lists of numbers)."""
    if sample_ids is None:
        return None
    if isinstance(sample_ids, Tensor):
        return list(sample_ids.detach().cpu().reshape(-1).tolist())
    if hasattr(sample_ids, "tolist"):
        return list(sample_ids.tolist())
    if isinstance(sample_ids, str | int):
        return [sample_ids]
    return [x if isinstance(x, str | int | float) else str(x) for x in sample_ids]
