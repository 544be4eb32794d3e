"""base.py owns the value types of checkpoint auditing and the constants every reader shares.

It defines what a read checkpoint is (:class:`CheckpointTree`), what an audit says (:class:`Finding`,
:class:`Verdict`, :class:`Inspection`), the allowlist of globals that trusted loading accepts, which calls
make a pickle unsafe (:func:`unsafe_globals`), and the names that mark sentinel infinities. It reads no file
and imports neither torch nor any framework.

Two questions, two answers: a checkpoint's *content* is clean or dirty from its findings alone; it is
*unsafe* only when its pickle calls something that runs code. A class outside the load allowlist that the
pickle merely rebuilds as data (``cls.__new__`` plus its state) makes neither dirty nor unsafe; it only means
that loading with real classes (which imports the class's module) needs ``trust``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any


class Status(str, Enum):
    """The verdict on one checkpoint, worst first in :data:`STATUS_ORDER`."""

    CLEAN = "clean"
    """Every value is finite and no mark of scrubbing was found."""
    DIRTY = "dirty"
    """At least one finding: non-finite values, or the marks of a scrubbed checkpoint."""
    UNSAFE = "unsafe"
    """The pickle calls a global that runs code (``os.system``, ``builtins.eval``, ``torch.save``...): see
    :func:`unsafe_globals`. The content verdict is still on :attr:`Verdict.content`."""
    UNREADABLE = "unreadable"
    """The file is missing, truncated, corrupt or of an unknown format."""


class Kind(str, Enum):
    """What a finding is about."""

    NAN = "nan"
    POS_INF = "+inf"
    NEG_INF = "-inf"
    ZERO_WEIGHT = "zero_weight"
    """A conv/linear weight (two or more dimensions) whose elements are all zero."""
    ZERO_RUNNING_VAR = "zero_running_var"
    """A BatchNorm ``running_var`` of zeros: it starts at one and stays positive in healthy training."""
    FP16_SATURATED = "fp16_saturated"
    """float16 values at exactly ±65504, where ``nan_to_num`` puts an Inf."""
    SCRUBBED = "scrubbed"
    """Most floating tensors of a model are entirely zero: NaN replaced by zeros at save time."""
    NEGATIVE_SECOND_MOMENT = "negative_second_moment"
    """An optimizer second moment (``exp_avg_sq``, ``square_avg``…) below zero."""
    BAD_SCALE = "bad_scale"
    """A GradScaler ``scale`` that is zero or negative."""


class Area(str, Enum):
    """Which part of a training state a location belongs to."""

    MODEL = "model"
    EMA = "ema"
    OPTIMIZER = "optimizer"
    SCALER = "scaler"
    SCHEDULER = "scheduler"
    METRICS = "metrics"
    HISTORY = "history"
    OTHER = "other"


class Format(str, Enum):
    """The producer of a checkpoint, as far as its content tells."""

    ULTRALYTICS = "ultralytics"
    LIGHTNING = "lightning"
    HUGGINGFACE = "huggingface"
    DCP = "dcp"
    """A ``torch.distributed.checkpoint`` folder."""
    SAFETENSORS = "safetensors"
    TORCH = "torch"
    """A plain ``torch.save`` object, such as a state dict."""


FP16_MAX = 65504.0
"""Largest finite float16; ``torch.nan_to_num`` maps ±Inf of a float16 tensor to ±FP16_MAX."""

SCRUBBED_ZERO_FRACTION = 0.5
"""A model or EMA with more than this fraction of its floating tensors entirely zero is reported scrubbed."""

SCRUBBED_MIN_TENSORS = 4
"""The scrubbed check needs at least this many floating tensors in the model to say anything."""

CHECKPOINT_SUFFIXES = frozenset({".pt", ".pth", ".ckpt", ".bin", ".safetensors", ".pkl", ".tar"})
"""File suffixes that :func:`nanguard.ckpt.audit_paths` treats as checkpoints inside a folder."""

SECOND_MOMENT_KEYS = frozenset({"exp_avg_sq", "max_exp_avg_sq", "square_avg", "sum", "exp_inf", "acc_delta"})
"""Optimizer state keys holding non-negative moments (Adam, RMSprop, Adagrad, Adamax, Adadelta)."""

INF_SENTINEL_KEYS = frozenset(
    {"best", "mode_worse", "kth_value", "best_score", "best_model_score", "current_score", "best_metric"}
)
"""Keys whose value is ±Inf by design before the first comparison: ReduceLROnPlateau ``best`` and
``mode_worse``, Lightning ``ModelCheckpoint``/``EarlyStopping`` scores, HF ``best_metric``. A NaN there is
still reported."""

TOP_KEY_AREAS: dict[str, Area] = {
    "model": Area.MODEL,
    "state_dict": Area.MODEL,
    "model_state_dict": Area.MODEL,
    "ema": Area.EMA,
    "model_ema": Area.EMA,
    "ema_state_dict": Area.EMA,
    "optimizer": Area.OPTIMIZER,
    "optim": Area.OPTIMIZER,
    "optimizer_states": Area.OPTIMIZER,
    "optimizer_state_dict": Area.OPTIMIZER,
    "scaler": Area.SCALER,
    "native_amp_scaling_state": Area.SCALER,
    "grad_scaler": Area.SCALER,
    "scheduler": Area.SCHEDULER,
    "lr_scheduler": Area.SCHEDULER,
    "lr_schedulers": Area.SCHEDULER,
    "best_fitness": Area.METRICS,
    "train_metrics": Area.METRICS,
    "stopper": Area.METRICS,
    "callbacks": Area.METRICS,
    "metrics": Area.METRICS,
    "train_results": Area.HISTORY,
    "trainer_state": Area.HISTORY,
}
"""Area of each well-known top-level key (Ultralytics, Lightning, HF Trainer folders, common plain dicts)."""

SAFE_GLOBAL_PREFIXES = (
    "torch.",
    "torchvision.",  # torch's own library; Ultralytics classify pickles its transforms ("torch." does not match)
    "collections.",
    "ultralytics.",
    "lightning.",
    "lightning_fabric.",
    "pytorch_lightning.",
    "transformers.",
    "accelerate.",
    "datetime.",
    "pathlib.",
)
"""Module prefixes whose globals trusted loading accepts: torch, containers, and the training frameworks."""

SAFE_GLOBALS = frozenset(
    {
        "builtins.set",
        "builtins.frozenset",
        "builtins.bytearray",
        "builtins.bytes",
        "builtins.complex",
        "builtins.slice",
        "builtins.range",
        "builtins.list",
        "builtins.dict",
        "builtins.tuple",
        "builtins.int",
        "builtins.float",
        "builtins.bool",
        "builtins.str",
        "builtins.object",
        "_codecs.encode",
        "copyreg._reconstructor",
        "argparse.Namespace",
        "types.SimpleNamespace",
        "numpy.dtype",
        "numpy.ndarray",
        "numpy.core.multiarray.scalar",
        "numpy._core.multiarray.scalar",
        "numpy.core.multiarray._reconstruct",
        "numpy._core.multiarray._reconstruct",
        "numpy.random._pickle.__randomstate_ctor",
        "numpy.random._pickle.__bit_generator_ctor",
        "numpy.random._pickle.__generator_ctor",
        "numpy.random.mtrand.RandomState",
        "numpy.random._mt19937.MT19937",
    }
)
"""Exact globals accepted besides the prefixes: pure containers and numpy's array/scalar/RNG rebuilders."""

SAFE_GLOBAL_MODULE_PREFIXES = ("numpy.dtypes.",)
"""numpy's dtype classes (``numpy.dtypes.Float64DType``) are inert data types."""

UNSAFE_GLOBAL_PREFIXES = (
    "torch.load",
    "torch.hub.",
    "torch.package.",
    "torch.jit.",
    "torch.utils.cpp_extension.",
    "torch.serialization.load",
    "torch.storage._load_from_bytes",
    "torch.fx.graph_module.",
    "torch._C._jit",
    "torch.ops.",
    "torch._dynamo.",
    "torch.compile",
    "torch.testing.",
)
"""Globals under a safe prefix that still load files, compile or execute source; always unsafe."""

UNSAFE_CALL_PREFIXES = (
    "ultralytics.YOLO",
    "ultralytics.RTDETR",
    "ultralytics.SAM",
    "ultralytics.FastSAM",
    "ultralytics.NAS",
    "ultralytics.engine.",
    "ultralytics.models.",
    "ultralytics.hub.",
)
"""Allowed classes whose constructor loads another file, downloads or trains (Ultralytics' model wrappers,
trainers, predictors): rebuilding them as data is fine, calling them is unsafe. Model checkpoints hold
``ultralytics.nn.*`` modules, never these, so a call of one is a payload."""

CALLABLE_GLOBAL_PREFIXES = ("torch._utils._rebuild_", "torch._tensor._rebuild_", "torch.serialization._get_layout")
"""torch's own rebuilders, functions a ``torch.save`` pickle calls that build a tensor or a layout from data."""


def _class_shaped(name: str) -> bool:
    # PEP 8 CapWords: the last dotted part starts upper case, after any leading underscores (DetectionModel,
    # InterpolationMode, DCP's _MEM_FORMAT_ENCODING). Functions and methods (torch.save,
    # pathlib.Path.write_text, safe_download) do not.
    last = name.rsplit(".", 1)[-1].lstrip("_")
    return last[:1].isupper()


def is_callable_global(name: str) -> bool:
    """Whether a pickle may *call* ``name`` (REDUCE, INST, OBJ) without the file being unsafe.

    Accepted: the exact :data:`SAFE_GLOBALS` (containers and numpy rebuilders), torch's tensor rebuilders,
    and class-shaped names on the allowlist (constructing a torch or framework class, an Enum member);
    not the wrappers of :data:`UNSAFE_CALL_PREFIXES`. Anything else called is a call that runs code: a
    function outside the allowlist (``os.system``) or on it (``torch.save`` writes a file).
    """
    if name in SAFE_GLOBALS or name.startswith(CALLABLE_GLOBAL_PREFIXES):
        return True
    return is_allowed_global(name) and _class_shaped(name) and not name.startswith(UNSAFE_CALL_PREFIXES)


def unsafe_globals(globals_: tuple[str, ...], called: tuple[str, ...]) -> tuple[str, ...]:
    """The globals that make a pickle unsafe, sorted: every one it calls that :func:`is_callable_global`
    refuses, and any use at all of one on :data:`UNSAFE_GLOBAL_PREFIXES`."""
    bad = {g for g in called if not is_callable_global(g)}
    bad.update(g for g in globals_ if g.startswith(UNSAFE_GLOBAL_PREFIXES))
    return tuple(sorted(bad))


def unlisted_globals(globals_: tuple[str, ...]) -> tuple[str, ...]:
    """The globals outside the load allowlist: loading with real classes imports them, so it needs trust."""
    return tuple(g for g in globals_ if not is_allowed_global(g))


@dataclass(frozen=True, slots=True)
class Finding:
    """One problem at one location.

    Attributes:
        location: dotted path in the checkpoint tree, module path for weights (``ema.model.0.conv.weight``).
        kind: what was found.
        count: how many elements show it.
        first_index: index of the first such element (tensor index, or list position); empty for scalars.
        area: the part of the training state the location belongs to.
        numel: elements in the tensor or series, for scale.
    """

    location: str
    kind: Kind
    count: int
    first_index: tuple[int, ...] = ()
    area: Area = Area.OTHER
    numel: int = 1

    def __str__(self) -> str:
        where = f"[{', '.join(map(str, self.first_index))}]" if self.first_index else ""
        return f"{self.location}{where}: {self.kind.value} x{self.count} of {self.numel} ({self.area.value})"


@dataclass(slots=True)
class CheckpointTree:
    """A checkpoint read without executing code.

    Attributes:
        path: the file or folder read.
        format: its producer.
        root: the tree of dicts, lists, tensors, numbers and inert records.
        globals: every global the pickles reference, as ``module.name``, sorted.
        files: the files read (one for a file checkpoint, several for a folder).
        container: ``zip``, ``legacy``, ``safetensors``, ``pickle`` or ``folder``.
        called: the globals the pickles call (REDUCE, INST, OBJ, a ``copyreg._reconstructor`` base), sorted;
            the vetted rebuilders the inert reader runs itself are not listed.
    """

    path: Path
    format: Format
    root: Any
    globals: tuple[str, ...] = ()
    files: tuple[Path, ...] = ()
    container: str = "zip"
    called: tuple[str, ...] = ()


@dataclass(slots=True)
class Verdict:
    """The audit of one checkpoint.

    Attributes:
        path: the checkpoint audited.
        status: unreadable, else unsafe when the pickle calls code, else the content verdict.
        findings: every problem found, in tree order (also for an unsafe file).
        globals: every global the file references.
        unsafe_globals: the globals that make it unsafe (non-empty exactly when ``status`` is unsafe).
        format: the producer, or None when unreadable.
        epoch: the epoch recorded in the file (Ultralytics: ``-1`` when stripped), if any.
        step: the optimizer step recorded (``global_step``, ``updates``), if any.
        fitness: the best fitness or best metric recorded, if any.
        error: why the file is unreadable.
        unlisted_globals: the globals outside the load allowlist (loading with real classes needs trust);
            independent of ``status``.
    """

    path: Path
    status: Status
    findings: list[Finding] = field(default_factory=list)
    globals: tuple[str, ...] = ()
    unsafe_globals: tuple[str, ...] = ()
    format: Format | None = None
    epoch: int | float | None = None
    step: int | None = None
    fitness: float | None = None
    error: str | None = None
    unlisted_globals: tuple[str, ...] = ()

    @property
    def ok(self) -> bool:
        """True when the checkpoint is clean."""
        return self.status is Status.CLEAN

    @property
    def content(self) -> Status | None:
        """The content verdict alone, clean or dirty from the findings (also for an unsafe file); None when
        unreadable."""
        if self.status is Status.UNREADABLE:
            return None
        return Status.DIRTY if self.findings else Status.CLEAN

    @property
    def loadable(self) -> bool:
        """Whether :func:`nanguard.ckpt.load_checkpoint` loads it without ``trust``."""
        return self.status is not Status.UNREADABLE and not self.unsafe_globals and not self.unlisted_globals


@dataclass(slots=True)
class Inspection:
    """What ``nanguard inspect`` shows about one checkpoint.

    Attributes:
        verdict: the audit verdict (format, epoch, step and fitness live there).
        top_keys: the keys of the root dict, in file order.
        tensor_count: number of tensors.
        tensor_bytes: bytes of tensor data.
        dtypes: number of tensors per dtype name.
    """

    verdict: Verdict
    top_keys: list[str] = field(default_factory=list)
    tensor_count: int = 0
    tensor_bytes: int = 0
    dtypes: dict[str, int] = field(default_factory=dict)


def is_allowed_global(name: str) -> bool:
    """Whether trusted loading accepts the global ``name`` (``module.qualname``)."""
    if name.startswith(UNSAFE_GLOBAL_PREFIXES):
        return False
    return name in SAFE_GLOBALS or name.startswith(SAFE_GLOBAL_PREFIXES + SAFE_GLOBAL_MODULE_PREFIXES)
