"""The EG3D importer's allowed globals, pinned as an exact reviewed list, and escape attempts through
each thing that list allows: hand-written pickles (raw opcodes) that try getattr/setattr routes,
BUILD on allowed classes and functions, and the ``__reduce__`` calls of the allowed types."""

import collections
import importlib
import io
import pickle
import struct
import warnings

import numpy as np
import pytest
import torch

from dreamportrait.models import safe_pickle
from dreamportrait.models.safe_pickle import (EG3D_PLAIN_CLASSES, PickledObject, RestrictedUnpickler,
                                              UnsafePickleError, load_network_pickle)

# The reviewed list: data constructors and the stand-ins of EG3D's own loaders. Adding to it needs a
# review of what the new global can call or reach (getattr, setattr, eval, exec, __import__, a
# loader that unpickles without restriction, ... must never appear here).
ALLOWED = {
    ("torch._utils", "_rebuild_tensor_v2"),
    ("torch._utils", "_rebuild_parameter"),
    ("torch._utils", "_rebuild_parameter_with_state"),
    ("torch.storage", "_load_from_bytes"),
    ("torch_utils.persistence", "_reconstruct_persistent_obj"),
    ("dnnlib.util", "EasyDict"),
    ("collections", "OrderedDict"),
    ("builtins", "set"),
    ("builtins", "frozenset"),
    ("builtins", "slice"),
    ("builtins", "complex"),
    ("builtins", "bytearray"),
    ("numpy", "dtype"),
    ("numpy", "ndarray"),
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "scalar"),
    *(("torch", name) for name in ("float16", "float32", "float64", "bfloat16", "int8", "int16", "int32", "int64",
                                   "uint8", "bool")),
}
PLAIN_CLASSES = {
    ("training.volumetric_rendering.renderer", "ImportanceRenderer"),
    ("training.volumetric_rendering.ray_marcher", "MipRayMarcher2"),
    ("training.volumetric_rendering.ray_sampler", "RaySampler"),
    ("training.triplane", "OSGDecoder"),
}
DANGEROUS = [("builtins", name) for name in ("getattr", "setattr", "delattr", "eval", "exec", "compile", "__import__",
                                            "open", "globals", "vars", "type", "object", "print", "input",
                                            "breakpoint", "memoryview")] + [
    ("os", "system"), ("posix", "system"), ("nt", "system"), ("subprocess", "Popen"), ("subprocess", "check_output"),
    ("importlib", "import_module"), ("pickle", "loads"), ("torch", "load"), ("torch.serialization", "load"),
    ("numpy", "load"), ("torch._utils", "_rebuild_from_type_v2"), ("torch.storage", "_load_from_bytes_unsafe"),
    ("functools", "partial"), ("operator", "attrgetter"), ("operator", "methodcaller"), ("copyreg", "_reconstructor"),
    ("runpy", "run_path"), ("shutil", "rmtree"), ("codecs", "encode"), ("types", "FunctionType"),
    ("torch_utils.persistence", "persistent_class"), ("dnnlib.util", "call_func_by_name"),
    ("numpy.core.multiarray", "frombuffer"), ("numpy._core.numeric", "_frombuffer"), ("torch", "tensor"),
]
CANDIDATE_MODULES = ["builtins", "collections", "numpy", "numpy.core.multiarray", "numpy._core.multiarray", "torch",
                     "torch._utils", "torch.storage", "os", "sys", "io", "pickle", "functools", "operator", "copyreg",
                     "types", "importlib", "torch.serialization", "torch.nn", "torch.nn.modules.module"]


def unpickler():
    return RestrictedUnpickler(io.BytesIO(b"."), 1)


def accepted(module, name):
    try:
        unpickler().find_class(module, name)
    except UnsafePickleError:
        return False
    return True


def test_the_allowed_globals_are_exactly_the_reviewed_list():
    names = {(module, name) for module in CANDIDATE_MODULES for name in dir(importlib.import_module(module))}
    names |= ALLOWED | PLAIN_CLASSES | set(DANGEROUS)
    names |= {("torch_utils.persistence", n)
              for n in ("_reconstruct_persistent_obj", "persistent_class", "_src_to_module")}
    names |= {("dnnlib.util", n) for n in ("EasyDict", "call_func_by_name", "get_obj_by_name", "open_url")}
    records = {(m, n) for m, n in names if m.startswith("torch.nn.modules.") and n.isidentifier() and n[0].isupper()}
    assert {key for key in names if accepted(*key)} == ALLOWED | PLAIN_CLASSES | records
    assert set(EG3D_PLAIN_CLASSES) == PLAIN_CLASSES


def test_the_allowed_globals_are_the_data_constructors_they_name():
    u = unpickler()
    assert u.find_class("collections", "OrderedDict") is collections.OrderedDict
    assert u.find_class("builtins", "set") is set and u.find_class("builtins", "frozenset") is frozenset
    assert u.find_class("builtins", "slice") is slice and u.find_class("builtins", "complex") is complex
    assert u.find_class("numpy", "ndarray") is np.ndarray
    assert u.find_class("builtins", "bytearray")(b"ab") == bytearray(b"ab")
    assert u.find_class("numpy", "dtype")("f4") == np.dtype("float32")
    for name in ("float16", "float32", "float64", "bfloat16", "int8", "int16", "int32", "int64", "uint8", "bool"):
        assert u.find_class("torch", name) is getattr(torch, name)
    easy = u.find_class("dnnlib.util", "EasyDict")
    assert issubclass(easy, dict) and easy.__module__ == safe_pickle.__name__  # a stand-in, not dnnlib's


@pytest.mark.parametrize("module,name", DANGEROUS)
def test_dangerous_globals_are_refused(module, name):
    with pytest.raises(UnsafePickleError, match="refusing to load"):
        unpickler().find_class(module, name)


@pytest.mark.parametrize("module,name", sorted(ALLOWED | PLAIN_CLASSES))
def test_attribute_paths_through_an_allowed_global_are_refused(module, name):
    # Protocol 4 names nested attributes with dots (STACK_GLOBAL "OrderedDict.__init__"): the getattr route.
    for attribute in ("__init__", "__class__", "__globals__", "__reduce__", "__subclasses__", "__dict__",
                      "__builtins__", "fromkeys", "__setattr__"):
        assert not accepted(module, f"{name}.{attribute}"), f"{module}.{name}.{attribute}"
    assert not accepted(module + ".os", name) and not accepted(module, name + "_")


def test_torch_modules_and_eg3d_plain_classes_become_records_and_are_never_imported():
    u = unpickler()
    for module, name in [("torch.nn.modules.linear", "Linear"), ("torch.nn.modules.evil", "System"), *PLAIN_CLASSES]:
        record = u.find_class(module, name)
        assert issubclass(record, PickledObject) and record.class_name == f"{module}.{name}"
        assert u.find_class(module, name) is record  # one stand-in per name within a load
    assert "torch.nn.modules.evil" not in importlib.sys.modules and "training.triplane" not in importlib.sys.modules
    for module, name in [("torch.nn.modules", "Linear"), ("torch.nn.modulesx.linear", "Linear"),
                         ("torch.nn.modules.linear", "linear"), ("torch.nn.modules.linear", "Linear.__init__"),
                         ("torch.nn", "Linear"), ("training.triplane", "TriPlaneGenerator")]:
        assert not accepted(module, name), (module, name)


# --- escapes through each allowed callable, as hand-written pickles ------------------------------------------


def glob(module, name):
    return b"c" + module.encode() + b"\n" + name.encode() + b"\n"


def text(value):
    data = value.encode()
    return b"X" + struct.pack("<I", len(data)) + data


def binbytes(value):
    return b"B" + struct.pack("<I", len(value)) + value


def load(tmp_path, body):
    """Load ``{"G": <body>}`` written with protocol 2 opcodes."""
    path = tmp_path / "network.pkl"
    path.write_bytes(b"\x80\x02}" + text("G") + body + b"s.")
    return load_network_pickle(path)


def test_the_getattr_and_setattr_routes_are_refused(tmp_path):
    for name in ("getattr", "setattr"):
        body = glob("builtins", name) + b"(" + glob("collections", "OrderedDict") + text("__init__") + b"tR"
        with pytest.raises(UnsafePickleError, match=f"builtins.{name}"):
            load(tmp_path, body)
    # Protocol 4's STACK_GLOBAL with a dotted name walks attributes in the stock unpickler.
    path = tmp_path / "stack.pkl"
    path.write_bytes(b"\x80\x04" + text("collections") + text("OrderedDict.__class__") + b"\x93.")
    with pytest.raises(UnsafePickleError, match="OrderedDict.__class__"):
        load_network_pickle(path)


@pytest.mark.parametrize("module,name", [("collections", "OrderedDict"), ("builtins", "set"), ("numpy", "ndarray"),
                                         ("torch._utils", "_rebuild_tensor_v2"), ("dnnlib.util", "EasyDict"),
                                         ("torch", "float32")])
def test_build_on_an_allowed_class_or_function_itself_is_refused(tmp_path, module, name):
    # BUILD with a dict state on the global would set attributes on the shared class or function.
    before = dict(vars(collections.OrderedDict))
    body = glob(module, name) + b"}" + text("__reduce__") + text("x") + b"sb"
    with pytest.raises(UnsafePickleError):
        load(tmp_path, body)
    assert dict(vars(collections.OrderedDict)) == before and not hasattr(torch.float32, "__reduce_ex_x")


def test_build_on_a_record_keeps_its_state_out_of_its_attributes(tmp_path):
    # NEWOBJ of a record, then BUILD with a state naming its methods: the state is data, not attributes.
    body = (glob("torch.nn.modules.linear", "Linear") + b")\x81" + b"}" + text("named_tensors") + text("x") + b"s"
            + text("__class__") + text("y") + b"sb")
    record = load(tmp_path, body)["G"]
    assert isinstance(record, PickledObject) and record.class_name == "torch.nn.modules.linear.Linear"
    assert record.state == {"named_tensors": "x", "__class__": "y"} and callable(record.named_tensors)
    assert record.named_tensors() == {}


def test_build_with_slot_state_on_a_container_is_refused(tmp_path):
    # (dict state, slot state): the stock unpickler setattr()s the slot state, e.g. __class__.
    body = (glob("dnnlib.util", "EasyDict") + b")\x81" + b"N}" + text("__class__") + glob("collections", "OrderedDict")
            + b"s\x86b")
    with pytest.raises(UnsafePickleError):
        load(tmp_path, body)


def test_creating_anything_but_records_and_containers_is_refused(tmp_path):
    for module, name in [("builtins", "set"), ("numpy", "ndarray"), ("builtins", "complex")]:
        with pytest.raises(UnsafePickleError, match="refusing to create"):
            load(tmp_path, glob(module, name) + b")\x81")
    with pytest.raises(UnsafePickleError, match="refusing to call"):  # ndarray(...) allocates what it is told
        load(tmp_path, glob("numpy", "ndarray") + b"(J\x00\x00\x00\x10tR")
    with pytest.raises(UnsafePickleError, match="refusing to call"):  # a dtype object is not a function
        load(tmp_path, glob("torch", "float32") + b")R")


def test_the_persistent_object_stand_in_never_runs_the_module_source(tmp_path):
    marker = tmp_path / "ran"
    source = f"open({str(marker)!r}, 'w').close()\nclass Net: pass\n"
    meta = (b"}(" + text("type") + text("class") + text("version") + b"K\x04" + text("module_src") + text(source)
            + text("class_name") + text("Net") + text("state") + b"}" + text("w") + b"K\x01" + b"s" + b"u")
    record = load(tmp_path, glob("torch_utils.persistence", "_reconstruct_persistent_obj") + b"(" + meta + b"tR")["G"]
    assert not marker.exists()
    assert isinstance(record, PickledObject) and record.class_name == "Net" and record.state == {"w": 1}
    for bad in (text("not a dict"), b"}(" + text("type") + text("function") + text("state") + b"}u"):
        with pytest.raises(UnsafePickleError, match="persistence object"):
            load(tmp_path, glob("torch_utils.persistence", "_reconstruct_persistent_obj") + b"(" + bad + b"tR")


class _Exploit:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return exec, (f"open({str(self.marker)!r}, 'w').close()",)


@pytest.mark.parametrize("zip_format", [True, False])
def test_tensor_storage_bytes_are_unpickled_with_weights_only(tmp_path, zip_format):
    marker = tmp_path / "ran"
    buffer = io.BytesIO()
    torch.save(_Exploit(marker), buffer, _use_new_zipfile_serialization=zip_format)
    with pytest.raises(pickle.UnpicklingError):
        load(tmp_path, glob("torch.storage", "_load_from_bytes") + b"(" + binbytes(buffer.getvalue()) + b"tR")
    assert not marker.exists()
    # An honest storage loads.
    buffer = io.BytesIO()
    with warnings.catch_warnings():  # EG3D's snapshots hold typed storages
        warnings.simplefilter("ignore")
        torch.save(torch.arange(4.0).storage(), buffer, _use_new_zipfile_serialization=zip_format)
    storage = load(tmp_path, glob("torch.storage", "_load_from_bytes") + b"(" + binbytes(buffer.getvalue()) + b"tR")
    assert list(storage["G"]) == [0.0, 1.0, 2.0, 3.0]


def test_tensors_with_backward_hooks_or_parameter_attributes_are_refused(tmp_path):
    good = torch.nn.Parameter(torch.arange(3.0))
    path = tmp_path / "good.pkl"
    path.write_bytes(pickle.dumps({"G": good}, protocol=4))
    assert torch.equal(load_network_pickle(path)["G"], good)
    # torch no longer pickles hooks, but its rebuild function takes them: a callable torch would call on backward.
    class Hooked(pickle.Pickler):
        def reducer_override(self, obj):
            if obj is marker:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    storage = torch.arange(3.0).storage()
                return torch._utils._rebuild_tensor_v2, (storage, 0, (3,), (1,), False,
                                                         collections.OrderedDict(hook=set))
            return NotImplemented

    marker, buffer = object(), io.BytesIO()
    Hooked(buffer, protocol=4).dump({"G": marker})
    path.write_bytes(buffer.getvalue())
    with pytest.raises(UnsafePickleError, match="backward hooks"):
        load_network_pickle(path)
    attributed = torch.nn.Parameter(torch.arange(3.0))
    attributed.__dict__["extra"] = 1
    path.write_bytes(pickle.dumps({"G": attributed}, protocol=4))
    with pytest.raises(UnsafePickleError, match="extra attributes"):
        load_network_pickle(path)


def test_numpy_arrays_load_but_their_reconstructor_builds_only_plain_arrays(tmp_path):
    path = tmp_path / "arrays.pkl"
    array = np.arange(6, dtype=np.float32).reshape(2, 3)
    path.write_bytes(pickle.dumps({"G": array, "s": np.float64(2.5)}, protocol=4))
    loaded = load_network_pickle(path)
    assert np.array_equal(loaded["G"], array) and loaded["G"].dtype == np.float32 and loaded["s"] == 2.5
    body = (glob("numpy.core.multiarray", "_reconstruct") + b"(" + glob("numpy", "matrix") + b"K\x00" + text("b")
            + b"tR")
    with pytest.raises(UnsafePickleError, match="numpy.matrix"):
        load(tmp_path, body)
    body = (glob("numpy._core.multiarray", "_reconstruct") + b"(" + glob("dnnlib.util", "EasyDict") + b"K\x00"
            + text("b") + b"tR")
    with pytest.raises(UnsafePickleError, match="refusing to reconstruct"):
        load(tmp_path, body)


def test_a_pickled_dtype_cannot_change_numpys_shared_dtypes(tmp_path):
    shared = np.dtype("float32")
    state_before = shared.__reduce__()[2]
    path = tmp_path / "dtype.pkl"
    path.write_bytes(pickle.dumps({"G": np.dtype(">f4")}, protocol=4))
    assert load_network_pickle(path)["G"] == np.dtype(">f4")
    # The same global, built with a state that would make float32 big-endian if it were the shared one.
    body = (glob("numpy", "dtype") + b"(" + text("f4") + b"\x89\x88tR"
            + b"(K\x03" + text(">") + b"NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00tb")
    loaded = load(tmp_path, body)["G"]
    assert loaded.byteorder == ">" and np.dtype("float32").__reduce__()[2] == state_before
    assert np.dtype("float32").byteorder in ("=", "<")
