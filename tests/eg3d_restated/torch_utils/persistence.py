"""How EG3D's ``torch_utils.persistence`` pickles a decorated network, re-stated.

A class wrapped by :func:`persistent_class` remembers its constructor arguments and pickles as a
call ``_reconstruct_persistent_obj(meta)`` where ``meta`` holds the source code of the class's
module (``module_src``), the class name and the object's state (its ``__dict__``). Unpickling
with EG3D's loader executes ``module_src`` in a fresh module and rebuilds the object from it;
``copy.deepcopy`` goes through the same path. :data:`RECONSTRUCTIONS` counts those rebuilds.
"""

import copy
import inspect
import sys

import dnnlib

VERSION = 6
RECONSTRUCTIONS = []  # one entry per _reconstruct_persistent_obj call
_module_source = {}  # module -> its source
_source_module = {}  # source -> module (EG3D executes unknown sources into new modules)
_wrapped = {}  # original class -> persistent subclass


def persistent_class(cls):
    if cls in _wrapped.values():
        return cls
    if cls in _wrapped:
        return _wrapped[cls]
    module = sys.modules[cls.__module__]
    source = _module_source.get(module)
    if source is None:
        source = inspect.getsource(module)
        _module_source[module], _source_module[source] = source, module

    class Persistent(cls):
        _orig_module_src = source
        _orig_class_name = cls.__name__

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self._init_args = copy.deepcopy(args)
            self._init_kwargs = copy.deepcopy(kwargs)

        @property
        def init_kwargs(self):
            return dnnlib.EasyDict(copy.deepcopy(self._init_kwargs))

        def __reduce__(self):
            parts = list(super().__reduce__())
            parts += [None] * max(3 - len(parts), 0)
            if parts[0] is not _reconstruct_persistent_obj:
                meta = dict(type="class", version=VERSION, module_src=self._orig_module_src,
                            class_name=self._orig_class_name, state=parts[2])
                parts[0], parts[1], parts[2] = _reconstruct_persistent_obj, (meta,), None
            return tuple(parts)

    Persistent.__name__ = Persistent.__qualname__ = cls.__name__
    _wrapped[cls] = Persistent
    return Persistent


def _reconstruct_persistent_obj(meta):
    RECONSTRUCTIONS.append(meta["class_name"])
    meta = dnnlib.EasyDict(meta)
    assert meta.version == VERSION and meta.type == "class"
    module = _source_module.get(meta.module_src)
    if module is None:  # what makes EG3D's pickles unsafe: a pickle's own source is executed
        raise AssertionError("this re-statement never executes a pickle's module_src")
    obj_class = persistent_class(module.__dict__[meta.class_name])
    obj = obj_class.__new__(obj_class)
    setstate = getattr(obj, "__setstate__", None)
    if callable(setstate):
        setstate(dnnlib.EasyDict(meta.state))
    else:
        obj.__dict__.update(meta.state)
    return obj
