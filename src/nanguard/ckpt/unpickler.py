"""unpickler.py owns the inert reader: unpickling a checkpoint without importing or calling what it names.

:class:`InertUnpickler` resolves every global through :meth:`~InertUnpickler.find_class`, which records its
name and returns either a vetted pure function (tensor and numpy rebuilders, container constructors that
take plain data) or an :class:`InertObject` subclass that only stores the arguments and state it is given.
So a pickled ``DetectionModel`` becomes a record whose state holds its ``_parameters``/``_modules``, and a
pickled ``os.system`` call becomes a record of the command, never run. The reader also records which
globals the pickle *calls* (:func:`recording_calls`): REDUCE, INST and OBJ call ``cls(*args)``, which runs
:meth:`InertObject.__init__`, while NEWOBJ/NEWOBJ_EX and ``copyreg._reconstructor`` call ``cls.__new__``
only (plain data), as CPython's ``load_reduce``/``load_inst``/``load_obj``/``load_newobj`` do. Storages come from a
``load_storage`` callback that the container reader (zip, legacy, DCP) supplies; this module never opens
files itself.
"""

from __future__ import annotations

import _compat_pickle
import datetime as _dt
import io
import pickle
import warnings
from collections import OrderedDict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import PurePosixPath, PureWindowsPath
from typing import Any, ClassVar

import numpy as np
import torch

LoadStorage = Callable[[str, torch.dtype, int], torch.Tensor]
"""``(key, dtype, numel) -> 1-D tensor`` of the storage's elements, supplied by the container reader."""

_CALLS: ContextVar[dict[str, None] | None] = ContextVar("nanguard_inert_calls", default=None)
"""Where the unpickler running now records the globals its pickle calls. The record classes are cached
module-wide, so the record travels in this context variable, set by :meth:`InertUnpickler.load`."""


def _record_call(qualname: str) -> None:
    calls = _CALLS.get()
    if calls is not None:
        calls[qualname] = None


@contextmanager
def recording_calls() -> Iterator[dict[str, None]]:
    """Collect the called globals of every :class:`InertUnpickler` that loads inside the block."""
    calls: dict[str, None] = {}
    token = _CALLS.set(calls)
    try:
        yield calls
    finally:
        _CALLS.reset(token)


class InertObject:
    """An instance of a class the reader did not import: it keeps its constructor arguments and state.

    Attributes:
        inert_args: positional arguments of the constructor call or ``__new__``.
        inert_kwargs: keyword arguments (protocol 4 ``NEWOBJ_EX``).
        inert_state: what ``__setstate__`` received (often the instance ``__dict__``).
        inert_items: elements appended (list subclasses) and ``(key, value)`` pairs set (dict subclasses).
    """

    inert_module: ClassVar[str] = ""
    inert_name: ClassVar[str] = ""
    inert_args: tuple[Any, ...]
    inert_kwargs: dict[str, Any]
    inert_state: Any
    inert_items: list[Any]

    def __new__(cls, *args: Any, **kwargs: Any) -> InertObject:
        obj = object.__new__(cls)
        obj.__dict__.update(inert_args=args, inert_kwargs=kwargs, inert_state=None, inert_items=[])
        return obj

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        # __new__ stored the arguments; a real __init__ would run the class's code. Only a call reaches here
        # (REDUCE, INST, OBJ: ``cls(*args)``), never NEWOBJ (``cls.__new__``): record the global as called.
        _record_call(type(self).qualname())

    def __getinitargs__(self) -> tuple[Any, ...]:
        # Its presence makes INST/OBJ without arguments call ``cls()`` (so __init__ records the call) instead
        # of ``cls.__new__(cls)``: for the real global (a function such as os.abort) that would be a call.
        return self.inert_args

    def __setstate__(self, state: Any) -> None:
        self.__dict__["inert_state"] = state

    def append(self, value: Any) -> None:
        self.inert_items.append(value)

    def extend(self, values: Any) -> None:
        self.inert_items.extend(values)

    def __setitem__(self, key: Any, value: Any) -> None:
        self.inert_items.append((key, value))

    @classmethod
    def qualname(cls) -> str:
        """The global this record stands for, as ``module.name``."""
        return f"{cls.inert_module}.{cls.inert_name}"

    def __repr__(self) -> str:
        return f"<inert {self.qualname()}>"


_INERT_CLASSES: dict[tuple[str, str], type[InertObject]] = {}


def inert_class(module: str, name: str) -> type[InertObject]:
    """The (cached) record class standing for global ``module.name``."""
    key = (module, name)
    cls = _INERT_CLASSES.get(key)
    if cls is None:
        safe_name = name.replace(".", "_") or "anonymous"
        attrs = {"inert_module": module, "inert_name": name, "__module__": __name__}
        cls = type(safe_name, (InertObject,), attrs)
        _INERT_CLASSES[key] = cls
    return cls


def module_state(obj: InertObject) -> dict[str, Any] | None:
    """The ``__dict__`` state of a record, also when pickled with slots (``(dict, slotdict)``)."""
    state = obj.inert_state
    if isinstance(state, tuple) and len(state) == 2 and isinstance(state[1], dict):
        merged = dict(state[0]) if isinstance(state[0], dict) else {}
        merged.update(state[1])
        return merged
    return state if isinstance(state, dict) else None


class Storage:
    """A storage read from the container: a flat 1-D tensor of its elements (memory-mapped when possible)."""

    __slots__ = ("flat",)

    def __init__(self, flat: torch.Tensor) -> None:
        self.flat = flat


class StorageType:
    """Stands for ``torch.FloatStorage`` and friends: only its dtype matters."""

    __slots__ = ("dtype",)

    def __init__(self, dtype: torch.dtype) -> None:
        self.dtype = dtype


def _storage_types() -> dict[str, torch.dtype]:
    types = {"UntypedStorage": torch.uint8, "ByteStorage": torch.uint8}
    for name in dir(torch):
        if name.endswith("Storage") and not name.startswith("_"):
            with warnings.catch_warnings():  # the legacy typed storage classes warn on every access
                warnings.simplefilter("ignore")
                dtype = getattr(getattr(torch, name), "dtype", None)
            if isinstance(dtype, torch.dtype):
                types[name] = dtype
    return types


_STORAGE_DTYPES = _storage_types()


def _reinterpret(flat: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    if flat.dtype == dtype:
        return flat
    byte_view = flat.view(torch.uint8) if flat.element_size() != 1 else flat
    itemsize = torch.empty((), dtype=dtype).element_size()
    usable = byte_view.numel() - byte_view.numel() % itemsize
    try:
        return byte_view[:usable].view(dtype)
    except RuntimeError:  # misaligned view: copy instead
        return byte_view[:usable].clone().view(dtype)


def _ints(value: Any, what: str) -> tuple[int, ...]:
    if not isinstance(value, tuple | list) or not all(type(v) is int and v >= 0 for v in value):
        raise pickle.UnpicklingError(f"bad tensor {what}: {value!r:.80}")
    return tuple(value)


def rebuild_tensor(storage: Any, offset: Any, size: Any, stride: Any, dtype: torch.dtype | None = None) -> torch.Tensor:
    """A strided view of ``storage``, after checking that it stays inside the storage."""
    if not isinstance(storage, Storage) or type(offset) is not int or offset < 0:
        raise pickle.UnpicklingError("tensor without a valid storage")
    flat = storage.flat if dtype is None else _reinterpret(storage.flat, dtype)
    shape, strides = _ints(size, "size"), _ints(stride, "stride")
    if len(shape) != len(strides):
        raise pickle.UnpicklingError("tensor size and stride differ in length")
    if 0 in shape:
        return torch.empty(shape, dtype=flat.dtype)
    extent = offset + sum((n - 1) * s for n, s in zip(shape, strides, strict=True)) + 1
    if extent > flat.numel():
        raise pickle.UnpicklingError(f"tensor of {extent} elements extends past its storage of {flat.numel()}")
    if flat.is_meta:
        return torch.empty_strided(shape, strides, dtype=flat.dtype, device="meta")
    # as_strided's offset counts from the start of the underlying (whole-file) storage.
    return flat.as_strided(shape, strides, flat.storage_offset() + offset)


def _rebuild_tensor_v2(storage: Any, offset: Any, size: Any, stride: Any, *_: Any) -> torch.Tensor:
    return rebuild_tensor(storage, offset, size, stride)


def _rebuild_tensor_v3(
    storage: Any, offset: Any, size: Any, stride: Any, grad: Any, hooks: Any, dtype: Any, *_: Any
) -> Any:
    if not isinstance(dtype, torch.dtype):
        raise pickle.UnpicklingError("tensor dtype is not a torch dtype")
    return rebuild_tensor(storage, offset, size, stride, dtype)


def _rebuild_parameter(data: Any, *_: Any) -> Any:
    # A Parameter's payload is its tensor; requires_grad and hooks do not matter for an audit.
    return data


def _rebuild_from_type(func: Any, new_type: Any, args: Any, state: Any = None) -> Any:
    # Tensor subclasses (Parameter included) are rebuilt as the plain tensor; func must be a vetted rebuilder.
    if func not in _TORCH_FUNCS.values() or not isinstance(args, tuple):
        raise pickle.UnpicklingError("tensor subclass rebuilt through an unknown function")
    return func(*args)


def _rebuild_meta(dtype: Any, size: Any, stride: Any, *_: Any) -> torch.Tensor:
    if not isinstance(dtype, torch.dtype):
        raise pickle.UnpicklingError("meta tensor dtype is not a torch dtype")
    return torch.empty_strided(_ints(size, "size"), _ints(stride, "stride"), dtype=dtype, device="meta")


def _rebuild_from_numpy(data: Any, dtype: Any, *_: Any) -> torch.Tensor:
    if not isinstance(data, np.ndarray) or data.dtype.kind not in "biufc":
        raise pickle.UnpicklingError("tensor from numpy without a numeric array")
    return torch.from_numpy(np.array(data))


def _rebuild_from_cpu(data: Any, *_: Any) -> Any:
    return data


_TORCH_FUNCS: dict[str, Callable[..., Any]] = {
    "torch._utils._rebuild_tensor": _rebuild_tensor_v2,
    "torch._utils._rebuild_tensor_v2": _rebuild_tensor_v2,
    "torch._utils._rebuild_tensor_v3": _rebuild_tensor_v3,
    "torch._utils._rebuild_parameter": _rebuild_parameter,
    "torch._utils._rebuild_parameter_with_state": _rebuild_parameter,
    "torch._tensor._rebuild_from_type": _rebuild_from_type,
    "torch._tensor._rebuild_from_type_v2": _rebuild_from_type,
    "torch._utils._rebuild_meta_tensor_no_storage": _rebuild_meta,
    "torch._utils._rebuild_device_tensor_from_numpy": _rebuild_from_numpy,
    "torch._utils._rebuild_device_tensor_from_cpu_tensor": _rebuild_from_cpu,
}


def _np_scalar(dtype: Any, data: Any = None) -> Any:
    if isinstance(dtype, np.dtype) and dtype.kind in "biufcSUV" and isinstance(data, bytes):
        if len(data) != dtype.itemsize:
            raise pickle.UnpicklingError("numpy scalar of the wrong size")
        return np.frombuffer(data, dtype=dtype, count=1)[0]
    if isinstance(dtype, np.dtype) and dtype.kind == "O":
        return data
    raise pickle.UnpicklingError("numpy scalar with an unsupported dtype")


def _np_dtype(obj: Any, *flags: Any) -> np.dtype[Any]:
    if not isinstance(obj, str):
        raise pickle.UnpicklingError("numpy dtype from a non-string")
    return np.dtype(obj)


def _np_reconstruct(subtype: Any, shape: Any, dtype: Any) -> Any:
    # ndarray.__setstate__ (called by BUILD next) fills it; object arrays hold already-unpickled objects.
    if subtype is not np.ndarray:
        raise pickle.UnpicklingError("numpy array of a subclass")
    return np.ndarray.__new__(np.ndarray, (0,), "b")


def _latin1(text: Any, encoding: Any = "latin1") -> bytes:
    # Protocol 2 pickles bytes as _codecs.encode(str, "latin1").
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise pickle.UnpicklingError("_codecs.encode with unexpected arguments")
    return text.encode("latin1")


def _container(kind: type) -> Callable[..., Any]:
    def build(items: Any = ()) -> Any:
        if not isinstance(items, list | tuple | set | frozenset | dict | str | bytes):
            raise pickle.UnpicklingError(f"{kind.__name__} from {type(items).__name__}")
        return kind(items)

    return build


def _path(*parts: Any) -> str:
    if not all(isinstance(p, str) for p in parts):
        raise pickle.UnpicklingError("path from non-strings")
    return str(PurePosixPath(*parts))


def _device(*args: Any) -> torch.device:
    if not all(isinstance(a, str | int) for a in args):
        raise pickle.UnpicklingError("torch.device from unexpected arguments")
    return torch.device(*args)


def _reconstructor(cls: Any, base: Any, state: Any) -> Any:
    if isinstance(cls, type) and issubclass(cls, InertObject):
        if isinstance(base, type) and issubclass(base, InertObject):
            # copyreg runs base.__init__(obj, state) unless base is object: a call of base (Popen's runs a command)
            _record_call(base.qualname())
        return cls.__new__(cls, base, state)
    raise pickle.UnpicklingError("copyreg._reconstructor of a real class")


_SAFE_FUNCS: dict[str, Callable[..., Any]] = {
    **_TORCH_FUNCS,
    "collections.OrderedDict": OrderedDict,
    "collections.defaultdict": lambda *_: {},
    "builtins.set": _container(set),
    "builtins.frozenset": _container(frozenset),
    "builtins.bytearray": _container(bytearray),
    "builtins.bytes": _container(bytes),
    "builtins.list": _container(list),
    "builtins.tuple": _container(tuple),
    "builtins.dict": _container(dict),
    "builtins.complex": lambda re=0.0, im=0.0: complex(float(re), float(im)),
    "builtins.slice": lambda *a: slice(*(x if x is None or type(x) is int else None for x in a)),
    "_codecs.encode": _latin1,
    "copyreg._reconstructor": _reconstructor,
    "numpy.core.multiarray.scalar": _np_scalar,
    "numpy._core.multiarray.scalar": _np_scalar,
    "numpy.dtype": _np_dtype,
    "numpy.core.multiarray._reconstruct": _np_reconstruct,
    "numpy._core.multiarray._reconstruct": _np_reconstruct,
    "numpy.ndarray": np.ndarray,
    "torch.device": _device,
    "torch.Size": lambda dims=(): torch.Size(_ints(dims, "size")),
    "datetime.datetime": _dt.datetime,
    "datetime.date": _dt.date,
    "datetime.time": _dt.time,
    "datetime.timedelta": _dt.timedelta,
    "datetime.timezone": _dt.timezone,
    "pathlib.PosixPath": _path,
    "pathlib.PurePosixPath": _path,
    "pathlib.Path": _path,
    "pathlib.WindowsPath": lambda *p: str(PureWindowsPath(*map(str, p))),
    "pathlib.PureWindowsPath": lambda *p: str(PureWindowsPath(*map(str, p))),
}
"""Globals the reader calls for real: each takes plain data only and runs no code named by the file."""


class InertUnpickler(pickle.Unpickler):
    """Unpickles without importing or calling anything the pickle names, except vetted rebuilders.

    Attributes:
        globals: every global resolved, as ``module.name``, in first-seen order.
        called: the globals the pickle called (REDUCE, INST, OBJ of a record class, a reconstructor's base).
    """

    def __init__(self, file: io.BufferedIOBase | io.BytesIO, load_storage: LoadStorage | None = None) -> None:
        super().__init__(file, encoding="latin1")
        self.globals: dict[str, None] = {}
        self.called: dict[str, None] = {}
        self._load_storage = load_storage
        self._storages: dict[str, Storage] = {}

    def find_class(self, module: str, name: str) -> Any:
        # Protocol 2 (torch.save's) names Python 2 modules (__builtin__, copy_reg); map them like pickle does.
        module, name = _compat_pickle.NAME_MAPPING.get((module, name), (module, name))
        module = _compat_pickle.IMPORT_MAPPING.get(module, module)
        qualname = f"{module}.{name}"
        self.globals[qualname] = None
        func = _SAFE_FUNCS.get(qualname)
        if func is not None:
            return func
        if module == "torch":
            if name in _STORAGE_DTYPES:
                return StorageType(_STORAGE_DTYPES[name])
            value = getattr(torch, name, None)
            if isinstance(value, torch.dtype | torch.layout | torch.memory_format):
                return value
        if qualname == "torch.storage.UntypedStorage":
            return StorageType(torch.uint8)
        return inert_class(module, name)

    def load(self) -> Any:
        """Unpickle, recording called globals in :attr:`called` (and in an enclosing :func:`recording_calls`)."""
        outer = _CALLS.get()
        token = _CALLS.set(self.called)
        try:
            return super().load()
        finally:
            _CALLS.reset(token)
            if outer is not None:
                outer.update(self.called)

    def persistent_load(self, pid: Any) -> Any:
        if not isinstance(pid, tuple) or not pid or pid[0] != "storage" or len(pid) < 5:
            kind = pid[0] if isinstance(pid, tuple) and pid else pid
            cls = inert_class("persistent", str(kind)[:40])
            return cls.__new__(cls)  # a record, not a call: persistent ids are not globals
        storage_type, key, _location, numel = pid[1:5]
        if not isinstance(storage_type, StorageType) or type(numel) is not int or numel < 0:
            raise pickle.UnpicklingError(f"bad storage reference {pid!r:.120}")
        view = pid[5] if len(pid) > 5 else None
        key = str(key)
        storage = self._storages.get(key)
        if storage is None:
            if self._load_storage is None:
                raise pickle.UnpicklingError("storage outside a checkpoint container")
            storage = Storage(self._load_storage(key, storage_type.dtype, numel))
            self._storages[key] = storage
        if view is not None:  # legacy format: (view_key, offset, size) into the root storage
            view_key, offset, size = view
            if type(offset) is not int or type(size) is not int or offset < 0 or offset + size > storage.flat.numel():
                raise pickle.UnpicklingError("storage view outside its storage")
            return self._storages.setdefault(str(view_key), Storage(storage.flat[offset : offset + size]))
        return storage

