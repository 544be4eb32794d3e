"""nanguard.logscan reads training logs for NaN/Inf incidents: Ultralytics console logs, results.csv, JSON
lines (HF Trainer, Lightning) and generic logs. Pure Python and ``re``; it never imports torch.

Package layout: ``events.py`` (the values given back), ``lines.py`` (reading one frame or line),
``scanner.py`` (streams, files, the fast path), ``follow.py`` (growing files). ``nanguard scan-log`` is the CLI.

Contract (the supervisor, ``nanguard run``, relies on it)::

    from nanguard.logscan import LogScanner, LogEvent, ScanResult, scan_file

    scanner = LogScanner(fmt="auto", pattern=None, source="<stream>")
    events: list[LogEvent] = scanner.feed(chunk)   # any chunking: mid-line, mid-ANSI code, mid-redraw
    events += scanner.finish()                     # the trailing piece no line break ended
    result: ScanResult = scanner.result()          # incidents per epoch, totals, position; .to_dict() is JSON-safe
    result = scan_file(path, fmt="auto", pattern=None)   # whole files, fast (>= 200 MB/s)

- The stream is cut at every ``\\n`` and ``\\r``; each piece, ANSI codes removed, gives at most one event.
  Feeding the same text in any chunks gives the same events (same ``offset``\\ s) and the same result.
- :class:`LogEvent` (frozen): ``kind`` is ``"progress"`` for an Ultralytics training progress frame (every
  redraw, finite or not), ``"nonfinite"`` for a generic, JSON or results.csv line holding NaN/Inf,
  ``"metrics"`` for a JSON line or results.csv row without, ``"recovery"`` for Ultralytics' own NaN recovery
  lines (and torch's non-finite clip-norm warning), ``"warning"``, ``"boundary"`` (``detail`` ``start``,
  ``resume``, ``end``), ``"header"``, ``"match"`` (the user's ``pattern``). ``nonfinite`` says whether the
  frame's losses (the line's values) hold NaN/Inf; ``is_incident`` is ``nonfinite`` or a recovery or match.
- ``epoch`` is the **0-based** epoch index, as the journal stores it (Ultralytics prints ``1/3`` for epoch 0;
  results.csv's ``epoch`` column is 1-based too). ``batch`` is the **0-based index of the last batch the
  frame covers**. Ultralytics sets the losses after a batch's step and before its bar counts that batch, so
  a frame ``2/4`` drawn then already includes batch 2 (``batch=2``; a frame ``0/4`` with losses is batch 0);
  the final frame ``4/4`` covers batch 3. Frames are redrawn at most every 0.1 s, so with batches faster than
  that not every batch gets a frame. ``batches``/``epochs`` are the totals of ``n/total`` and ``e/E``.
- Losses on a progress frame are running epoch means: after the first NaN batch every later frame of that
  epoch shows ``nan``. So the first non-finite frame of an epoch marks its first NaN batch, and a supervisor
  that counts consecutive ``progress`` events with ``nonfinite=True`` counts redraws since then.
- JSON lines: HF Trainer (``{"loss": NaN, "grad_norm": ..., "epoch": 0.5, "step": 10}``, also its console
  dict reprs with ``nan``; a fractional epoch e is epoch index ``ceil(e) - 1``) and Lightning (integer
  ``epoch``, already 0-based; ``step``). HF's ``trainer_state.json`` is read through its ``log_history``.
- Generic lines: a ``nan``/``inf``/``infinity`` word in any case (``loss=nan``, ``loss: inf``); ``Epoch 3/10``
  places it in epoch index 2, ``epoch=3`` in epoch 3; otherwise the epoch being trained when known.
- :func:`scan_file` reads only the pieces that can hold an incident plus the last progress frame of each
  8 MiB buffer; it gives the same :class:`ScanResult` as feeding the file to a :class:`LogScanner` (a
  ``pattern`` makes it read every piece). The format ``auto`` is chosen per file from its name
  (``results.csv``, ``trainer_state.json``) and its first 64 KiB.
"""

from __future__ import annotations

from nanguard.logscan.events import FORMATS, EpochIncidents, LogEvent, LogScanError, ScanResult
from nanguard.logscan.follow import follow
from nanguard.logscan.scanner import LogScanner, check_readable, scan_file

__all__ = [
    "FORMATS",
    "EpochIncidents",
    "LogEvent",
    "LogScanError",
    "LogScanner",
    "ScanResult",
    "check_readable",
    "follow",
    "scan_file",
]
