"""base.py owns the names every module of :mod:`nanguard.runs` shares: the run folder's layout, the refusal
error, and the two loose-value readers.

A run folder (``runs/detect/train``) holds ``weights/`` and ``results.csv``; :class:`RollbackRefused` is what
planning, applying and undoing raise when they will not go ahead. It does no I/O and imports nothing from
the rest of the package, so every other module can import it without a cycle. The lock, the backups and
results.csv trimming live in :mod:`~nanguard.runs.lock`, :mod:`~nanguard.runs.backups` and
:mod:`~nanguard.runs.results_csv`.
"""

from __future__ import annotations

import math
from typing import Any

from nanguard.errors import ExitCode, NanguardError

WEIGHTS_DIR = "weights"
RESULTS_CSV = "results.csv"
MAX_EPOCHS = 1_000_000
"""Most epochs a run can have, as read from ``args.yaml``, ``--epochs`` or a results.csv ``epoch`` cell. Real
runs have hundreds; a larger number read from a file is damage, and trusting it would put ETAs past the year
9999 (where no clock can show them) and epoch axes at 1e300."""


class RollbackRefused(NanguardError):
    """A rollback or undo cannot go ahead; the one-line message names the file and the reason.

    ``exit_code`` is ``BAD_INPUT`` (missing folder, stripped or final checkpoint, no backup), ``DIRTY`` (a
    dirty or tainted target without ``force``) or ``UNSAFE`` (a target whose pickle calls code, or
    that names globals outside the allowlist, without ``trust``).
    """

    def __init__(self, message: str, exit_code: ExitCode = ExitCode.BAD_INPUT) -> None:
        super().__init__(message)
        self.exit_code = exit_code


# Not nanguard.ckpt.formats.as_float/as_int: those import torch and numpy (this package stays torch-free
# until a checkpoint is read) and also accept numpy scalars and one-element tensors.
def as_float(value: Any) -> float | None:
    """``value`` as a float when it is a python int or float (not a bool), else None."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value)


def as_int(value: Any) -> int | None:
    """``value`` as an int when it is a finite whole python number, else None."""
    number = as_float(value)
    if number is None or not math.isfinite(number) or not number.is_integer():
        return None
    return int(number)
