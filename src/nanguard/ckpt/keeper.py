"""keeper.py owns keeping a trainer's checkpoints clean on disk, for any framework: audit each checkpoint file or
folder just written, record the verdict, pin a clean copy, put the pinned copy back over a bad one, quarantine
what cannot be put back. It also keeps the guard's own state beside each checkpoint (a JSON sidecar bound to the
checkpoint's sha256), so a resume restores the guard that belongs to exactly those weights.

    keeper = CheckpointKeeper.for_guard(guard, run_dir)       # or CheckpointKeeper(run_dir, journal, run_id, step=...)
    save_guard_state(run_dir, "weights/last.pt", guard.state_dict())   # before keep(): a pin takes it along
    keeper.keep_all([("weights/last.pt", "last"), ("weights/best.pt", "best"), ("weights/epoch3.pt", None)])

Everything lives under ``<run_dir>/.nanguard/``: ``pinned/<role>.pt`` (or ``pinned/<role>/`` for a folder),
``quarantine/<name>``, ``guard_state/<checkpoint stem>.json``. The audit is :func:`nanguard.ckpt.audit`, which
never unpickles with real classes; every copy, move and replacement is atomic (:mod:`nanguard.atomic`).
It imports no framework and no Guard: an adapter hands in the journal, the run id and the step.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, Protocol

from nanguard.atomic import atomic_copy, atomic_copy_tree, atomic_write_bytes, move_over
from nanguard.ckpt.audit import audit
from nanguard.ckpt.base import Status, Verdict
from nanguard.errors import NanguardError
from nanguard.journal import CheckpointRecord, Journal, file_digest
from nanguard.journal.base import JOURNAL_DIR
from nanguard.paths import read_json_file

log = logging.getLogger(__name__)

PINNED_DIR = Path(JOURNAL_DIR) / "pinned"
"""Where clean copies are pinned, under the run folder: ``<role><suffix>`` for a file, ``<role>/`` for a folder."""
QUARANTINE_DIR = Path(JOURNAL_DIR) / "quarantine"
"""Where bad checkpoints are moved, under the run folder, by name (the newest one of each name is kept)."""
GUARD_STATE_DIR = Path(JOURNAL_DIR) / "guard_state"
"""Where the guard's state sidecars live, under the run folder: ``<checkpoint stem>.json``."""
GUARD_STATE_FORMAT = "nanguard-guard-state"
GUARD_STATE_VERSION = 1
MAX_GUARD_STATE_BYTES = 16 << 20
"""The largest sidecar :func:`load_guard_state` reads (a guard's state is a few KB of statistics)."""

Digest = tuple[str, int, float]
"""``(sha256, size, mtime)`` of a file or folder, as :func:`nanguard.journal.file_digest` gives it."""


class GuardLike(Protocol):
    """What :meth:`CheckpointKeeper.for_guard` reads of a guard: its public journal, run id and step count."""

    @property
    def journal(self) -> Journal: ...

    @property
    def run_id(self) -> int: ...

    @property
    def step_count(self) -> int: ...


def checkpoint_record(path: str | Path, verdict: Verdict, digest: Digest | None) -> CheckpointRecord:
    """The journal row for ``verdict`` on ``path`` (hash, size and mtime from ``digest``), error included."""
    sha256, size, mtime = digest if digest is not None else (None, None, None)
    findings: list[dict[str, Any]] = [
        {"location": f.location, "kind": f.kind.value, "count": f.count, "first_index": list(f.first_index),
         "area": f.area.value, "numel": f.numel}
        for f in verdict.findings
    ]
    if verdict.error is not None:
        findings.append({"error": verdict.error})
    return CheckpointRecord(
        path=str(Path(path).resolve()), status=verdict.status.value, sha256=sha256, size=size,
        format=None if verdict.format is None else verdict.format.value,
        epoch=None if verdict.epoch is None else float(verdict.epoch), step=verdict.step,
        findings=findings, mtime=mtime,
    )


class CheckpointKeeper:
    """Audits, pins, puts back and quarantines the checkpoints (files or HF/DCP folders) of one run folder.

    A *role* names a checkpoint that is rewritten under the same name and must always be usable (``last``,
    ``best``): a clean one is pinned, a bad one gets the pinned clean copy back. A checkpoint without a role
    (``epoch3.pt``, ``checkpoint-500/``) is left alone when clean and moved to quarantine when bad.
    "Bad" is every status but clean (dirty, scrubbed marks, unsafe, unreadable); a tainted row in the journal
    is the journal's lineage verdict and does not move files.

    Args:
        run_dir: the run folder; ``.nanguard/`` under it holds the pins, the quarantine and the guard state.
        journal: where verdicts (``checkpoints``) and what was done (``actions``) are recorded.
        run_id: the journal's run the actions belong to.
        step: the step recorded with each action: a number, or a function giving the current one.

    Attributes:
        verdicts: every audit made, in order (an unchanged checkpoint is not audited again).
    """

    def __init__(self, run_dir: str | Path, journal: Journal, run_id: int, *,
                 step: Callable[[], int] | int = 0) -> None:
        self.run_dir = Path(run_dir)
        self.journal = journal
        self.run_id = run_id
        self._step = step
        self.verdicts: list[Verdict] = []
        self._audited: dict[str, Digest] = {}  # resolved path -> digest at its last audit (or put-back)
        self._by_sha: dict[str, Verdict] = {}  # content already judged (trainers write the same bytes twice)
        self._pins: dict[str, str] = {}  # role -> sha256 of its pinned copy

    @classmethod
    def for_guard(cls, guard: GuardLike, run_dir: str | Path) -> CheckpointKeeper:
        """A keeper recording into ``guard``'s journal and run, at ``guard.step_count`` when each action happens."""
        return cls(run_dir, guard.journal, guard.run_id, step=lambda: guard.step_count)

    @property
    def step(self) -> int:
        """The step recorded with the next action."""
        return self._step() if callable(self._step) else self._step

    # ------------------------------------------------------------------ where things go
    def pinned_path(self, path: str | Path, role: str) -> Path:
        """The pinned copy of ``role``: ``pinned/<role><suffix>`` for a file, ``pinned/<role>/`` for a folder."""
        path = Path(path)
        return self.run_dir / PINNED_DIR / (role if path.is_dir() else f"{role}{path.suffix}")

    def quarantine_path(self, path: str | Path) -> Path:
        return self.run_dir / QUARANTINE_DIR / Path(path).name

    # ------------------------------------------------------------------ the audit
    def audit_if_new(self, path: str | Path) -> Verdict | None:
        """Audit ``path`` and record the verdict, unless it is missing or unchanged (same sha256, size and
        mtime) since this keeper last audited or put it back. Content already judged under another name (the
        same bytes as ``last.pt`` in ``best.pt``) reuses that verdict; it is recorded for this path all the same.

        Returns:
            The verdict, or ``None`` when nothing was audited.
        """
        path = Path(path)
        if not (path.is_file() or path.is_dir()):
            return None
        digest = file_digest(path)
        key = str(path.resolve())
        if digest is not None and self._audited.get(key) == digest:
            return None
        known = self._by_sha.get(digest[0]) if digest is not None else None
        verdict = dataclasses.replace(known, path=path) if known is not None else audit(path)
        if digest is not None:
            self._by_sha[digest[0]] = verdict
            self._audited[key] = digest
        self.verdicts.append(verdict)
        self.journal.record_checkpoint(checkpoint_record(path, verdict, digest))
        if verdict.status is not Status.CLEAN:
            log.warning("nanguard: %s is %s after it was written", path, verdict.status.value)
        return verdict

    def keep(self, path: str | Path, role: str | None = None) -> Verdict | None:
        """Audit ``path`` when new (:meth:`audit_if_new`) and act on the verdict: clean and with a role, pin
        it; bad and with a role, put the pinned copy back (the bad one goes to quarantine); bad without a role,
        quarantine it. CLEAN is the content verdict of a readable checkpoint whose pickle calls no code;
        classes outside the load allowlist do not change it.

        Returns:
            The verdict, or ``None`` when ``path`` is missing or unchanged (nothing done).
        """
        verdict = self.audit_if_new(path)
        if verdict is None:
            return None
        if verdict.status is Status.CLEAN:
            if role is not None:
                self.pin(path, role)
        elif role is not None:
            self.put_back(path, role, verdict)
        else:
            self.quarantine(path, verdict)
        return verdict

    def keep_all(self, paths: Iterable[tuple[str | Path, str | None]]) -> list[Verdict]:
        """:meth:`keep` each ``(path, role)`` in order; the verdicts of those audited."""
        verdicts = []
        for path, role in paths:
            verdict = self.keep(path, role)
            if verdict is not None:
                verdicts.append(verdict)
        return verdicts

    # ------------------------------------------------------------------ acting
    def pin(self, path: str | Path, role: str) -> Path:
        """Copy the clean checkpoint ``path`` to its pinned place atomically, with its guard-state sidecar when
        one matches it. When another role's pin holds the same bytes (Ultralytics writes ``best.pt`` as a copy
        of ``last.pt``), the pin is a hard link to that pin: one copy (and fsync) fewer. Safe because pins are
        only ever replaced by rename, never rewritten in place; the trainer's own file is always copied."""
        path = Path(path)
        pinned = self.pinned_path(path, role)
        pinned.parent.mkdir(parents=True, exist_ok=True)
        digest = self._audited.get(str(path.resolve()))
        sha = digest[0] if digest is not None else None
        twin = next((other for other, pin_sha in self._pins.items() if other != role and sha is not None
                     and pin_sha == sha and self.pinned_path(path, other).exists()), None)
        if twin is not None:
            atomic_copy_tree(self.pinned_path(path, twin), pinned, link=True)
        else:
            atomic_copy_tree(path, pinned)
        if sha is not None:
            self._pins[role] = sha
        else:
            self._pins.pop(role, None)
        sidecar = guard_state_path(self.run_dir, path)
        pinned_sidecar = self._pinned_sidecar(role)
        if sha is not None and _sidecar_sha(sidecar) == sha:
            atomic_copy(sidecar, pinned_sidecar)
        elif pinned_sidecar.exists():
            pinned_sidecar.unlink()  # the pin changed and no state belongs to it
        return pinned

    def put_back(self, path: str | Path, role: str, verdict: Verdict) -> bool:
        """Replace the bad checkpoint ``path`` with the pinned clean copy of ``role``, atomically, and keep the
        bad one in quarantine; the pinned guard-state sidecar comes back with it. Without a pin yet the file
        stays and the journal says so (``checkpoint_not_replaced``).

        Returns:
            Whether the pinned copy was put back.
        """
        path = Path(path)
        pinned = self.pinned_path(path, role)
        detail: dict[str, Any] = {"path": str(path), "status": verdict.status.value,
                                  "findings": len(verdict.findings), "epoch": verdict.epoch}
        if not pinned.exists():
            self.journal.record_action(
                self.run_id, step=self.step, action="checkpoint_not_replaced",
                reason=f"{path.name} is {verdict.status.value} and no clean copy is pinned yet", detail=detail)
            return False
        target = self.quarantine_path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        # The bad one is linked into quarantine first, then the pinned copy is renamed over it: at every
        # moment `path` holds either the bad checkpoint or the clean one. A copy, not a link, goes back: the
        # trainer may rewrite `path` in place, which must never reach the pin.
        atomic_copy_tree(path, target, link=True)
        atomic_copy_tree(pinned, path)
        digest = file_digest(path)
        if digest is not None:
            self._audited[str(path.resolve())] = digest
            detail["restored_sha256"] = digest[0]
        detail["restored_from"] = str(pinned)
        detail["quarantined_to"] = str(target)
        pinned_sidecar = self._pinned_sidecar(role)
        if pinned_sidecar.is_file():
            sidecar = guard_state_path(self.run_dir, path)
            sidecar.parent.mkdir(parents=True, exist_ok=True)
            atomic_copy(pinned_sidecar, sidecar)
        else:
            self._quarantine_sidecar(path)
        self.journal.record_action(
            self.run_id, step=self.step, action="checkpoint_replaced",
            reason=f"{path.name} was {verdict.status.value}; put back the pinned clean copy", detail=detail)
        log.warning("nanguard: replaced %s (%s) with the pinned clean copy", path, verdict.status.value)
        return True

    def quarantine(self, path: str | Path, verdict: Verdict) -> Path:
        """Move the bad checkpoint ``path`` (file or folder) to ``.nanguard/quarantine/`` (replacing an older one
        of the same name) and record it (``checkpoint_quarantined``). Returns where it went."""
        path = Path(path)
        target = self.quarantine_path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        move_over(path, target)
        self._quarantine_sidecar(path)
        self._audited.pop(str(path.resolve()), None)
        self.journal.record_action(
            self.run_id, step=self.step, action="checkpoint_quarantined",
            reason=f"{path.name} was {verdict.status.value}",
            detail={"path": str(path), "moved_to": str(target), "status": verdict.status.value,
                    "findings": len(verdict.findings), "epoch": verdict.epoch})
        return target

    def _pinned_sidecar(self, role: str) -> Path:
        return self.run_dir / PINNED_DIR / f"{role}.guard_state.json"

    def _quarantine_sidecar(self, path: Path) -> None:
        """The guard state saved with a bad checkpoint goes with it: what stays in ``guard_state/`` belongs to
        the checkpoint under that name, or is absent."""
        sidecar = guard_state_path(self.run_dir, path)
        if sidecar.is_file():
            move_over(sidecar, self.quarantine_path(path).with_name(f"{path.name}.guard_state.json"))


# ---------------------------------------------------------------------- the guard's state beside a checkpoint
def guard_state_path(run_dir: str | Path, ckpt_path: str | Path) -> Path:
    """``<run_dir>/.nanguard/guard_state/<checkpoint stem>.json`` (``last.pt`` -> ``last.json``,
    ``checkpoint-500/`` -> ``checkpoint-500.json``)."""
    return Path(run_dir) / GUARD_STATE_DIR / f"{Path(ckpt_path).stem}.json"


def save_guard_state(run_dir: str | Path, ckpt_path: str | Path, state: dict[str, Any]) -> Path:
    """Write ``state`` (the guard's ``state_dict()``, JSON values only) beside the checkpoint ``ckpt_path``,
    bound to the checkpoint's current sha256, atomically. Call it after the checkpoint is written and before
    :meth:`CheckpointKeeper.keep`, so a pin of that checkpoint takes its state along. Returns the sidecar.

    Raises:
        ValueError: ``state`` is no dict or holds a value JSON cannot store, or ``ckpt_path`` cannot be read.
    """
    if not isinstance(state, dict):
        raise ValueError(f"guard state must be a dict, got {type(state).__name__}")
    digest = file_digest(ckpt_path)
    if digest is None:
        raise ValueError(f"{ckpt_path}: cannot read the checkpoint to bind the guard state to it")
    document = {"format": GUARD_STATE_FORMAT, "version": GUARD_STATE_VERSION, "checkpoint": Path(ckpt_path).name,
                "sha256": digest[0], "size": digest[1], "state": state}
    try:
        data = json.dumps(document, indent=1, sort_keys=True).encode("utf-8")
    except (TypeError, ValueError) as err:
        raise ValueError(f"guard state for {ckpt_path} is not JSON: {err}") from None
    path = guard_state_path(run_dir, ckpt_path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, data)
    return path


def _read_sidecar(path: Path) -> dict[str, Any]:
    try:
        document = read_json_file(path, MAX_GUARD_STATE_BYTES, "guard state file")
    except NanguardError as err:  # BadPath: not a regular file, too large
        raise ValueError(str(err)) from None
    except (ValueError, UnicodeDecodeError) as err:
        raise ValueError(f"{path}: not a nanguard guard state file ({err})") from None
    if (not isinstance(document, dict) or document.get("format") != GUARD_STATE_FORMAT
            or not isinstance(document.get("sha256"), str) or not isinstance(document.get("state"), dict)):
        raise ValueError(f"{path}: not a nanguard guard state file")
    if document.get("version") != GUARD_STATE_VERSION:
        raise ValueError(f"{path}: guard state version {document.get('version')!r}, this nanguard reads "
                         f"{GUARD_STATE_VERSION}")
    return document


def _sidecar_sha(path: Path) -> str | None:
    """The checkpoint sha256 a sidecar is bound to, or ``None`` when it is missing or unusable."""
    if not path.is_file():
        return None
    try:
        return str(_read_sidecar(path)["sha256"])
    except ValueError:
        return None


def load_guard_state(run_dir: str | Path, ckpt_path: str | Path) -> dict[str, Any] | None:
    """The guard state saved beside the checkpoint ``ckpt_path`` (:func:`save_guard_state`), or ``None`` when
    none was saved.

    Raises:
        ValueError: the checkpoint is not the one the state was saved with (its sha256 differs: it was replaced
            or rewritten since), it cannot be read, or the sidecar is no guard state file.
    """
    path = guard_state_path(run_dir, ckpt_path)
    if not path.exists() and not path.is_symlink():
        return None
    document = _read_sidecar(path)
    digest = file_digest(ckpt_path)
    if digest is None:
        raise ValueError(f"{ckpt_path}: cannot read the checkpoint its guard state {path} was saved with")
    if digest[0] != document["sha256"]:
        raise ValueError(f"{ckpt_path} is not the checkpoint its guard state was saved with (sha256 "
                         f"{digest[0][:12]}, saved with {str(document['sha256'])[:12]}): it was replaced since; "
                         f"resume without the guard state or delete {path}")
    state: dict[str, Any] = document["state"]
    return state


__all__ = [
    "GUARD_STATE_DIR",
    "PINNED_DIR",
    "QUARANTINE_DIR",
    "CheckpointKeeper",
    "GuardLike",
    "checkpoint_record",
    "guard_state_path",
    "load_guard_state",
    "save_guard_state",
]
