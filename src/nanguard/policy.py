"""policy.py owns the rules from what the checks saw to what the guard does.

:class:`Policy` is the user's configuration: a frozen dataclass with defaults a user would expect, loadable
from ``nanguard.toml`` or ``[tool.nanguard]`` in ``pyproject.toml``. The controller's ``decide`` maps one step's
findings to a :class:`Decision` in :mod:`nanguard.guard.control` (the controller, with the escalation,
probation and LR back-off history). Nothing here touches a tensor or an optimizer.
"""

from __future__ import annotations

import math
import os
import tomllib
from dataclasses import asdict, dataclass, fields
from enum import Enum
from pathlib import Path
from typing import Any

from nanguard.errors import PolicyError
from nanguard.paths import BadPath, read_regular_file

MAX_POLICY_BYTES = 1 << 20
"""Largest policy file read (1 MiB). A policy is a few dozen keys (under 4 KiB), a pyproject.toml with
[tool.nanguard] rarely passes 50 KiB; 1 MiB leaves room for any real one, and a file of gigabytes (or a
device that never ends) is refused after reading at most this much, not read whole into memory."""

_LOSS_SPIKE_ACTIONS = ("skip", "record")
_GRAD_SPIKE_ACTIONS = ("skip", "clip", "record")
_BACKOFF_TRIGGERS = ("rollback", "skip", "loss_spike", "grad_spike")
_ROLLBACK_SKIPS = ("window", "faulted", "none")


@dataclass(frozen=True, kw_only=True)
class Policy:
    """What the guard checks and how it answers. Every field can be set in ``nanguard.toml``."""

    check_every_steps: int = 100
    """Scan weights, buffers, EMA and optimizer state at the end of every this many steps (a clean scan keeps
    a snapshot)."""
    max_grad_norm: float | None = None
    """Fixed gradient clipping: the total L2 norm is clipped to this value. ``None`` turns it off."""
    loss_spike_z: float = 6.0
    """A loss more than this many running standard deviations above its running mean is a spike."""
    grad_spike_z: float = 6.0
    """A gradient norm more than this many running standard deviations above its mean is a spike."""
    spike_min_ratio: float = 2.0
    """A spike must also be at least this many times the running mean (for a positive mean)."""
    spike_warmup_steps: int = 50
    """Finite observations the running statistics need before spikes are judged."""
    stats_decay: float = 0.98
    """Decay of the running mean and variance (an EMA over about ``1/(1-decay)`` steps)."""
    on_loss_spike: str = "skip"
    """``skip`` the update, or only ``record`` the spike."""
    on_grad_spike: str = "clip"
    """``clip`` the gradients to the spike threshold (adaptive clipping), ``skip`` the update, or ``record``."""
    max_skips_in_window: int = 5
    """This many skipped steps within ``skip_window_steps`` escalate to a rollback."""
    skip_window_steps: int = 50
    """The window, in steps, over which skipped steps are counted."""
    persistent_spike_steps: int = 3
    """This many loss spikes in consecutive steps escalate to a rollback."""
    snapshot_ring_size: int = 3
    """Clean snapshots kept in memory (one is taken at every clean check)."""
    disk_snapshot_every_steps: int | None = None
    """Also write a clean snapshot to ``<run_dir>/.nanguard/snapshots/`` this often, in steps, for
    ``Guard.resume``; ``None`` keeps snapshots in memory only."""
    disk_snapshots_kept: int = 2
    """Snapshot files kept on disk; the newest clean one is pinned and never deleted by rotation."""
    rollback_skip: str = "window"
    """Data skipped after a rollback: ``window`` (every batch from the snapshot to the incident),
    ``faulted`` (only the batches that had incidents) or ``none`` (replay them all)."""
    max_rollbacks: int = 3
    """Rollbacks that do not get past the incident point before training is stopped with a report."""
    lr_backoff_factor: float = 0.5
    """After an incident named in ``lr_backoff_on``, the learning rate is multiplied by this factor ..."""
    lr_probation_steps: int = 100
    """... for this many steps (after a rollback: the probation window, which must pass without an incident
    and reach past the incident point) ..."""
    lr_recovery_steps: int = 100
    """... and then brought back to its full value linearly over this many steps."""
    lr_backoff_on: tuple[str, ...] = ("rollback", "loss_spike")
    """Which events start an LR back-off: any of rollback, skip, loss_spike, grad_spike."""
    sync_free: bool = False
    """GPU mode: no host-device synchronisation per step. Flags are kept on the device and read every
    ``check_every_steps`` steps or on :meth:`Guard.flush`; the update is masked on the device."""
    supervise_nan_lines: int = 3
    """``nanguard run``: stop the command after this many consecutive progress lines with a non-finite loss."""
    supervise_stall_minutes: float = 30.0
    """``nanguard run``: stop the command after this many minutes without any output (fractions allowed)."""
    supervise_grace_seconds: float = 30.0
    """``nanguard run``: seconds between SIGTERM to the command's process group and SIGKILL."""
    supervise_max_restarts: int = 3
    """``nanguard run``: restarts allowed; a trigger after the last one ends it with exit 4."""
    supervise_backoff_seconds: float = 5.0
    """``nanguard run``: wait before the first restart; each further one waits twice as long ..."""
    supervise_backoff_max_seconds: float = 300.0
    """... but never longer than this."""
    supervise_lr_scale: float | None = None
    """``nanguard run``: multiply ``lr0`` in the rolled-back Ultralytics ``last.pt`` by this; ``None`` keeps it."""

    def __post_init__(self) -> None:
        for name in ("check_every_steps", "spike_warmup_steps", "max_skips_in_window", "skip_window_steps",
                     "persistent_spike_steps", "snapshot_ring_size"):
            _require_int(name, getattr(self, name), minimum=1)
        _require_int("disk_snapshots_kept", self.disk_snapshots_kept, minimum=2)
        if self.disk_snapshot_every_steps is not None:
            _require_int("disk_snapshot_every_steps", self.disk_snapshot_every_steps, minimum=1)
        _require_choice("rollback_skip", self.rollback_skip, _ROLLBACK_SKIPS)
        for name in ("max_rollbacks", "lr_probation_steps", "lr_recovery_steps"):
            _require_int(name, getattr(self, name), minimum=0)
        if self.max_grad_norm is not None:
            _require_positive(self, "max_grad_norm")
        _require_positive(self, "loss_spike_z")
        _require_positive(self, "grad_spike_z")
        _require_positive(self, "spike_min_ratio")
        _require_fraction(self, "stats_decay")
        _require_fraction(self, "lr_backoff_factor", allow_one=True)
        _require_choice("on_loss_spike", self.on_loss_spike, _LOSS_SPIKE_ACTIONS)
        _require_choice("on_grad_spike", self.on_grad_spike, _GRAD_SPIKE_ACTIONS)
        if isinstance(self.lr_backoff_on, list):  # TOML arrays arrive as lists
            object.__setattr__(self, "lr_backoff_on", tuple(self.lr_backoff_on))
        if not isinstance(self.lr_backoff_on, tuple):
            raise PolicyError(f"lr_backoff_on must be a list of names, got {self.lr_backoff_on!r}")
        for item in self.lr_backoff_on:
            _require_choice("lr_backoff_on", item, _BACKOFF_TRIGGERS)
        if not isinstance(self.sync_free, bool):
            raise PolicyError(f"sync_free must be true or false, got {self.sync_free!r}")
        _require_int("supervise_nan_lines", self.supervise_nan_lines, minimum=1)
        _require_int("supervise_max_restarts", self.supervise_max_restarts, minimum=0)
        _require_positive(self, "supervise_stall_minutes")
        for name in ("supervise_grace_seconds", "supervise_backoff_seconds", "supervise_backoff_max_seconds"):
            _require_non_negative(self, name)
        if self.supervise_lr_scale is not None:
            _require_positive(self, "supervise_lr_scale")

    def to_dict(self) -> dict[str, Any]:
        """The policy as plain values (for the journal and for TOML)."""
        values = asdict(self)
        values["lr_backoff_on"] = list(self.lr_backoff_on)
        return values

    @classmethod
    def from_dict(cls, values: dict[str, Any], *, source: str = "policy") -> Policy:
        """Build a policy from plain values; unknown keys and bad values raise :class:`PolicyError`
        whose message starts with ``source``."""
        known = {f.name for f in fields(cls)}
        for key in values:
            if key not in known:
                raise PolicyError(f"{source}: unknown key {key!r} (known keys: {', '.join(sorted(known))})")
        try:
            return cls(**values)
        except PolicyError as err:
            raise PolicyError(f"{source}: {err}") from None

    @classmethod
    def from_file(cls, path: str | Path) -> Policy:
        """Load ``nanguard.toml`` (keys at the top level) or ``pyproject.toml`` (keys under ``[tool.nanguard]``)."""
        path = Path(path)
        try:
            # A FIFO or device is refused before anything is read (it would block, or never end), and no more
            # than MAX_POLICY_BYTES are read, whatever the file's size.
            raw = read_regular_file(path, MAX_POLICY_BYTES, "policy file")
        except BadPath as err:
            if not os.path.lexists(path):
                raise PolicyError(f"{path}: no such policy file") from None
            raise PolicyError(str(err)) from None
        try:
            data = tomllib.loads(raw.decode("utf-8"))
        except UnicodeDecodeError as err:
            raise PolicyError(f"{path}: cannot read policy file ({err})") from None
        except tomllib.TOMLDecodeError as err:
            raise PolicyError(f"{path}: not valid TOML ({err})") from None
        if path.name == "pyproject.toml":
            data = data.get("tool", {}).get("nanguard", {})
            if not isinstance(data, dict):
                raise PolicyError(f"{path}: [tool.nanguard] must be a table")
        return cls.from_dict(data, source=str(path))

    @classmethod
    def discover(cls, directory: str | Path = ".") -> Policy:
        """The policy for a project folder: ``nanguard.toml``, else ``[tool.nanguard]`` in
        ``pyproject.toml``, else the defaults."""
        directory = Path(directory)
        # exists(), not is_file(): a nanguard.toml that is a FIFO, a device or a folder is an error to report
        # (from_file refuses it), not a reason to train silently with the defaults.
        if (directory / "nanguard.toml").exists():
            return cls.from_file(directory / "nanguard.toml")
        pyproject = directory / "pyproject.toml"
        if pyproject.exists():
            return cls.from_file(pyproject)
        return cls()


def _require_int(name: str, value: object, *, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise PolicyError(f"{name} must be an integer >= {minimum}, got {value!r}")


def _require_positive(policy: Policy, name: str) -> None:
    value = getattr(policy, name)
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value <= 0:
        raise PolicyError(f"{name} must be a positive number, got {value!r}")


def _require_non_negative(policy: Policy, name: str) -> None:
    value = getattr(policy, name)
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value < 0:
        raise PolicyError(f"{name} must be a number >= 0, got {value!r}")


def _require_fraction(policy: Policy, name: str, *, allow_one: bool = False) -> None:
    value = getattr(policy, name)
    upper_ok = value <= 1 if allow_one else value < 1
    if isinstance(value, bool) or not isinstance(value, int | float) or not (value > 0 and upper_ok):
        bound = "in (0, 1]" if allow_one else "in (0, 1)"
        raise PolicyError(f"{name} must be a number {bound}, got {value!r}")


def _require_choice(name: str, value: object, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise PolicyError(f"{name} must be one of {', '.join(choices)}; got {value!r}")


class Action(str, Enum):
    """What the guard does with one step."""

    CONTINUE = "continue"
    """Apply the update as it is."""
    CLIP = "clip"
    """Apply the update with gradients clipped to ``Decision.clip_to``."""
    SKIP = "skip"
    """Do not apply the update; optimizer state, EMA, scheduler, scaler and buffers stay as they were."""
    ROLLBACK = "rollback"
    """Do not apply the update; go back to the newest clean snapshot from before the first symptom, rewind
    the data (skipping what the policy says) and continue on probation with a lower LR."""
    STOP = "stop"
    """Stop training with a report: recovery is not getting past the incident."""


@dataclass(frozen=True)
class Decision:
    """The policy's answer for one step."""

    action: Action
    reason: str = ""
    clip_to: float | None = None
