"""Reading EG3D/StyleGAN network pickles without running the code inside them.

EG3D's training loop writes a snapshot with ``pickle.dump`` of ``{G, D, G_ema, augment_pipe,
training_set_kwargs}``. Its networks are ``torch_utils.persistence`` objects (the Python source of
their module, which EG3D's own loader executes, plus the object's state); a few submodules are
plain classes pickled by module path (the renderer, ray marcher, ray sampler and tri-plane
decoder, :data:`EG3D_PLAIN_CLASSES`). :func:`load_network_pickle` rebuilds only data:

- tensors (their storages through ``torch.load(weights_only=True)``, after checking that every
  storage they declare fits in the bytes the file holds), numpy arrays and scalars, plain containers;
- a persistent object, a ``torch.nn`` module or one of EG3D's plain submodules becomes a
  :class:`PickledObject` record of its class name and state; no source is compiled, no class of
  the pickle is imported;
- any other global is refused with :class:`UnsafePickleError`.

The file also cannot make the loader allocate much more than its own size (every size it declares
is checked against what is left of it), and it can only set state on the objects the loader
creates for it (BUILD on anything else, the allowed functions and classes included, is refused).
"""

from __future__ import annotations

import collections
import io
import math
import os
import pickle
import struct
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch


class UnsafePickleError(pickle.UnpicklingError):
    """The pickle asks for something other than data."""


class PickledObject:
    """What a pickled network or module was: its class name and its state (``__dict__``)."""

    class_name = ""
    state: dict = {}

    def __init__(self, class_name: str = "", state: Mapping | None = None):
        self.class_name = class_name
        self.state = dict(state or {})

    def __setstate__(self, state) -> None:  # BUILD of an object created by NEWOBJ
        self.state = dict(state) if isinstance(state, Mapping) else {"__state__": state}

    def __repr__(self) -> str:
        return f"PickledObject({self.class_name!r})"

    def named_tensors(self, prefix: str = "") -> dict[str, torch.Tensor]:
        """Parameters and persistent buffers of this module tree, keyed as in ``state_dict()``."""
        tensors = {}
        non_persistent = set(self.state.get("_non_persistent_buffers_set", ()))
        for group in ("_parameters", "_buffers"):
            for name, value in (self.state.get(group) or {}).items():
                if value is not None and name not in non_persistent:
                    tensors[prefix + name] = value.detach() if isinstance(value, torch.Tensor) else value
        for name, child in (self.state.get("_modules") or {}).items():
            if isinstance(child, PickledObject):
                tensors.update(child.named_tensors(f"{prefix}{name}."))
        return tensors


class EasyDict(dict):
    """Stand-in for ``dnnlib.util.EasyDict`` (a dict with attribute access in EG3D)."""


EG3D_PLAIN_CLASSES = frozenset({
    ("training.volumetric_rendering.renderer", "ImportanceRenderer"),
    ("training.volumetric_rendering.ray_marcher", "MipRayMarcher2"),
    ("training.volumetric_rendering.ray_sampler", "RaySampler"),
    ("training.triplane", "OSGDecoder"),
})
"""EG3D's submodules that are not persistent classes: a snapshot names them by module path, and
they load as :class:`PickledObject` records (never imported)."""

_TORCH_MODULES = "torch.nn.modules."
_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C  # torch.save's legacy (non-zip) format starts with this number
_LEGACY_PROTOCOL = 1001


def _reconstruct_persistent_obj(meta) -> PickledObject:
    """Stand-in for ``torch_utils.persistence._reconstruct_persistent_obj``: keeps the class name and
    state, drops the module source that EG3D would execute."""
    if not isinstance(meta, Mapping) or meta.get("type") != "class" or "state" not in meta:
        raise UnsafePickleError("a torch_utils.persistence object without the expected class metadata")
    state = meta["state"]
    if state is not None and not isinstance(state, Mapping):
        raise UnsafePickleError("a torch_utils.persistence object whose state is not a dict")
    return PickledObject(str(meta.get("class_name", "")), state)


_STORAGE_DTYPES = {f"{prefix}Storage": dtype for prefix, dtype in (
    ("Half", torch.float16), ("Float", torch.float32), ("Double", torch.float64), ("BFloat16", torch.bfloat16),
    ("Char", torch.int8), ("Short", torch.int16), ("Int", torch.int32), ("Long", torch.int64), ("Byte", torch.uint8),
    ("Bool", torch.bool))}
"""The storage classes a legacy ``torch.save`` stream names, and their element types."""


class _StorageType:
    """What a storage class named in a storage header stands for: only its dtype (a fresh object
    per name, so a BUILD in the header can touch nothing else)."""

    def __init__(self, dtype: torch.dtype):
        self.dtype = dtype


class _StorageHeader(pickle.Unpickler):
    """Reads the object pickle of a legacy ``torch.save`` stream only to learn which storages it
    declares (type and element count); nothing is constructed."""

    def __init__(self, file):
        super().__init__(file)
        self.declared: dict[str, tuple[torch.dtype, int]] = {}

    def find_class(self, module, name):
        if module == "torch" and name in _STORAGE_DTYPES:
            return _StorageType(_STORAGE_DTYPES[name])
        raise UnsafePickleError(f"refusing to load {module}.{name} inside a tensor storage")

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) >= 5 and pid[0] == "storage" and isinstance(pid[1], _StorageType)
                and isinstance(pid[2], str)
                and isinstance(pid[4], int) and not isinstance(pid[4], bool) and pid[4] >= 0):
            raise UnsafePickleError(f"unexpected storage record {pid!r} inside a tensor storage")
        if not isinstance(pid[1].dtype, torch.dtype):
            raise UnsafePickleError("a tensor storage of an unknown type")
        self.declared[pid[2]] = (pid[1].dtype, pid[4])
        return None


def _check_legacy_storage(data: bytes) -> None:
    """Every storage a legacy ``torch.save`` stream declares must fit in the bytes that follow it,
    since torch allocates the declared size before reading."""
    stream = io.BytesIO(data)
    try:
        if _StorageHeader(stream).load() != _LEGACY_MAGIC or _StorageHeader(stream).load() != _LEGACY_PROTOCOL:
            raise UnsafePickleError("a tensor storage that is not in torch.save's format")
        _StorageHeader(stream).load()  # system info: a dict of ints
        header = _StorageHeader(stream)
        header.load()
        keys = _StorageHeader(stream).load()
    except (EOFError, ValueError, TypeError, struct.error, pickle.UnpicklingError) as error:
        if isinstance(error, UnsafePickleError):
            raise
        raise UnsafePickleError(f"a damaged tensor storage: {error}") from None
    if not isinstance(keys, list) or sorted(keys) != sorted(header.declared):
        raise UnsafePickleError("a tensor storage whose records do not match its data")
    for key in keys:
        dtype, declared = header.declared[key]
        size = stream.read(8)
        if len(size) != 8 or struct.unpack("<q", size)[0] != declared:
            raise UnsafePickleError("a tensor storage whose size does not match its declaration")
        nbytes = declared * torch.empty((), dtype=dtype).element_size()
        if nbytes > len(data) - stream.tell():
            raise UnsafePickleError(f"a tensor storage declares {nbytes} bytes but the file holds fewer")
        stream.seek(nbytes, io.SEEK_CUR)


def _load_from_bytes(data):
    """Stand-in for ``torch.storage._load_from_bytes`` (which would unpickle without restriction)."""
    if not isinstance(data, (bytes, bytearray)):
        raise UnsafePickleError(f"a tensor storage must be bytes, got {type(data).__name__}")
    if not bytes(data[:2]) == b"PK":  # the zip format's reader checks record sizes itself
        _check_legacy_storage(bytes(data))
    return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad, backward_hooks, metadata=None):
    """``torch._utils._rebuild_tensor_v2`` for a view that lies inside its storage (torch would grow
    the storage to fit a larger view)."""
    if not isinstance(storage, torch.storage.TypedStorage):
        raise UnsafePickleError(f"a tensor whose storage is a {type(storage).__name__}")
    ints = (storage_offset, *size, *stride) if isinstance(size, tuple) and isinstance(stride, tuple) else None
    if ints is None or len(size) != len(stride) or not all(type(value) is int and value >= 0 for value in ints):
        raise UnsafePickleError(f"a tensor with an invalid view: offset {storage_offset!r}, size {size!r}, "
                                f"stride {stride!r}")
    if all(size):
        extent = storage_offset + 1 + sum((length - 1) * step for length, step in zip(size, stride))
        elements = storage._untyped_storage.nbytes() // torch._utils._element_size(storage.dtype)
        if extent > elements:
            raise UnsafePickleError(f"a tensor view reaching element {extent} of a storage of {elements}")
    if not isinstance(backward_hooks, Mapping) or backward_hooks or not isinstance(requires_grad, bool):
        raise UnsafePickleError("a tensor with backward hooks or an invalid requires_grad")
    if metadata is not None and not isinstance(metadata, Mapping):
        raise UnsafePickleError("a tensor with invalid metadata")
    return torch._utils._rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad,
                                           collections.OrderedDict(), metadata)


def _rebuild_parameter(data, requires_grad, backward_hooks):
    if not isinstance(data, torch.Tensor) or not isinstance(requires_grad, bool):
        raise UnsafePickleError("a parameter that does not wrap a tensor")
    return torch.nn.Parameter(data, requires_grad)


def _rebuild_parameter_with_state(data, requires_grad, backward_hooks, state):
    if state:  # torch records a parameter's extra attributes here; a network's have none
        raise UnsafePickleError("a parameter with extra attributes")
    return _rebuild_parameter(data, requires_grad, backward_hooks)


def _record_class(module: str, name: str) -> type:
    """A :class:`PickledObject` subclass standing in for the class ``module.name``."""
    return type(name, (PickledObject,), {"class_name": f"{module}.{name}"})


def _numpy_dtype(obj, align=False, copy=False):
    """``numpy.dtype`` always as a new object (the interned ones are shared by the whole process and a
    pickle sets a dtype's state)."""
    return np.dtype(obj, bool(align), True)


_NUMPY_MULTIARRAY = np._core.multiarray if hasattr(np, "_core") else np.core.multiarray
_TORCH_DTYPES = ("float16", "float32", "float64", "bfloat16", "int8", "int16", "int32", "int64", "uint8", "bool")


class RestrictedUnpickler(pickle._Unpickler):
    """An unpickler whose globals are only data constructors and record stand-ins, which reads no
    more than the file holds, lets the file allocate no more than its own size, and applies state
    (BUILD) only to the records, dicts and arrays it created itself.

    It is the pure-Python unpickler (whose opcodes can be overridden); EG3D pickles are few large
    byte strings, so its speed hardly matters.
    """

    def __init__(self, file, size: int):
        super().__init__(file)
        self._budget = size  # bytes the file may still make us allocate beyond what it holds
        self._created: dict[int, object] = {}  # objects this load made; kept alive so ids stay unique
        self._records: dict[tuple[str, str], type] = {}
        self._globals = {
            ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
            ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
            ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter_with_state,
            ("torch.storage", "_load_from_bytes"): _load_from_bytes,
            ("torch_utils.persistence", "_reconstruct_persistent_obj"): _reconstruct_persistent_obj,
            ("dnnlib.util", "EasyDict"): EasyDict,
            ("collections", "OrderedDict"): collections.OrderedDict,
            ("builtins", "set"): set,
            ("builtins", "frozenset"): frozenset,
            ("builtins", "slice"): slice,
            ("builtins", "complex"): complex,
            ("builtins", "bytearray"): self._bytearray,
            ("numpy", "dtype"): _numpy_dtype,
            ("numpy", "ndarray"): np.ndarray,
        }
        for core in ("numpy.core.multiarray", "numpy._core.multiarray"):  # numpy 1 and 2 spell it differently
            self._globals[(core, "_reconstruct")] = self._numpy_reconstruct
            self._globals[(core, "scalar")] = _NUMPY_MULTIARRAY.scalar
        for name in _TORCH_DTYPES:
            self._globals[("torch", name)] = getattr(torch, name)
        self._callables = {id(value) for key, value in self._globals.items() if key != ("numpy", "ndarray")
                           and not isinstance(value, torch.dtype)}
        self._containers = (EasyDict, collections.OrderedDict)

    # Allocation bounds -------------------------------------------------------------------------
    def _spend(self, nbytes: int, what: str) -> None:
        if nbytes > self._budget:
            raise UnsafePickleError(f"refusing {what} of {nbytes} bytes: more than the pickle's own size allows")
        self._budget -= nbytes

    def _bytearray(self, *args):
        if args and isinstance(args[0], int) and not isinstance(args[0], bool):
            if args[0] < 0:
                raise UnsafePickleError("refusing bytearray of a negative size")
            self._spend(args[0], "bytearray")
        elif args and not isinstance(args[0], (bytes, bytearray, str)):
            raise UnsafePickleError(f"refusing bytearray of a {type(args[0]).__name__}")
        return bytearray(*args)

    def _numpy_reconstruct(self, subtype, shape, dtype):
        if subtype is not np.ndarray:
            raise UnsafePickleError(f"refusing to reconstruct a numpy {subtype!r}")
        shape = (shape,) if isinstance(shape, int) else shape
        if not isinstance(shape, tuple) or not all(type(n) is int and n >= 0 for n in shape):
            raise UnsafePickleError(f"refusing a numpy array of shape {shape!r}")
        self._spend(math.prod(shape) * np.dtype(dtype).itemsize, "a numpy array")
        return _NUMPY_MULTIARRAY._reconstruct(np.ndarray, shape, dtype)

    # Globals -------------------------------------------------------------------------------------
    def find_class(self, module: str, name: str):
        if (module, name) in self._globals:
            return self._globals[(module, name)]
        if ((module.startswith(_TORCH_MODULES) and name.isidentifier() and name[0].isupper())
                or (module, name) in EG3D_PLAIN_CLASSES):
            if (module, name) not in self._records:
                self._records[(module, name)] = _record_class(module, name)
            return self._records[(module, name)]
        raise UnsafePickleError(
            f"refusing to load {module}.{name}: the pickle may only hold tensors, numpy arrays, plain containers "
            f"and EG3D network objects (their embedded code is never run)"
        )

    def persistent_load(self, pid):
        raise UnsafePickleError(f"refusing persistent id {pid!r}: not an EG3D network pickle")

    # Opcodes that call, create or mutate ---------------------------------------------------------
    def _made(self, value):
        self._created[id(value)] = value
        return value

    def _load_reduce(self):
        args = self.stack.pop()
        func = self.stack[-1]
        if id(func) not in self._callables or not isinstance(args, tuple):
            raise UnsafePickleError(f"refusing to call {getattr(func, '__name__', type(func).__name__)} while loading")
        self.stack[-1] = self._made(func(*args))

    def _new(self, cls, args, kwargs):
        is_record = isinstance(cls, type) and issubclass(cls, PickledObject) and cls in self._records.values()
        if not (is_record or cls in self._containers) or args or kwargs:
            raise UnsafePickleError(f"refusing to create {getattr(cls, '__name__', type(cls).__name__)} while loading")
        self.append(self._made(cls.__new__(cls)))

    def _load_newobj(self):
        args = self.stack.pop()
        cls = self.stack.pop()
        self._new(cls, args, {})

    def _load_newobj_ex(self):
        kwargs = self.stack.pop()
        args = self.stack.pop()
        cls = self.stack.pop()
        self._new(cls, args, kwargs)

    def _load_old_instance(self):
        raise UnsafePickleError("refusing protocol-0 instance creation (OBJ/INST): not an EG3D network pickle")

    def _load_build(self):
        state = self.stack.pop()
        inst = self.stack[-1]
        if self._created.get(id(inst)) is not inst or not isinstance(
                inst, (PickledObject, EasyDict, collections.OrderedDict, np.ndarray, np.dtype)):
            raise UnsafePickleError(f"refusing to set the state of a {type(inst).__name__} the pickle did not create")
        if isinstance(inst, (PickledObject, np.ndarray, np.dtype)):
            inst.__setstate__(state)
            return
        if not isinstance(state, Mapping) or not all(isinstance(key, str) for key in state):
            raise UnsafePickleError(f"refusing a {type(inst).__name__} state that is not a dict of names")
        inst.__dict__.update(state)

    def _load_bytearray8(self):
        (size,) = struct.unpack("<Q", self.read(8))
        self._spend(size, "BYTEARRAY8")
        self._budget += size  # the bytes themselves are read from the file (and checked there)
        self.append(bytearray(self.read(size)))

    def _refuse_out_of_band(self):
        raise UnsafePickleError("refusing out-of-band buffers: not an EG3D network pickle")

    def _refuse_extension(self):
        raise UnsafePickleError("refusing copyreg extension codes: not an EG3D network pickle")

    dispatch = dict(pickle._Unpickler.dispatch)
    dispatch[pickle.REDUCE[0]] = _load_reduce
    dispatch[pickle.NEWOBJ[0]] = _load_newobj
    dispatch[pickle.NEWOBJ_EX[0]] = _load_newobj_ex
    dispatch[pickle.OBJ[0]] = _load_old_instance
    dispatch[pickle.INST[0]] = _load_old_instance
    dispatch[pickle.BUILD[0]] = _load_build
    dispatch[pickle.BYTEARRAY8[0]] = _load_bytearray8
    dispatch[pickle.NEXT_BUFFER[0]] = _refuse_out_of_band
    dispatch[pickle.READONLY_BUFFER[0]] = _refuse_out_of_band
    for _opcode in (pickle.EXT1, pickle.EXT2, pickle.EXT4):
        dispatch[_opcode[0]] = _refuse_extension
    del _opcode


class _BoundedFile:
    """A binary file whose ``read(n)`` refuses to ask for more than is left (so a size written in
    the file can never make the reader allocate beyond the file's own size)."""

    def __init__(self, file, size: int):
        self._file, self._left = file, size

    def read(self, n: int = -1) -> bytes:
        if n is None or n < 0:
            n = self._left
        if n > self._left:
            raise UnsafePickleError(f"the pickle is truncated or damaged: it asks for {n} bytes where "
                                    f"{self._left} remain")
        data = self._file.read(n)
        self._left -= len(data)
        return data

    def readline(self) -> bytes:
        data = self._file.readline(self._left)
        self._left -= len(data)
        return data

    def readinto(self, buffer) -> int:
        data = self.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)


def load_network_pickle(path: str | Path) -> dict:
    """The top-level dict of an EG3D/StyleGAN network pickle (``G``, ``D``, ``G_ema``, ...), networks
    as :class:`PickledObject` records. Raises :class:`UnsafePickleError` for anything but data and
    :class:`pickle.UnpicklingError` for an empty, truncated or damaged file."""
    with open(path, "rb") as file:
        size = os.fstat(file.fileno()).st_size
        if size == 0:
            raise pickle.UnpicklingError(f"{path} is empty: not a network pickle")
        try:
            data = RestrictedUnpickler(_BoundedFile(file, size), size).load()
        except pickle.UnpicklingError as error:
            if isinstance(error, UnsafePickleError):
                raise UnsafePickleError(f"{path}: {error}") from None
            raise pickle.UnpicklingError(f"{path} is damaged (not a readable pickle): {error}") from None
        except (EOFError, ValueError, TypeError, KeyError, IndexError, AttributeError, struct.error,
                RuntimeError, MemoryError, OverflowError, RecursionError) as error:
            message = str(error) or type(error).__name__
            raise pickle.UnpicklingError(f"{path} is damaged or not a network pickle: {message}") from None
    if not isinstance(data, Mapping):
        raise UnsafePickleError(f"{path}: expected a dict of networks at the top level, got {type(data).__name__}")
    return dict(data)


__all__ = ["EG3D_PLAIN_CLASSES", "EasyDict", "PickledObject", "RestrictedUnpickler", "UnsafePickleError",
           "load_network_pickle"]
