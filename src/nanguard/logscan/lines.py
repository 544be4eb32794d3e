"""lines.py owns the reading of one frame or line: Ultralytics progress frames, headers and recovery lines,
JSON/dict metric lines (HF Trainer, Lightning), generic ``loss=nan`` lines, results.csv rows, a user pattern.

A *piece* is the text between two line breaks or carriage returns, ANSI codes already removed (``scanner.py``
splits the stream and strips them). :class:`PieceParser` turns one piece into at most one
:class:`~nanguard.logscan.events.LogEvent`; it keeps only what later pieces need to be read (the loss names of
the last header, the epoch being trained, the results.csv columns). It never reads files and never folds
events into results.
"""

from __future__ import annotations

import math
import re

from nanguard.logscan.events import FORMATS, MAX_TEXT_CHARS, LogEvent, LogScanError

NUM = r"[-+]?(?:\d+(?:\.\d*)?(?:[eE][-+]?\d+)?|\.\d+(?:[eE][-+]?\d+)?|nan|inf)"
"""A number as Ultralytics prints it with ``%11.4g``: NaN as ``nan``, Inf as ``inf``."""

# reference/ultralytics.md §10.1-10.2: "%11s"*2 + "%11.4g"*(2+n) then ": pct% bar n/total ...". The numbers
# group holds the n losses, Instances and Size; both the custom bar (━━──) and tqdm's |██| hold no digits.
FRAME = re.compile(rf"\s*(\d+)/(\d+)\s+\d+(?:\.\d*)?(?:e[-+]?\d+)?G\s+((?:{NUM}\s+)*{NUM})\s*:\s+(\d+)%\D*?(\d+)/(\d+)")
# A word, not part of a name or a path: "loss=nan", "-inf", "NaN/Inf", but not "/runs/nan/", "nan.pt", "info".
NONFINITE_WORD = re.compile(
    r"(?<![\w./\\])[-+]?(?:nan|inf(?:inity)?)(?!\w|\.\w|[/\\](?![-+]?(?:nan|inf)))", re.IGNORECASE
)
# Linear on any line: a key starts only where a run of name characters starts (its first letter, after any
# digits, dots, slashes or dashes), and the possessive quantifiers never give back what they took. Without
# them, each letter of a long word was a new start that read the word to its end again: quadratic.
_KEY_VALUE = re.compile(
    r"(?<![\w./-])[\d./-]*+([A-Za-z_][\w./-]*+)\s*+[=:]\s*+([-+]?(?:nan|inf(?:inity)?|\d+(?:\.\d*)?(?:[eE][-+]?\d+)?|\.\d+(?:[eE][-+]?\d+)?))"
    r"(?![\w.])",
    re.IGNORECASE,
)
# JSON (NaN, Infinity: what Python's json writes) and Python dict reprs (nan, inf: HF Trainer's console lines).
_DICT_ITEM = re.compile(
    r"""["']([^"']+)["']\s*:\s*([-+]?(?:NaN|nan|Infinity|inf|\d+(?:\.\d*)?(?:[eE][-+]?\d+)?|\.\d+(?:[eE][-+]?\d+)?))"""
    r"(?=\s*[,}\]])"
)
# Possessive: two \s* around an optional [=:] could otherwise split a long run of spaces every way (quadratic).
_GENERIC_EPOCH = re.compile(r"\bepoch\b\s*+[=:]?+\s*+(\d+)(?:\s*+/\s*+(\d+))?", re.IGNORECASE)
_GENERIC_STEP = re.compile(r"\b(?:global_step|step|iter(?:ation)?)\b\s*+[=:]?+\s*+(\d+)", re.IGNORECASE)
_CSV_HEADER = re.compile(r"\s*epoch\s*,", re.IGNORECASE)

# (kind, detail, pattern); reference/ultralytics.md §10.4. Warnings and boundaries are read only in logs that
# look like Ultralytics' (their words are too common elsewhere); the recovery lines always.
_RECOVERY = [
    ("recovery", "nan_recovery", re.compile(r"Loss NaN/Inf detected \(attempt \d+/\d+\), recovering")),
    ("recovery", "recovery_failed", re.compile(r"NaN/Inf detected but can ?not recover")),
    ("recovery", "nan_persisted", re.compile(r"NaN persisted for \d+ epochs")),
    ("recovery", "corrupt_checkpoint", re.compile(r"corrupted with NaN/Inf weights")),
    ("recovery", "no_recovery_checkpoint", re.compile(r"no valid last\.pt is available for recovery")),
    ("recovery", "ema_save_skipped", re.compile(r"Skipping checkpoint save at epoch \d+: EMA")),
    ("recovery", "nonfinite_forward", re.compile(r"Non-finite forward pass")),
    ("recovery", "nonfinite_grads", re.compile(r"Non-finite gradients, skipping optimizer")),
    ("recovery", "clip_grad_nonfinite", re.compile(r"Non-finite norm encountered in torch\.nn\.utils\.clip_grad")),
]
_RECOVERY_KEYS = ("NaN", "Non-finite")
_ULTRALYTICS_LINES = [
    ("warning", "amp_check_failed", re.compile(r"AMP: checks failed")),
    ("warning", "oom_retry", re.compile(r"out of memory with batch=\d+\. Reducing")),
    # "[^\n]{0,4096}?": a path of at most PATH_MAX; unbounded, each "Resuming training" read the line to its end
    ("boundary", "resume", re.compile(r"Resuming training [^\n]{0,4096}? from epoch (\d+) to (\d+) total epochs")),
    ("boundary", "start", re.compile(r"Starting training for (\d+) epochs")),
    ("boundary", "end", re.compile(r"(?<!\d)(\d++) epochs completed in")),  # one start per run of digits
]
_ULTRALYTICS_KEYS = ("AMP: checks", "out of memory", "Resuming training", "Starting training", "epochs completed")
_EPOCH_KEYS = ("epoch",)
_STEP_KEYS = ("step", "global_step", "trainer/global_step")
_BATCH_KEYS = ("batch_idx", "batch")


def header_losses(text: str) -> list[str] | None:
    """The loss names of an Ultralytics column header (``Epoch GPU_mem box_loss ... Instances Size``), else None.

    reference/ultralytics.md §10.2. Read by splitting on whitespace (a lazy regex over the names retried at every
    space of a long run of spaces: quadratic)."""
    if "GPU_mem" not in text:
        return None
    words = text.split()
    if len(words) < 5 or words[:2] != ["Epoch", "GPU_mem"] or words[-2:] != ["Instances", "Size"]:
        return None
    return words[2:-2]


def _float(text: str) -> float:
    # float() reads "nan", "NaN", "inf", "Infinity" in any case, the words every format here uses
    return float(text)


def _clip(text: str) -> str:
    text = text.strip()
    return text if len(text) <= MAX_TEXT_CHARS else text[: MAX_TEXT_CHARS - 1] + "…"


class PieceParser:
    """Reads pieces of one stream in order.

    Args:
        fmt: one of :data:`~nanguard.logscan.events.FORMATS`. ``auto`` reads every kind of line (a results.csv
            header as the first line switches to results.csv); a named format reads only its own lines.
        pattern: a regular expression; a piece it matches (``re.search``) and that is nothing else is a
            ``"match"`` event. Named groups ``epoch`` (0-based), ``batch``, ``step`` place it.
    """

    def __init__(self, fmt: str = "auto", pattern: str | None = None) -> None:
        if fmt not in FORMATS:
            raise LogScanError(f"unknown log format {fmt!r}; expected one of {', '.join(FORMATS)}")
        try:
            self.pattern = re.compile(pattern) if pattern is not None else None
        except re.error as err:
            raise LogScanError(f"bad --pattern {pattern!r}: {err}") from None
        self.fmt = fmt
        self.csv_columns: list[str] | None = None
        self.csv_mode = fmt == "results-csv"
        self.undecided = fmt == "auto"  # until the first non-empty piece: a results.csv header or not
        self.ultralytics = fmt == "ultralytics"  # Ultralytics evidence: forced, a banner, a header or a frame
        self.saw_json = False
        self.loss_names: list[str] = []
        self.epoch: int | None = None  # the epoch being trained, to place lines that name none

    @property
    def format(self) -> str:
        """The format this stream was read as."""
        if self.fmt != "auto":
            return self.fmt
        if self.csv_mode:
            return "results-csv"
        if self.ultralytics:
            return "ultralytics"
        return "jsonl" if self.saw_json else "generic"

    def parse(self, text: str, offset: int) -> LogEvent | None:
        if not text or text.isspace():
            return None
        if self.undecided:
            self.undecided = False
            if _CSV_HEADER.match(text) and "GPU_mem" not in text:
                self.csv_mode = True
        if self.csv_mode:
            return self._csv_row(text, offset)
        fmt = self.fmt
        if fmt in ("auto", "ultralytics"):
            event = self._ultralytics(text, offset)
            if event is not None:
                return event
        if fmt in ("auto", "generic"):
            event = self._recovery(text, offset)
            if event is not None:
                return event
        if fmt in ("auto", "jsonl") and text.lstrip().startswith("{"):
            event = self._dict_line(text, offset)
            if event is not None:
                return event
        if fmt in ("auto", "generic") and NONFINITE_WORD.search(text):
            return self._generic(text, offset)
        if self.pattern is not None:
            return self._match(text, offset)
        return None

    def is_position(self, text: str) -> bool:
        """Whether :meth:`parse` would read ``text`` as a progress frame or a dict line (changing nothing)."""
        if self.csv_mode:
            return False
        if self.fmt in ("auto", "ultralytics"):
            frame = FRAME.match(text)
            if frame is not None and len(frame.group(3).split()) >= 3:
                return True
        return self.fmt in ("auto", "jsonl") and text.lstrip().startswith("{") and _DICT_ITEM.search(text) is not None

    def frame_state(self, text: str) -> tuple[int, bool] | None:
        """(0-based epoch, non-finite) of a progress frame, None for anything else (changing nothing)."""
        if self.csv_mode or self.fmt not in ("auto", "ultralytics"):
            return None
        frame = FRAME.match(text)
        if frame is None:
            return None
        numbers = frame.group(3).split()
        if len(numbers) < 3:
            return None
        return int(frame.group(1)) - 1, not all(math.isfinite(_float(v)) for v in numbers[:-2])

    # ------------------------------------------------------------------ Ultralytics
    def _ultralytics(self, text: str, offset: int) -> LogEvent | None:
        frame = FRAME.match(text)
        if frame is not None:
            return self._frame(frame, text, offset)
        header = header_losses(text)
        if header is not None:
            self.ultralytics = True
            self.loss_names = header
            return LogEvent("header", False, epoch=self.epoch, text=_clip(text), offset=offset)
        if "Ultralytics " in text:
            self.ultralytics = True
        if self.fmt == "ultralytics":
            event = self._recovery(text, offset)
            if event is not None:
                return event
        if self.ultralytics and any(key in text for key in _ULTRALYTICS_KEYS):
            for kind, detail, regex in _ULTRALYTICS_LINES:
                found = regex.search(text)
                if found is not None:
                    return self._ultralytics_line(kind, detail, found, text, offset)
        return None

    def _frame(self, frame: re.Match[str], text: str, offset: int) -> LogEvent | None:
        numbers = frame.group(3).split()
        if len(numbers) < 3:  # at least one loss, Instances and Size
            return None
        self.ultralytics = True
        values = [_float(v) for v in numbers[:-2]]
        names = self.loss_names if len(self.loss_names) == len(values) else [f"loss{i}" for i in range(len(values))]
        epoch, epochs = int(frame.group(1)) - 1, int(frame.group(2))
        n, total = int(frame.group(5)), int(frame.group(6))
        # Ultralytics sets the description after a batch's step and before the bar counts that batch, so a
        # frame drawn then shows n = the batch index it covers (0/4 already shows batch 0); the final frame
        # (n == total) is drawn by the bar's update/close and covers the last batch.
        batch = min(n, total - 1) if total > 0 else None
        self.epoch = epoch
        losses = dict(zip(names, values, strict=True))
        nonfinite = not all(map(math.isfinite, values))
        return LogEvent("progress", nonfinite, epoch=epoch, batch=batch, batches=total, epochs=epochs,
                        losses=losses, text=_clip(text), offset=offset)

    def _ultralytics_line(self, kind: str, detail: str, found: re.Match[str], text: str, offset: int) -> LogEvent:
        epoch, epochs = self.epoch, None
        if detail == "resume":
            epoch, epochs = int(found.group(1)) - 1, int(found.group(2))  # "from epoch S": 1-based
        elif detail == "start":
            epochs = int(found.group(1))
        return LogEvent(kind, False, epoch=epoch, epochs=epochs, text=_clip(text), detail=detail, offset=offset)

    def _recovery(self, text: str, offset: int) -> LogEvent | None:
        if not any(key in text for key in _RECOVERY_KEYS):
            return None
        for kind, detail, regex in _RECOVERY:
            if regex.search(text):
                return LogEvent(kind, False, epoch=self.epoch, text=_clip(text), detail=detail, offset=offset)
        return None

    # ------------------------------------------------------------------ JSON / dict lines
    def _dict_line(self, text: str, offset: int) -> LogEvent | None:
        items = _DICT_ITEM.findall(text)
        if not items:
            return None
        self.saw_json = True
        epoch = step = batch = None
        losses: dict[str, float] = {}
        for key, raw in items:
            value = _float(raw)
            if key in _EPOCH_KEYS and math.isfinite(value):
                # HF Trainer logs a fractional epoch (0.5 = half of epoch 0; 1.0 = the end of epoch 0);
                # Lightning logs the integer current_epoch, already 0-based.
                is_fraction = any(c in raw for c in ".eE")
                epoch = max(math.ceil(value) - 1, 0) if is_fraction else int(value)
            elif key in _STEP_KEYS and math.isfinite(value):
                step = int(value)
            elif key in _BATCH_KEYS and math.isfinite(value):
                batch = int(value)
            else:
                losses[key] = value
        if epoch is not None:
            self.epoch = epoch
        else:
            epoch = self.epoch
        nonfinite = not all(math.isfinite(v) for v in losses.values())
        return LogEvent("nonfinite" if nonfinite else "metrics", nonfinite, epoch=epoch, batch=batch, step=step,
                        losses=losses, text=_clip(text), detail="json" if nonfinite else None, offset=offset)

    # ------------------------------------------------------------------ generic lines and the user pattern
    def _generic(self, text: str, offset: int) -> LogEvent:
        epoch = self.epoch
        found = _GENERIC_EPOCH.search(text)
        if found is not None:
            # "Epoch 3/10" is 1-based (the count shown to people); a bare "epoch=3" is taken as printed.
            epoch = int(found.group(1)) - 1 if found.group(2) else int(found.group(1))
        step_found = _GENERIC_STEP.search(text)
        losses = {key: _float(raw) for key, raw in _KEY_VALUE.findall(text)
                  if key.lower() not in ("epoch", "step", "global_step", "iter", "iteration")}
        return LogEvent("nonfinite", True, epoch=epoch, step=int(step_found.group(1)) if step_found else None,
                        losses=losses, text=_clip(text), detail="generic", offset=offset)

    def _match(self, text: str, offset: int) -> LogEvent | None:
        assert self.pattern is not None
        found = self.pattern.search(text)
        if found is None:
            return None
        groups = found.groupdict()

        def group_int(name: str) -> int | None:
            value = groups.get(name)
            return int(value) if value is not None and value.isdigit() else None

        epoch = group_int("epoch")
        return LogEvent("match", False, epoch=self.epoch if epoch is None else epoch, batch=group_int("batch"),
                        step=group_int("step"), text=_clip(text), detail="pattern", offset=offset)

    # ------------------------------------------------------------------ results.csv
    def _csv_row(self, text: str, offset: int) -> LogEvent | None:
        cells = [cell.strip() for cell in text.split(",")]
        if self.csv_columns is None or (cells and cells[0].lower() == "epoch"):
            # 8.3.0 pads every column with spaces (%23s): stripped above, then mapped by header name
            self.csv_columns = cells
            self.loss_names = [c.removeprefix("train/") for c in cells if c.startswith("train/")]
            return LogEvent("header", False, text=_clip(text), offset=offset)
        row = dict(zip(self.csv_columns, cells, strict=False))
        try:
            epoch = int(float(row.get("epoch", ""))) - 1  # results.csv counts epochs from 1
        except (ValueError, OverflowError):  # OverflowError: an epoch of inf
            return None
        values: dict[str, float] = {}
        for key, raw in row.items():
            if key in ("epoch", "time") or not raw:
                continue
            try:
                values[key] = _float(raw)
            except ValueError:
                continue
        self.epoch = epoch
        nonfinite = not all(math.isfinite(v) for v in values.values())
        return LogEvent("nonfinite" if nonfinite else "metrics", nonfinite, epoch=epoch, losses=values,
                        text=_clip(text), detail="csv" if nonfinite else None, offset=offset)
