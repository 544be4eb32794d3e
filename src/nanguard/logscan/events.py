"""events.py owns the values a log scan gives back: :class:`LogEvent` (one parsed frame or line),
:class:`EpochIncidents` and :class:`ScanResult` (what a whole scan found), and :class:`LogScanError`.

It parses nothing; ``lines.py`` makes events and ``scanner.py`` folds them into a result. Epochs and batches
are 0-based everywhere here, as the journal stores them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from nanguard.errors import NanguardError

FORMATS = ("auto", "ultralytics", "results-csv", "generic", "jsonl")
"""The values of ``fmt`` / ``--format``; ``auto`` detects the format from the name and the content."""

MAX_TEXT_CHARS = 400
"""Longest ``text`` an event keeps (a redraw glued to other output can be long); the rest is cut with "…"."""

MAX_RECOVERIES = 1000
"""Recovery/warning lines a result lists one by one (all of them are counted)."""


class LogScanError(NanguardError):
    """A log cannot be scanned: missing, unreadable, binary, or a bad ``--pattern``/``--format``.

    The message names the file (or the pattern) and the reason; the CLI prints it as one line, exit 2.
    """


def _json_float(value: float) -> float | str:
    return value if math.isfinite(value) else str(value)  # "nan", "inf", "-inf": JSON has no NaN


@dataclass(frozen=True, slots=True)
class LogEvent:
    """One frame or line of a log that told something.

    Attributes:
        kind: ``"progress"`` (an Ultralytics training progress frame), ``"header"`` (its column header),
            ``"nonfinite"`` (a generic, JSON or results.csv line with NaN/Inf), ``"metrics"`` (a JSON line or
            results.csv row without NaN/Inf), ``"recovery"`` (Ultralytics' own NaN recovery line, or torch's
            non-finite clip warning), ``"warning"`` (AMP check failure, OOM retry), ``"boundary"`` (training
            started / resumed / completed), ``"match"`` (a line matching the user's ``pattern``).
        nonfinite: whether the frame or line shows a NaN/Inf value (a loss, for progress frames).
        epoch: 0-based epoch index (Ultralytics prints ``1/3`` for epoch 0); None when unknown.
        batch: 0-based index of the last batch the frame covers; None when unknown.
        batches: batches per epoch, from ``n/total``; None when unknown.
        epochs: total epochs; None when unknown.
        step: global optimizer step (JSON lines' ``step``/``global_step``); None when unknown.
        losses: the numbers the frame or line shows by name (loss columns for progress frames; every numeric
            key for JSON lines; ``key=value`` pairs for generic lines); the non-finite ones as float nan/inf.
        text: the frame or line, ANSI codes removed (cut at :data:`MAX_TEXT_CHARS`).
        detail: what a recovery/warning/boundary line says (``"nan_recovery"``, ``"resume"``, ...), the
            source of a nonfinite line (``"generic"``, ``"json"``, ``"csv"``), or None.
        offset: byte offset of the frame or line in the stream (UTF-8 bytes for :meth:`LogScanner.feed`).
    """

    kind: str
    nonfinite: bool
    epoch: int | None = None
    batch: int | None = None
    batches: int | None = None
    epochs: int | None = None
    step: int | None = None
    losses: dict[str, float] = field(default_factory=dict)
    text: str = ""
    detail: str | None = None
    offset: int = 0

    @property
    def is_incident(self) -> bool:
        """Whether this event counts as an incident (non-finite values, a recovery line, a pattern match)."""
        return self.nonfinite or self.kind in ("recovery", "match")

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe dict (non-finite losses as the strings ``"nan"``, ``"inf"``, ``"-inf"``)."""
        return {
            "kind": self.kind, "nonfinite": self.nonfinite, "epoch": self.epoch, "batch": self.batch,
            "batches": self.batches, "epochs": self.epochs, "step": self.step,
            "losses": {k: _json_float(v) for k, v in self.losses.items()}, "text": self.text,
            "detail": self.detail, "offset": self.offset,
        }


@dataclass(slots=True)
class EpochIncidents:
    """What one epoch's frames and lines showed (``epoch`` None: lines that name no epoch).

    Attributes:
        epoch: 0-based epoch index.
        first_batch: lowest 0-based batch index whose frame showed a non-finite loss (Ultralytics losses are
            running epoch means, so that is where the first NaN batch was); None when no frame places it.
        first_step: lowest global step of a non-finite JSON line of this epoch, when lines carry steps.
        nonfinite_frames: progress frames with a non-finite loss (every redraw after the first NaN counts).
        nonfinite_lines: generic, JSON or results.csv lines with NaN/Inf.
        recovery_lines: Ultralytics recovery lines (and torch's non-finite clip warning).
        pattern_lines: lines matching the user's ``pattern``.
        nonfinite_losses: names of the values that were non-finite, in the order first seen.
        first_text: the text of this epoch's first incident.
    """

    epoch: int | None
    first_batch: int | None = None
    first_step: int | None = None
    nonfinite_frames: int = 0
    nonfinite_lines: int = 0
    recovery_lines: int = 0
    pattern_lines: int = 0
    nonfinite_losses: list[str] = field(default_factory=list)
    first_text: str = ""

    @property
    def incidents(self) -> int:
        return self.nonfinite_frames + self.nonfinite_lines + self.recovery_lines + self.pattern_lines

    def to_dict(self) -> dict[str, Any]:
        return {
            "epoch": self.epoch, "first_batch": self.first_batch, "first_step": self.first_step,
            "nonfinite_frames": self.nonfinite_frames, "nonfinite_lines": self.nonfinite_lines,
            "recovery_lines": self.recovery_lines, "pattern_lines": self.pattern_lines,
            "incidents": self.incidents, "nonfinite_losses": list(self.nonfinite_losses),
            "first_text": self.first_text,
        }


@dataclass(slots=True)
class ScanResult:
    """Everything one scan found.

    Attributes:
        source: the file name or the stream's label.
        format: the format read: ``"ultralytics"``, ``"results-csv"``, ``"jsonl"`` or ``"generic"``.
        epochs: incidents per epoch, keyed by 0-based epoch (``None``: incidents that name no epoch).
        position: the last progress seen: ``epoch``, ``epochs``, ``batch``, ``batches``, ``step`` (0-based).
        loss_names: loss column names from the last Ultralytics header (or results.csv ``train/`` columns).
        recoveries: recovery and warning lines (``kind``, ``detail``, ``epoch``, ``text``), the first
            :data:`MAX_RECOVERIES`.
        warning_lines: AMP-check and OOM-retry lines (not incidents).
        resumes: "Resuming training" lines.
        bytes_scanned: bytes read.
    """

    source: str
    format: str
    epochs: dict[int | None, EpochIncidents] = field(default_factory=dict)
    position: dict[str, int | None] | None = None
    loss_names: list[str] = field(default_factory=list)
    recoveries: list[dict[str, Any]] = field(default_factory=list)
    warning_lines: int = 0
    resumes: int = 0
    bytes_scanned: int = 0

    def incident_epochs(self) -> list[EpochIncidents]:
        """Per-epoch entries with at least one incident, by epoch (the ``None`` entry last)."""
        rows = [row for row in self.epochs.values() if row.incidents]
        return sorted(rows, key=lambda row: (row.epoch is None, row.epoch or 0))

    @property
    def epochs_affected(self) -> list[int]:
        """0-based epochs with at least one incident."""
        return [row.epoch for row in self.incident_epochs() if row.epoch is not None]

    def _total(self, name: str) -> int:
        return sum(getattr(row, name) for row in self.epochs.values())

    @property
    def nonfinite_frames(self) -> int:
        return self._total("nonfinite_frames")

    @property
    def nonfinite_lines(self) -> int:
        return self._total("nonfinite_lines")

    @property
    def recovery_lines(self) -> int:
        return self._total("recovery_lines")

    @property
    def pattern_lines(self) -> int:
        return self._total("pattern_lines")

    @property
    def incidents(self) -> int:
        """Non-finite frames + non-finite lines + recovery lines + pattern matches."""
        return self._total("incidents")

    @property
    def found(self) -> bool:
        """Whether the scan found any incident (the CLI then exits 1, like ``grep`` finding a match)."""
        return self.incidents > 0

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe dict: epochs 0-based (``epoch_base`` says so), totals, position, recoveries."""
        return {
            "source": self.source,
            "format": self.format,
            "epoch_base": 0,
            "found": self.found,
            "epochs_affected": self.epochs_affected,
            "incidents": [row.to_dict() for row in self.incident_epochs()],
            "totals": {
                "incidents": self.incidents, "nonfinite_frames": self.nonfinite_frames,
                "nonfinite_lines": self.nonfinite_lines, "recovery_lines": self.recovery_lines,
                "pattern_lines": self.pattern_lines, "warning_lines": self.warning_lines,
                "resumes": self.resumes,
            },
            "position": None if self.position is None else dict(self.position),
            "loss_names": list(self.loss_names),
            "recoveries": [dict(item) for item in self.recoveries],
            "bytes_scanned": self.bytes_scanned,
        }
