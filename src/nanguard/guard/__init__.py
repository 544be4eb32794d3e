"""nanguard.guard is the Guard: check → agree → decide → act → record around the optimizer step of any loop.

A plain loop lets the guard own the optimizer step::

    guard = Guard(model, optimizer, run_dir="out")          # after the optimizer is built
    for epoch in range(epochs):
        for i, (x, y) in enumerate(loader):
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            guard.step(loss, epoch=epoch, batch_index=i)    # replaces optimizer.step(); zero_grad()
    guard.close()                                           # marks the run finished in the journal

A trainer that owns its optimizer step (nanoGPT's loop, Lightning, HF, Ultralytics) calls the two halves around
it: ``verdict = guard.before_optimizer_step(...)`` after backward, before clipping — when the update must not
happen every gradient is ``None`` afterwards, so the trainer's own ``optimizer.step()`` changes nothing — and
``guard.after_optimizer_step(verdict)`` after it. Under gradient accumulation ``guard.backward(loss)`` (or
``guard.observe_loss(loss)`` after the loop's own backward) checks every micro-batch's loss. docs/guard.md has the
adoption of nanoGPT's ``train.py``, its GradScaler and its own clip included.

The package is a set of parts with one job each; the Guard wires them and owns no rule of its own:

- :mod:`~nanguard.guard.state` — the training state (model, optimizer, scaler, schedulers, EMA): gradients, scans,
  buffer save/restore, LR scaling, what a snapshot keeps;
- :mod:`~nanguard.guard.control` — escalation, probation and LR back-off as one state table, and the one decision
  function both engines use;
- :mod:`~nanguard.guard.engine` (eager, one host read) and :mod:`~nanguard.guard.device` (sync-free) — the step
  engines: measure → agree (:mod:`nanguard.distributed`) → decide → act;
- :mod:`~nanguard.guard.recorder` — journal rows and metrics, deciding nothing;
- :mod:`~nanguard.guard.recovery` — snapshots, rollback and resume, returning what it did;
- :mod:`~nanguard.guard.step` — the values that pass between them (``StepVerdict``, ``StepResult``...).
"""

from __future__ import annotations

import logging
import os
import weakref
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from nanguard.checks import Finding, RunningStats, loss_value_check
from nanguard.distributed import Agreement, LocalAgreement
from nanguard.errors import TrainingStopped
from nanguard.guard.control import Controller
from nanguard.guard.device import DeviceEngine
from nanguard.guard.engine import EagerEngine
from nanguard.guard.recorder import Recorder, plain_ids
from nanguard.guard.recovery import Recovery
from nanguard.guard.state import TrainingState
from nanguard.guard.step import Judged, Seen, StepNotKnown, StepResult, StepVerdict
from nanguard.journal import IncidentRecord, Journal
from nanguard.policy import Action, Decision, Policy
from nanguard.runs.lock import guard_lock

if TYPE_CHECKING:
    from nanguard.data import Batch

__all__ = ["Guard", "Seen", "StepNotKnown", "StepResult", "StepVerdict"]

log = logging.getLogger(__name__)

STATE_VERSION = 3
"""The version of :meth:`Guard.state_dict`."""


class Guard:
    """Check → agree → decide → act → record around the optimizer step of one model and one optimizer.

    Args:
        model: the model being trained.
        optimizer: its optimizer; every parameter it holds must belong to ``model``.
        run_dir: the run folder; the journal goes to ``<run_dir>/.nanguard/journal.db``.
        policy: a :class:`Policy`, a path to a policy TOML file, or ``None`` for the policy found in the
            current folder (``nanguard.toml`` or ``[tool.nanguard]`` in ``pyproject.toml``) or the defaults.
        scaler: a ``torch.amp.GradScaler`` when training with fp16 autocast (a disabled one, as nanoGPT builds on
            the CPU and with bf16, counts as none). The guard unscales once per step (not again when the loop
            already did); ``guard.step`` also calls ``step`` and ``update``.
        scheduler: an LR scheduler the guard steps after each applied update.
        loop_scheduler: an LR scheduler the loop steps itself; kept in snapshots so a rollback rewinds it.
        ema: an EMA of the weights the guard updates after each applied update and scans with the state.
        loop_ema: an EMA the loop (or framework) updates itself: scanned and kept in snapshots.
        rank: this process's rank, recorded with each incident (defaults to torch.distributed's rank).
        agreement: how the step's measurements are agreed across processes (default: one process).
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        *,
        run_dir: str | Path,
        policy: Policy | str | Path | None = None,
        scaler: torch.amp.GradScaler | None = None,
        scheduler: Any = None,
        loop_scheduler: Any = None,
        ema: Any = None,
        loop_ema: Any = None,
        rank: int | None = None,
        agreement: Agreement | None = None,
    ) -> None:
        if isinstance(policy, str | Path):
            policy = Policy.from_file(policy)
        self.policy = policy if policy is not None else Policy.discover(Path.cwd())
        self.state = TrainingState(model, optimizer, scaler=scaler, scheduler=scheduler,
                                   loop_scheduler=loop_scheduler, ema=ema, loop_ema=loop_ema)
        self.rank = rank if rank is not None else default_rank()
        self.controller = Controller(self.policy)
        self.agreement = agreement if agreement is not None else LocalAgreement()
        self.eager = EagerEngine(self.state, self.controller, self.agreement)
        self.device: DeviceEngine | None = None
        if self.policy.sync_free:
            self.device = DeviceEngine(self.state, self.controller, self.agreement,
                                       loss_stats=self.eager.loss_stats, grad_stats=self.eager.grad_stats)
        self.step_count = 0
        self.epoch: int | None = None
        self.batch_index: int | None = None
        self.skipped_steps = 0
        self.applied_updates = 0
        dirty = self.state.scan()
        if dirty:
            names = ", ".join(t for f in dirty for t in f.tensors)
            raise ValueError(f"the training state already holds non-finite values before the first step: {names}")
        # A Guard is its run folder's one in-process writer for its life: it writes the journal, disk snapshots and
        # (integrations) the framework's checkpoints. A second Guard on the folder (another process, or one of
        # this process not closed) and `nanguard rollback`/`undo` are refused while it lives, before anything is
        # written. Its own lock, not the run lock, so `nanguard run -- python train.py` (the supervisor holds the
        # run lock) does not refuse its own guarded child; the kernel drops it when the process dies, and close()
        # (or garbage collection of an unclosed Guard) releases it. See nanguard.runs.lock.
        self.folder_lock = guard_lock(run_dir, f"Guard in pid {os.getpid()}")
        weakref.finalize(self, self.folder_lock.release)
        try:
            self.journal = Journal(run_dir)
        except BaseException:
            self.folder_lock.release()
            raise
        self.run_id = self.journal.start_run(policy=self.policy.to_dict(), rank=self.rank,
                                             torch_version=torch.__version__)
        self.recorder = Recorder(self.journal, self.run_id, self.policy, rank=self.rank)
        self.recovery = Recovery(self.policy, run_dir, self.journal, self.run_id)
        self.recovery.snapshot(0, self.state.components(), self.state_dict())
        self.rollback_reason: str | None = None
        self.closed = False
        self.checked_since_last_step = True
        """Whether :meth:`check_state` ran after the last step: an integration's epoch-end check skips a repeat."""
        self.micro: list[tuple[Tensor, Any]] = []
        self.open_verdict: tuple[StepVerdict, EagerEngine | DeviceEngine] | None = None

    # ------------------------------------------------------------------ what the user reads
    @property
    def model(self) -> nn.Module:
        return self.state.model

    @property
    def optimizer(self) -> torch.optim.Optimizer:
        return self.state.optimizer

    @property
    def scaler(self) -> torch.amp.GradScaler | None:
        """The GradScaler the guard unscales with (``None`` when none or a disabled one was given)."""
        return self.state.scaler

    @property
    def ema(self) -> Any:
        """The EMA adapter of ``ema=`` or ``loop_ema=`` (``.module`` is the averaged model), or ``None``."""
        return self.state.any_ema

    @property
    def loss_stats(self) -> RunningStats:
        """The running statistics of the loss the spike detector uses."""
        return self.eager.loss_stats

    @property
    def grad_stats(self) -> RunningStats:
        """The running statistics of the gradient norm the spike detector uses."""
        return self.eager.grad_stats

    @property
    def incidents(self) -> list[IncidentRecord]:
        """This process's incidents, oldest first."""
        return self.recorder.incidents

    def report(self) -> list[str]:
        """One line per incident of this process, oldest first."""
        return self.recorder.report()

    # ------------------------------------------------------------------ the loop's data
    def batches(self, loader: Any, *, epochs: int | None = None) -> Iterator[Batch]:
        """Iterate ``loader`` through the guard, so a rollback can rewind the data exactly::

            for batch in guard.batches(loader, epochs=10):
                x, y = batch.data
                ...
                guard.step(loss)            # epoch, batch index and sample ids come from the batch

        Yields :class:`~nanguard.data.Batch` (``data``, ``epoch``, ``index``, ``sample_ids``) for ``epochs``
        epochs (``None``: until the loop stops). Skipped windows are never loaded. An LR scheduler the loop steps
        must be given as ``loop_scheduler=`` (else ``ValueError``): a replayed batch would step it twice.
        """
        self.state.check_replayable()
        return self.recovery.batches(loader, epochs=epochs)

    def resume(self) -> int | None:
        """Restore the newest clean snapshot on disk (``disk_snapshot_every_steps`` writes them): model,
        optimizer, scheduler, scaler, EMA, RNG streams, the guard's state and the data position. Returns the step
        training continues from, or ``None`` when the run folder has no snapshot (a fresh start). Call it after
        constructing the guard and before iterating ``guard.batches``."""
        found = self.recovery.resume(self.state.components())
        if found is None:
            return None
        step, guard_state = found
        self.state.save_buffers()
        self.load_position(guard_state)
        self.controller.load_state_dict(guard_state["controller"])
        self.recorder.action(step, "resume", "resumed from disk", {"step": step})
        return step

    def request_rollback(self, reason: str = "requested by the user") -> None:
        """Roll back at the next step (a user trigger, e.g. from a validation callback); in the sync-free mode the
        ring is flushed first and that step runs eagerly."""
        self.rollback_reason = reason

    # ------------------------------------------------------------------ micro-batches
    def observe_loss(self, loss: Tensor, *, sample_ids: Any = None) -> None:
        """Check this micro-batch's loss with the step (gradient accumulation: call it once per micro-batch, after
        its backward). No host read here; the step reads every micro-batch's loss at once."""
        self.micro.append((loss_value_check(loss), sample_ids))

    def backward(self, loss: Tensor, *, sample_ids: Any = None) -> None:
        """``loss.backward()`` (scaled by the GradScaler when there is an enabled one) and :meth:`observe_loss`."""
        scaler = self.state.scaler
        (scaler.scale(loss) if scaler is not None else loss).backward()
        self.observe_loss(loss, sample_ids=sample_ids)

    # ------------------------------------------------------------------ the step
    def step(
        self,
        loss: Tensor | None = None,
        *,
        epoch: int | None = None,
        batch_index: int | None = None,
        sample_ids: Any = None,
        loop_step: int | None = None,
    ) -> StepResult:
        """Check this step's loss and gradients, apply, clip or skip the update, and zero the gradients. Call it
        after ``loss.backward()`` (``scaler.scale(loss).backward()`` under AMP), or after :meth:`backward` of every
        micro-batch with no ``loss`` here.

        Args:
            loss: the loss the gradients came from (one element; detached here).
            epoch: the epoch; when it changes the batch index restarts at 0.
            batch_index: the batch's index in the epoch; counted by the guard when left out.
            sample_ids: identifiers of the batch's samples (indices, file names), recorded with incidents.
            loop_step: the loop's own step counter, recorded beside the guard's.
        """
        verdict = self.before_optimizer_step(loss, epoch=epoch, batch_index=batch_index, sample_ids=sample_ids,
                                             loop_step=loop_step)
        if verdict.known and not verdict.apply:
            self.state.clear_scaler_stage()  # a skipped step calls neither scaler.step nor update
        else:
            self.state.optimizer_step(grads_finite=verdict.grad_norm is None or verdict.grad_norm < float("inf"))
        result = self.after_optimizer_step(verdict)
        self.state.optimizer.zero_grad(set_to_none=True)
        return result

    def before_optimizer_step(
        self,
        loss: Tensor | None = None,
        *,
        epoch: int | None = None,
        batch_index: int | None = None,
        sample_ids: Any = None,
        loop_step: int | None = None,
    ) -> StepVerdict:
        """Check, agree and decide this step before the optimizer step: after backward (and the loop's own
        ``scaler.unscale_``, if it makes one), before clipping. When the update must not happen every gradient is
        ``None`` afterwards, so the trainer's own ``optimizer.step()`` (or ``scaler.step``) changes nothing. Hand
        the verdict to :meth:`after_optimizer_step` after the optimizer step. The arguments are :meth:`step`'s;
        ``loss`` may be left out when every micro-batch went through :meth:`backward` or :meth:`observe_loss`."""
        if self.closed:
            raise RuntimeError("the guard is closed")
        if self.open_verdict is not None:
            raise RuntimeError(f"step {self.open_verdict[0].step} is not finished: call "
                               "guard.after_optimizer_step(verdict) after each before_optimizer_step")
        micro, self.micro = self.micro, []
        if loss is not None and micro:
            raise ValueError("the step's loss was passed and its micro-batch losses were observed: do one of them")
        micro_ids: tuple[Any, ...] = ()
        if loss is not None:
            losses = [loss_value_check(loss)]
        elif micro:
            losses, micro_ids = [x for x, _ in micro], tuple(ids for _, ids in micro)
            if sample_ids is None and any(ids is not None for ids in micro_ids):
                sample_ids = [i for ids in micro_ids for i in plain_ids(ids) or []]
        else:
            raise ValueError("no loss for this step: pass it, or call guard.backward(loss) (or "
                             "guard.observe_loss(loss)) for each micro-batch")
        device = self.device
        if self.rollback_reason is not None and device is not None and device.active and device.seen:
            # The requested rollback starts from decided steps; the flush takes no snapshot of its own, or the
            # rollback would go back to the state it was asked to leave.
            self.follow(*device.flush(), flushed=True, act=False)
        current = self.recovery.current
        if current is not None and epoch is None and batch_index is None:
            epoch, batch_index = current.epoch, current.index
            sample_ids = current.sample_ids if sample_ids is None else sample_ids
        self.advance_position(epoch, batch_index)
        self.checked_since_last_step = False
        step = self.step_count
        self.step_count = step + 1  # the next step, unless a rollback rewinds it
        seen = Seen(step, self.epoch, self.batch_index, None, None, sample_ids, loop_step, micro_ids)
        engine: EagerEngine | DeviceEngine = self.eager
        if self.rollback_reason is None and device is not None and device.ready(self.applied_updates):
            engine = device
        reason, self.rollback_reason = self.rollback_reason, None
        verdict = engine.before(seen, losses, rollback_requested=reason)
        self.open_verdict = (verdict, engine)
        return verdict

    def after_optimizer_step(self, verdict: StepVerdict) -> StepResult:
        """Finish the step after the optimizer step: the guard's EMA and scheduler follow an applied update, the
        step is recorded, the controller follows it, and a rollback, a stop or the periodic check happen now."""
        if self.open_verdict is None or self.open_verdict[0] is not verdict:
            raise RuntimeError("after_optimizer_step needs the verdict of this step's before_optimizer_step")
        engine = self.open_verdict[1]
        self.open_verdict = None
        judged, pending = engine.after(verdict)
        late = self.follow(judged, pending, flushed=engine is self.device and bool(judged))
        if not verdict.known:
            return StepResult.pending(verdict.step)
        mine = judged[0]
        if late:  # the periodic check at the end of this step found contaminated state and rolled back
            return StepResult(verdict.step, Action.ROLLBACK, False, verdict.loss, verdict.grad_norm,
                              (*verdict.findings, *late))
        return StepResult(verdict.step, mine.decision.action, mine.applied, verdict.loss, verdict.grad_norm,
                          verdict.findings)

    # ------------------------------------------------------------------ following what was done
    def follow(self, judged: list[Judged], pending: Decision | None, *, flushed: bool,
               act: bool = True) -> list[Finding]:
        """Record the steps now decided and done, let the controller follow them, then (``act``) carry out a
        rollback or stop, or run the periodic check. Returns the findings of a state scan that rolled back."""
        for item in judged:
            decision, step = item.decision, item.seen.step
            escalating = decision.action in (Action.ROLLBACK, Action.STOP)
            as_action = Action.SKIP if flushed and escalating else None  # what the device already did
            self.recorder.step(item, as_action=as_action)
            if (as_action or decision.action) is Action.SKIP:
                self.skipped_steps += 1
            self.applied_updates += item.applied
            if pending is None or item.findings:
                kinds = ", ".join(sorted({f.kind.value for f in item.findings}))
                changes = self.controller.after_step(step, list(item.findings), decision)
                self.recorder.changes(changes, reason=decision.reason or kinds, at_step=step)
        if not judged:
            return []
        last = judged[-1].seen.step
        if not act:
            return []
        if flushed and self.device is not None and self.device.saw_nonfinite:
            # A non-finite value on the device: look at the state, so contaminated weights or moments are named
            # (and rolled back) rather than skipped until the skip window runs out.
            dirty = self.state.scan()
            if dirty:
                self.checked_since_last_step = True
                self.escalate_state(last, dirty)
                return dirty
        if pending is not None:
            self.roll_back_or_stop(last, pending)
            return []
        if flushed or (last + 1) % self.policy.check_every_steps == 0:
            return self.check_state(last)
        return []

    def check_state(self, step: int | None = None) -> list[Finding]:
        """The periodic check at the end of ``step`` (default: the last step): scan weights, buffers, EMA and
        optimizer state; keep a snapshot when clean, roll back (or stop) when not. Returns what the scan found."""
        device = self.device
        if device is not None and device.seen:
            return self.follow(*device.flush(), flushed=True)  # ends with this check
        step = max(self.step_count - 1, 0) if step is None else step
        dirty = self.state.scan()
        self.checked_since_last_step = True  # clean now, or about to be rolled back to a clean snapshot
        if not dirty:
            self.recovery.snapshot(step + 1, self.state.components(), self.state_dict())
            self.controller.clean_check()
            return []
        self.escalate_state(step, dirty)
        return dirty

    def scan_state(self) -> list[Finding]:
        """Look for non-finite values in weights and buffers, the EMA and the optimizer state; one finding per
        place that has any, naming the tensors. Reads flags on the host (one sync)."""
        return self.state.scan()

    def escalate_state(self, step: int, dirty: list[Finding]) -> None:
        decision = self.controller.decide(dirty, step=step)
        for finding in dirty:
            self.recorder.incident(finding, step=step, action=decision.action.value, epoch=self.epoch,
                                   batch_index=self.batch_index)
        self.roll_back_or_stop(step, decision)

    def roll_back_or_stop(self, step: int, decision: Decision) -> None:
        self.recorder.write_metrics()  # the curve up to the rollback is on disk before the steps are rewound
        state = self.state
        state.clear_scaler_stage()
        state.drop_grads()
        if decision.action is Action.STOP:
            self.recorder.action(step, "stop", decision.reason, {})
            self.controller.stopped(step)
            clean = self.recovery.restore_newest(state.components())
            state.save_buffers()
            self.close(status="stopped")
            raise TrainingStopped(f"nanguard stopped training at step {step}: {decision.reason} (the model and "
                                  f"optimizer hold the clean state of step {clean.step})", self.report())
        first = self.controller.first_symptom_step
        faulted = [(i.step, i.epoch, i.batch_index) for i in self.incidents
                   if i.epoch is not None and i.batch_index is not None]
        done = self.recovery.rollback(step, state.components(), first_symptom=first, level=self.controller.level,
                                      faulted=faulted)
        state.save_buffers()
        self.load_position(done.guard_state)
        self.controller.rolled_back(incident_step=step, to_step=done.to_step)
        detail = done.detail | {"lr_factor": self.controller.factor,
                                "probation_until": self.controller.probation_until}
        self.recorder.action(step, "rollback", decision.reason, detail)
        self.journal.next_attempt(self.run_id)

    # ------------------------------------------------------------------ position and state
    def advance_position(self, epoch: int | None, batch_index: int | None) -> None:
        if epoch is not None and epoch != self.epoch:
            self.epoch = epoch
            self.batch_index = None
        if batch_index is not None:
            self.batch_index = batch_index
        else:
            self.batch_index = 0 if self.batch_index is None else self.batch_index + 1

    def state_dict(self) -> dict[str, Any]:
        """The guard's own state (position, statistics, escalation, probation, LR back-off): plain values that
        JSON can hold; not the model's."""
        if self.device is not None:
            self.device.sync_stats()
        return {"version": STATE_VERSION, "step": self.step_count, "epoch": self.epoch,
                "batch_index": self.batch_index, "skipped_steps": self.skipped_steps,
                **self.eager.stats_state(), "controller": self.controller.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Load :meth:`state_dict` (resuming a run that saved it with its checkpoint). The snapshots in memory
        are replaced by the current state, so a rollback never goes back to before the load."""
        self.load_position(state)
        self.controller.load_state_dict(state["controller"])
        self.recovery.rebase(self.step_count, self.state.components(), self.state_dict())

    def load_position(self, state: dict[str, Any]) -> None:
        """Load where training is and the statistics (what a rollback restores; not the controller's history,
        which is what the rollback learned)."""
        if not isinstance(state, dict) or state.get("version") != STATE_VERSION:
            version = state.get("version") if isinstance(state, dict) else None
            raise ValueError(f"Guard.load_state_dict: unknown state version {version!r}")
        self.step_count, self.epoch, self.batch_index = int(state["step"]), state["epoch"], state["batch_index"]
        self.skipped_steps = int(state["skipped_steps"])
        self.eager.load_stats_state(state)
        if self.device is not None:
            self.device.load_stats()
            self.device.live = None

    # ------------------------------------------------------------------ lifecycle
    def flush(self) -> list[IncidentRecord]:
        """Sync-free mode: read the device flags of the steps since the last flush and record their incidents now
        (one host sync). In the eager mode incidents are already recorded; returns []."""
        if self.device is None or not self.device.seen:
            return []
        before = len(self.incidents)
        self.follow(*self.device.flush(), flushed=True)
        return self.incidents[before:]

    def close(self, status: str = "finished") -> None:
        """Finish: flush, check the state one last time, mark the run ended in the journal and close it.

        A training that ends with contaminated state (a fault after the last periodic check, or a sync-free
        rollback that the final flush found) is not rolled back — nothing would be replayed — but ends
        ``dirty``: the incidents are recorded, the model and optimizer are left at the newest clean snapshot, and a
        warning says so. Idempotent."""
        if self.closed:
            return
        if status == "finished":
            status = self.final_check()
        self.closed = True
        self.recorder.write_metrics()
        self.journal.end_run(self.run_id, status)
        self.journal.close()
        self.folder_lock.release()

    def final_check(self) -> str:
        pending = None
        last = max(self.step_count - 1, 0)
        if self.device is not None and self.device.seen:
            judged, pending = self.device.flush()
            self.follow(judged, pending, flushed=True, act=False)
        dirty = self.state.scan()
        if pending is None and not dirty:
            return "finished"
        for finding in dirty:
            self.recorder.incident(finding, step=last, action="restore", epoch=self.epoch,
                                   batch_index=self.batch_index)
        clean = self.recovery.restore_newest(self.state.components())
        self.state.save_buffers()
        why = pending.reason if pending is not None else "non-finite values in " + ", ".join(
            t for f in dirty for t in f.tensors)
        self.recorder.action(last, "restore", why, {"to_step": clean.step, "at_close": True})
        log.warning("nanguard: training ended with contaminated state (%s); the model and optimizer were put back to "
                    "the clean state of step %d, and the run is marked dirty", why, clean.step)
        return "dirty"

    def __enter__(self) -> Guard:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        self.close("finished" if exc_type is None else "crashed")


def default_rank() -> int:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank()
    return 0
