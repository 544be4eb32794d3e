"""candidates.py owns what the rollback planner knows about one checkpoint of a run: :class:`Candidate`, and
:func:`examine`, which audits a file without running code from it and says whether it can be resumed
(``problem``) and whether it is safe to resume without ``force`` (``concern``).

A concern can also come from the journal: :func:`journal_taints` lists the files whose latest
``audit --record`` row is tainted and still describes the file on disk. It does not pick the target or change
anything on disk: :mod:`~nanguard.runs.ultralytics_disk` does.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nanguard.errors import ExitCode
from nanguard.journal import journal_path, read_checkpoints
from nanguard.runs.base import RollbackRefused, as_int

STRIPPED_REASON = (
    "was stripped by Ultralytics after the final epoch (no optimizer state); it cannot be resumed"
)


@dataclass(frozen=True)
class Candidate:
    """One checkpoint of the run as the planner saw it.

    Attributes:
        path: the file.
        status: the audit status: clean, dirty, unsafe or unreadable.
        epoch: the 0-based epoch it records (``-1`` once stripped), if any.
        problem: why it cannot be resumed at all (stripped, no optimizer state, final epoch...), else None.
        concern: why it is not safe to resume without ``force`` (dirty, unsafe, tainted), else None.
        fitness: its best fitness, if recorded.
    """

    path: Path
    status: str
    epoch: int | None
    problem: str | None
    concern: str | None
    fitness: float | None = None
    concern_code: ExitCode = ExitCode.OK

    @property
    def usable(self) -> bool:
        """Resumable and clean: what ``latest-clean`` may pick."""
        return self.problem is None and self.concern is None

    def to_dict(self) -> dict[str, Any]:
        return {
            "path": str(self.path), "status": self.status, "epoch": self.epoch, "fitness": self.fitness,
            "usable": self.usable, "problem": self.problem, "concern": self.concern,
        }


def examine(path: Path, taints: dict[str, str]) -> tuple[Candidate, Any]:
    """Audit one file without running code from it; returns the candidate and its inert root (or {})."""
    from nanguard.ckpt import Format, audit_tree, read_checkpoint
    from nanguard.errors import UnreadableCheckpoint

    try:
        tree = read_checkpoint(path)
    except UnreadableCheckpoint as err:
        return Candidate(path, "unreadable", None, f"is unreadable ({_strip_path(str(err), path)})", None), {}
    verdict = audit_tree(tree)
    root = tree.root if isinstance(tree.root, dict) else {}
    epoch = verdict.epoch if isinstance(verdict.epoch, int) else None
    train_args = train_args_of(root)
    epochs = as_int(train_args.get("epochs"))
    problem: str | None = None
    if tree.format is not Format.ULTRALYTICS:
        problem = f"is not an Ultralytics training checkpoint (format {tree.format.value})"
    elif epoch is None:
        problem = "records no epoch; it cannot be resumed"
    elif epoch < 0:
        problem = STRIPPED_REASON
    elif root.get("optimizer") is None:
        problem = "holds no optimizer state; it cannot be resumed"
    elif epochs is not None and epoch + 1 >= epochs:
        problem = (f"is from the final epoch (index {epoch} of {epochs}); Ultralytics has nothing to resume "
                   "from it")
    concern: str | None = None
    code = ExitCode.OK
    if verdict.status.value == "unsafe":
        concern, code = "is unsafe, its pickle calls code: " + ", ".join(verdict.unsafe_globals[:5]), ExitCode.UNSAFE
    elif verdict.unlisted_globals:  # a resume imports them: not picked by latest-clean; --to needs --trust
        concern, code = ("names classes outside the load allowlist: " + ", ".join(verdict.unlisted_globals[:5]),
                         ExitCode.UNSAFE)
    elif verdict.status.value == "dirty":
        shown = "; ".join(str(finding) for finding in verdict.findings[:3])
        more = len(verdict.findings) - 3
        concern, code = f"is dirty: {shown}" + (f"; … +{more} more" if more > 0 else ""), ExitCode.DIRTY
    elif str(path.resolve()) in taints:
        concern, code = f"is tainted in the journal ({taints[str(path.resolve())]})", ExitCode.DIRTY
    fitness = verdict.fitness if verdict.fitness is None or math.isfinite(verdict.fitness) else None
    return Candidate(path, verdict.status.value, epoch, problem, concern, fitness, code), root

def require_resumable(path: Path, trust: bool) -> None:
    """Refuse a rollback target Ultralytics could not load safely (:func:`nanguard.ckpt.require_loadable`):
    one that calls code, or names classes outside the load allowlist, unless ``trust``; ``force`` does not
    override this. Raises :class:`RollbackRefused` with exit code UNSAFE (or BAD_INPUT when unreadable)."""
    from nanguard.ckpt import require_loadable
    from nanguard.errors import UnreadableCheckpoint, UnsafeCheckpoint

    try:
        require_loadable(path, trust)
    except UnsafeCheckpoint as err:
        raise RollbackRefused(str(err), ExitCode.UNSAFE) from None
    except UnreadableCheckpoint as err:
        raise RollbackRefused(str(err), ExitCode.BAD_INPUT) from None


def journal_taints(run: Path) -> dict[str, str]:
    """Resolved path → taint reason, for files whose latest ``audit --record`` row is tainted and still
    describes the file on disk (same size and mtime). Empty without a journal."""
    if not journal_path(run).is_file():
        return {}
    latest: dict[str, dict[str, Any]] = {}
    for row in read_checkpoints(run):
        latest[row["path"]] = row
    taints: dict[str, str] = {}
    for path, row in latest.items():
        if not row["tainted"]:
            continue
        try:
            stat = Path(path).stat()
        except OSError:
            continue
        if row["size"] in (None, stat.st_size) and (row["mtime"] is None or abs(row["mtime"] - stat.st_mtime) < 1e-3):
            taints[path] = row["taint_reason"] or "tainted"
    return taints


def train_args_of(root: Any) -> dict[str, Any]:
    """The ``train_args`` dict of a checkpoint's root, or {} when it has none."""
    args = root.get("train_args") if isinstance(root, dict) else None
    return args if isinstance(args, dict) else {}


def _strip_path(message: str, path: Path) -> str:
    return " ".join(message.removeprefix(f"{path}: ").splitlines())

