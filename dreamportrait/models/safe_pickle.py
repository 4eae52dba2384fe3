"""Reading EG3D/StyleGAN network pickles without running the code inside them.

Those pickles hold each network as ``torch_utils.persistence`` objects: the Python source of its
module (executed by EG3D's own loader) plus the object's state. :func:`load_network_pickle`
rebuilds only data: tensors (through ``torch.load(weights_only=True)``), numpy arrays and scalars,
and plain containers. A persistent object or a ``torch.nn`` module becomes a :class:`PickledObject`
record of its class name and state; its source is never compiled. Any other global the pickle asks
for is refused with :class:`UnsafePickleError`.
"""

from __future__ import annotations

import collections
import io
import pickle
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


def _reconstruct_persistent_obj(meta) -> PickledObject:
    """Stand-in for ``torch_utils.persistence._reconstruct_persistent_obj``: keeps the class name and
    state, drops the module source that EG3D would execute."""
    if not isinstance(meta, Mapping) or meta.get("type") != "class" or "state" not in meta:
        raise UnsafePickleError("a torch_utils.persistence object without the expected class metadata")
    return PickledObject(str(meta.get("class_name", "")), meta["state"])


def _load_from_bytes(data: bytes):
    """Stand-in for ``torch.storage._load_from_bytes`` (which would unpickle without restriction)."""
    return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)


def _record_class(module: str, name: str) -> type:
    """A :class:`PickledObject` subclass standing in for the ``torch.nn`` class ``module.name``."""
    return type(name, (PickledObject,), {"class_name": f"{module}.{name}"})


_DATA_GLOBALS = {
    ("torch._utils", "_rebuild_tensor_v2"): torch._utils._rebuild_tensor_v2,
    ("torch._utils", "_rebuild_parameter"): torch._utils._rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): torch._utils._rebuild_parameter_with_state,
    ("torch.storage", "_load_from_bytes"): _load_from_bytes,
    ("torch_utils.persistence", "_reconstruct_persistent_obj"): _reconstruct_persistent_obj,
    ("dnnlib.util", "EasyDict"): EasyDict,
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("builtins", "set"): set,
    ("builtins", "frozenset"): frozenset,
    ("builtins", "slice"): slice,
    ("builtins", "complex"): complex,
    ("builtins", "bytearray"): bytearray,
    ("numpy", "dtype"): np.dtype,
    ("numpy", "ndarray"): np.ndarray,
}
_NUMPY_MULTIARRAY = np._core.multiarray if hasattr(np, "_core") else np.core.multiarray
for _numpy_core in ("numpy.core.multiarray", "numpy._core.multiarray"):  # numpy 1 and 2 spell it differently
    _DATA_GLOBALS[(_numpy_core, "_reconstruct")] = _NUMPY_MULTIARRAY._reconstruct
    _DATA_GLOBALS[(_numpy_core, "scalar")] = _NUMPY_MULTIARRAY.scalar
for _dtype_name in ("float16", "float32", "float64", "bfloat16", "int8", "int16", "int32", "int64", "uint8", "bool"):
    _DATA_GLOBALS[("torch", _dtype_name)] = getattr(torch, _dtype_name)
_TORCH_MODULES = "torch.nn.modules."


class RestrictedUnpickler(pickle.Unpickler):
    """An unpickler whose globals are only the data constructors above and record stand-ins."""

    def find_class(self, module: str, name: str):
        if (module, name) in _DATA_GLOBALS:
            return _DATA_GLOBALS[(module, name)]
        if module.startswith(_TORCH_MODULES) and name.isidentifier() and name[0].isupper():
            return _record_class(module, name)
        raise UnsafePickleError(
            f"refusing to load {module}.{name}: the pickle may only hold tensors, numpy arrays, plain containers "
            f"and EG3D network objects (their embedded code is never run)"
        )

    def persistent_load(self, pid):
        raise UnsafePickleError(f"refusing persistent id {pid!r}: not an EG3D network pickle")


def load_network_pickle(path: str | Path) -> dict:
    """The top-level dict of an EG3D/StyleGAN network pickle (``G``, ``D``, ``G_ema``, ...), networks
    as :class:`PickledObject` records. Raises :class:`UnsafePickleError` for anything but data."""
    with open(path, "rb") as file:
        data = RestrictedUnpickler(file).load()
    if not isinstance(data, Mapping):
        raise UnsafePickleError(f"{path}: expected a dict of networks at the top level, got {type(data).__name__}")
    return dict(data)
