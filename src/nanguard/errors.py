"""errors.py owns nanguard's exception hierarchy and the exit codes the CLI maps them to.

Every error a user can meet derives from :class:`NanguardError` and carries an :class:`ExitCode`, so
the CLI turns any of them into a one-line message and a documented exit status without a traceback.
This module imports nothing heavy: the CLI loads it before it knows whether torch is needed.
"""

from __future__ import annotations

from enum import IntEnum


class ExitCode(IntEnum):
    """Exit statuses of the ``nanguard`` command (and of scripts that let ``TrainingStopped`` escape)."""

    OK = 0
    """Success; for ``audit``, every checkpoint is clean."""
    DIRTY = 1
    """A checkpoint holds non-finite or scrubbed values."""
    BAD_INPUT = 2
    """Bad input: a missing or unreadable file, a bad policy file, a bad option."""
    UNSAFE = 3
    """A checkpoint's pickle calls code (unsafe), or loading it with real classes needs globals outside the
    allowlist and no ``trust`` was given; nothing from the file ran."""
    STOPPED = 4
    """The guard stopped training: the policy's escalation limits were reached."""
    LOCKED = 5
    """Another nanguard process holds the run's lock (``.nanguard/lock``); nothing was changed."""


class NanguardError(Exception):
    """Base class of every error nanguard raises on purpose."""

    exit_code: ExitCode = ExitCode.BAD_INPUT


class PolicyError(NanguardError, ValueError):
    """A policy value or policy file is invalid; the message names the key and the file."""


class JournalError(NanguardError):
    """The journal cannot be opened, created or read; the message names the file."""


class TrainingStopped(NanguardError):
    """The guard stopped training because recovery did not get past the incident.

    Attributes:
        report: a human-readable account of what was seen and tried, one line per item.
    """

    exit_code = ExitCode.STOPPED

    def __init__(self, message: str, report: list[str]) -> None:
        super().__init__(message)
        self.report = report


class UnreadableCheckpoint(NanguardError):
    """A checkpoint file or folder cannot be read: missing, truncated, corrupt or of an unknown format.

    The message names the path and the reason.
    """


class NoCheckpointsFound(NanguardError):
    """A folder given as a checkpoint holds no checkpoint file or checkpoint folder."""


class UnsafeCheckpoint(NanguardError):
    """A checkpoint cannot be loaded with real classes without ``trust``: its pickle calls code, or it names
    globals outside the load allowlist (importing them runs their modules' code).

    Attributes:
        globals: the offending globals, as ``module.name``.
    """

    exit_code = ExitCode.UNSAFE

    def __init__(self, message: str, globals: tuple[str, ...]) -> None:
        super().__init__(message)
        self.globals = globals
