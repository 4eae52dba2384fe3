"""The EG3D importer's allocation bounds (a pickle cannot make the loader allocate more than the
file's own size), its checked stand-ins for torch's and numpy's constructors, the network records
(named tensors, state) and the opcodes it refuses; each error message pinned whole."""

import collections
import io
import pickle
import struct

import numpy as np
import pytest
import torch

from dreamportrait.models.safe_pickle import PickledObject, RestrictedUnpickler, UnsafePickleError, load_network_pickle


def unpickler(size):
    return RestrictedUnpickler(io.BytesIO(b"."), size)


def refused(message):
    return pytest.raises(UnsafePickleError, match="^" + message + "$")


def test_bytearrays_spend_a_budget_of_the_files_size():
    make = unpickler(100).find_class("builtins", "bytearray")
    assert make(60) == bytearray(60) and make(40) == bytearray(40)  # exactly what is left
    with refused(r"refusing bytearray of 1 bytes: more than the pickle's own size allows"):
        make(1)
    make = unpickler(10).find_class("builtins", "bytearray")
    with refused("refusing bytearray of a negative size"):
        make(-1)
    with refused("refusing bytearray of 11 bytes: more than the pickle's own size allows"):
        make(11)
    assert make(0) == bytearray() and make() == bytearray()
    # Contents already in the file cost nothing.
    assert make(b"0123456789abc") == bytearray(b"0123456789abc") and make("abc", "ascii") == bytearray(b"abc")
    assert make(bytearray(b"xy")) == bytearray(b"xy") and make(10) == bytearray(10)
    for value, name in (([1, 2], "list"), (True, "bool"), (2.0, "float")):
        with refused(f"refusing bytearray of a {name}"):
            make(value)


def test_numpy_arrays_spend_their_bytes_and_only_plain_shapes_are_allowed():
    rebuild = unpickler(64).find_class("numpy._core.multiarray", "_reconstruct")
    array = rebuild(np.ndarray, (2, 3), np.dtype("f8"))  # 48 bytes
    assert isinstance(array, np.ndarray) and array.shape == (2, 3) and array.dtype == np.float64
    assert rebuild(np.ndarray, 2, "f8").shape == (2,)  # an int shape; 16 bytes: 64 spent
    with refused("refusing a numpy array of 1 bytes: more than the pickle's own size allows"):
        rebuild(np.ndarray, (1,), "u1")
    rebuild = unpickler(64).find_class("numpy.core.multiarray", "_reconstruct")
    with refused("refusing a numpy array of 72 bytes: more than the pickle's own size allows"):
        rebuild(np.ndarray, (9,), "f8")  # 9 elements fit in 64 bytes, 9 float64 do not
    assert rebuild(np.ndarray, (0, 5), "f8").shape == (0, 5)
    for shape in ((-1,), (2.0,), [2], (True,), "2"):
        with refused(rf"refusing a numpy array of shape {shape!r}".replace("(", r"\(").replace(")", r"\)")
                     .replace("[", r"\[").replace("]", r"\]")):
            rebuild(np.ndarray, shape, "f8")
    with refused(r"refusing to reconstruct a numpy <class 'numpy.matrix'>"):
        rebuild(np.matrix, (1,), "f8")


def test_parameters_keep_requires_grad_and_refuse_attributes_or_non_tensors():
    u = unpickler(10)
    rebuild, plain = u.find_class("torch._utils", "_rebuild_parameter_with_state"), \
        u.find_class("torch._utils", "_rebuild_parameter")
    data = torch.arange(3.0)
    for requires_grad in (True, False):
        for state in (None, {}):
            parameter = rebuild(data, requires_grad, collections.OrderedDict(), state)
            assert isinstance(parameter, torch.nn.Parameter) and parameter.requires_grad is requires_grad
            assert torch.equal(parameter.detach(), data)
        assert plain(data, requires_grad, collections.OrderedDict()).requires_grad is requires_grad
    with refused("a parameter with extra attributes"):
        rebuild(data, True, collections.OrderedDict(), {"extra": 1})
    for bad_data, bad_flag in (([1.0], True), (data, 1), (data, None)):
        with refused("a parameter that does not wrap a tensor"):
            plain(bad_data, bad_flag, collections.OrderedDict())
        with refused("a parameter that does not wrap a tensor"):
            rebuild(bad_data, bad_flag, collections.OrderedDict(), None)


def test_dtypes_keep_their_alignment_and_are_new_objects():
    make = unpickler(10).find_class("numpy", "dtype")
    fields = [("a", "u1"), ("b", "f8")]
    assert make(fields, True).itemsize == 16 and make(fields, True).isalignedstruct
    assert make(fields).itemsize == 9 and make(fields, False).itemsize == 9
    assert make("f4") == np.dtype("f4") and make("f4") is not np.dtype("f4")


def test_records_name_their_persistent_tensors_as_state_dict_keys():
    weight = torch.nn.Parameter(torch.randn(2, 2))
    child = PickledObject("torch.nn.modules.linear.Linear", {
        "_parameters": {"weight": weight, "bias": None},
        "_buffers": {"running": torch.ones(2), "scratch": torch.zeros(2), "empty": None},
        "_non_persistent_buffers_set": {"scratch"},
        "_modules": {}})
    root = PickledObject("Net", {"_parameters": {"scale": torch.nn.Parameter(torch.tensor(2.0))}, "_buffers": None,
                                 "_modules": {"layer": child, "act": None, "other": "not a record"}})
    tensors = root.named_tensors()
    assert set(tensors) == {"scale", "layer.weight", "layer.running"}
    assert torch.equal(tensors["layer.weight"], weight.detach()) and not tensors["layer.weight"].requires_grad
    assert set(root.named_tensors("G.")) == {"G.scale", "G.layer.weight", "G.layer.running"}
    assert PickledObject().named_tensors() == {} and repr(child) == "PickledObject('torch.nn.modules.linear.Linear')"
    assert PickledObject().class_name == "" and PickledObject().state == {}


def test_record_state_is_a_copy_of_a_dict_or_kept_whole():
    record, state = PickledObject("X"), {"a": 1}
    record.__setstate__(state)
    state["a"] = 2
    assert record.state == {"a": 1} and record.class_name == "X"
    record.__setstate__((1, 2))
    assert record.state == {"__state__": (1, 2)}
    assert PickledObject("Y", None).state == {} and PickledObject("Y", collections.OrderedDict(b=3)).state == {"b": 3}


def glob(module, name):
    return b"c" + module.encode() + b"\n" + name.encode() + b"\n"


def text(value):
    data = value.encode()
    return b"X" + struct.pack("<I", len(data)) + data


def load(tmp_path, body, protocol=b"\x80\x04"):
    path = tmp_path / "network.pkl"
    path.write_bytes(protocol + b"}" + text("G") + body + b"s.")
    return load_network_pickle(path)


def test_persistent_ids_are_refused(tmp_path):
    with pytest.raises(UnsafePickleError, match=r": refusing persistent id 'x': not an EG3D network pickle$"):
        load(tmp_path, text("x") + b"Q")


def test_newobj_ex_creates_only_records_and_containers_without_arguments(tmp_path):
    record = load(tmp_path, glob("torch.nn.modules.conv", "Conv2d") + b")}\x92")["G"]
    assert isinstance(record, PickledObject) and record.class_name == "torch.nn.modules.conv.Conv2d"
    easy = load(tmp_path, glob("dnnlib.util", "EasyDict") + b")}\x92")["G"]
    assert isinstance(easy, dict) and easy == {}
    with pytest.raises(UnsafePickleError, match=r": refusing to create set while loading$"):
        load(tmp_path, glob("builtins", "set") + b")}\x92")
    with pytest.raises(UnsafePickleError, match=r": refusing to create Conv2d while loading$"):
        load(tmp_path, glob("torch.nn.modules.conv", "Conv2d") + b"(K\x01t}\x92")  # with arguments
    with pytest.raises(UnsafePickleError, match=r": refusing to create Conv2d while loading$"):
        load(tmp_path, glob("torch.nn.modules.conv", "Conv2d") + b")}" + text("k") + b"K\x01s\x92")  # keywords


def typed_storage(values):
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.tensor(values, dtype=torch.float32).storage()


def test_tensor_views_must_lie_inside_their_storage():
    rebuild = unpickler(10).find_class("torch._utils", "_rebuild_tensor_v2")
    hooks = collections.OrderedDict()
    storage = typed_storage([0.0, 1, 2, 3, 4, 5])
    view = rebuild(storage, 1, (2, 2), (2, 1), False, hooks)
    assert torch.equal(view, torch.tensor([[1.0, 2], [3, 4]])) and not view.requires_grad
    assert rebuild(storage, 3, (3,), (1,), True, hooks, {}).requires_grad  # reaches the last element exactly
    assert rebuild(storage, 6, (0, 4), (100, 100), False, hooks, None).shape == (0, 4)  # empty: nothing read
    with refused("a tensor view reaching element 7 of a storage of 6"):
        rebuild(storage, 4, (3,), (1,), False, hooks)
    assert rebuild(storage, 0, (2, 2), (4, 1), False, hooks)[1, 1] == 5  # rows 4 apart: elements 0-1 and 4-5
    with refused("a tensor view reaching element 7 of a storage of 6"):
        rebuild(storage, 0, (2, 2), (5, 1), False, hooks)
    for offset, size, stride in ((0, [2], (1,)), (0, (2,), [1]), (0, (2,), (1, 1)), (0, (2,), (-1,)), (-1, (2,), (1,)),
                                 (0.0, (2,), (1,)), (0, (2.0,), (1,)), (True, (2,), (1,))):
        message = (f"a tensor with an invalid view: offset {offset!r}, size {size!r}, stride {stride!r}"
                   .replace("(", r"\(").replace(")", r"\)").replace("[", r"\[").replace("]", r"\]"))
        with refused(message):
            rebuild(storage, offset, size, stride, False, hooks)
    with refused("a tensor whose storage is a UntypedStorage"):
        rebuild(torch.arange(3.0).untyped_storage(), 0, (1,), (1,), False, hooks)
    for requires_grad, backward_hooks in ((1, hooks), (False, None), (False, collections.OrderedDict(h=set))):
        with refused("a tensor with backward hooks or an invalid requires_grad"):
            rebuild(storage, 0, (2,), (1,), requires_grad, backward_hooks)
    with refused("a tensor with invalid metadata"):
        rebuild(storage, 0, (2,), (1,), False, hooks, [1])


@pytest.mark.parametrize("opcode,message", [
    (b"\x97", "refusing out-of-band buffers: not an EG3D network pickle"),  # NEXT_BUFFER
    (b"\x98", "refusing out-of-band buffers: not an EG3D network pickle"),  # READONLY_BUFFER
    (b"\x82\x01", "refusing copyreg extension codes: not an EG3D network pickle"),  # EXT1
    (b"\x83\x01\x00", "refusing copyreg extension codes: not an EG3D network pickle"),  # EXT2
    (b"\x84\x01\x00\x00\x00", "refusing copyreg extension codes: not an EG3D network pickle"),  # EXT4
    (b"(" + b"i" + b"collections\nOrderedDict\n",
     r"refusing protocol-0 instance creation \(OBJ/INST\): not an EG3D network pickle"),  # INST
    (b"(" + b"ccollections\nOrderedDict\n" + b"o",
     r"refusing protocol-0 instance creation \(OBJ/INST\): not an EG3D network pickle"),  # OBJ
])
def test_opcodes_outside_eg3d_pickles_are_refused(tmp_path, opcode, message):
    with pytest.raises(UnsafePickleError, match=": " + message + "$"):
        load(tmp_path, opcode, protocol=b"\x80\x05")


def test_reads_stay_inside_the_file(tmp_path):
    # Protocol-0 strings are read line by line, each line bounded by what is left of the file.
    path = tmp_path / "lines.pkl"
    path.write_bytes(b"(dS'G'\nS'value'\ns.")
    assert load_network_pickle(path) == {"G": "value"}
    path.write_bytes(b"(dS'G'\nS'val")  # the last line runs past the end
    with pytest.raises(pickle.UnpicklingError):
        load_network_pickle(path)
    # A frame or byte string longer than what is left is refused before it is read.
    path.write_bytes(b"\x80\x04\x95" + struct.pack("<Q", 1 << 40) + b"}.")
    with pytest.raises(pickle.UnpicklingError, match="truncated or damaged"):
        load_network_pickle(path)


def test_plain_config_names_where_a_value_does_not_fit_json():
    from dreamportrait.models.pretrained import plain_config

    assert plain_config({"a": [1, (2.5, "x")], 3: {"b": None, "c": np.float32(0.5), "d": True}}) == \
        {"a": [1, [2.5, "x"]], "3": {"b": None, "c": 0.5, "d": True}}
    with pytest.raises(ValueError, match=r"^init_kwargs\.a\[1\]\.b: cannot express a bytes in a JSON config$"):
        plain_config({"a": [0, {"b": b"x"}]})
    with pytest.raises(ValueError, match=r"^G init_kwargs: cannot express a object in a JSON config$"):
        plain_config(object(), "G init_kwargs")


def legacy_bytes(obj):
    """torch.save's legacy (non-zip) stream of ``obj``, as EG3D-era pickles hold their storages."""
    import warnings

    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.save(obj, buffer, _use_new_zipfile_serialization=False)
    return buffer.getvalue()


def legacy_storage(values, dtype=torch.float32):
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return legacy_bytes(torch.tensor(values, dtype=dtype).storage())


def storage_key(data):
    import re

    return re.search(rb"X\x0e\x00\x00\x00(\d{14})", data)[1]


def test_legacy_storages_load_when_their_records_match_their_data():
    load_bytes = unpickler(10).find_class("torch.storage", "_load_from_bytes")
    assert list(load_bytes(legacy_storage([1.0, 2.0, 3.0]))) == [1.0, 2.0, 3.0]
    assert list(load_bytes(legacy_storage([]))) == []  # an empty storage
    assert list(load_bytes(legacy_storage([0.5], torch.float64))) == [0.5]
    import warnings

    with warnings.catch_warnings():  # two storages in one stream: each size is read after the other's data
        warnings.simplefilter("ignore")
        pair = legacy_bytes([torch.tensor([1.0, 2.0]).storage(), torch.tensor([3.0, 4.0, 5.0]).storage()])
    assert [list(s) for s in load_bytes(pair)] == [[1.0, 2.0], [3.0, 4.0, 5.0]]


def test_legacy_storages_whose_records_do_not_match_their_data_are_refused():
    load_bytes = unpickler(10).find_class("torch.storage", "_load_from_bytes")
    good = legacy_storage([1.0, 2.0, 3.0])
    key = storage_key(good)
    cases = {
        "refusing to load os.FloatStorage inside a tensor storage":
            good.replace(b"ctorch\nFloatStorage", b"cos\nFloatStorage"),
        "refusing to load torch.FooStorage inside a tensor storage": good.replace(b"FloatStorage", b"FooStorage"),
        "a tensor storage that is not in torch.save's format": good.replace(b"\x8a\nl\xfc", b"\x8a\nm\xfc", 1),
        "a tensor storage whose records do not match its data": good[::-1].replace(key[::-1], b"1" * 14, 1)[::-1],
        "a tensor storage whose size does not match its declaration": good.replace(b"a.\x03\x00", b"a.\x04\x00"),
        "a tensor storage declares 12 bytes but the file holds fewer": good[:-4],
    }
    for message, data in cases.items():
        with refused(message.replace("(", r"\(").replace(")", r"\)")):
            load_bytes(data)
    double = legacy_storage([1.0, 2.0, 3.0], torch.float64)
    with refused("a tensor storage declares 24 bytes but the file holds fewer"):  # 8 bytes an element
        load_bytes(double[:-4])
    # the keys as a tuple, not torch.save's list
    as_tuple = good.replace(b"]q\x00X\x0e\x00\x00\x00" + key + b"q\x01a.", b"(X\x0e\x00\x00\x00" + key + b"t.")
    with refused("a tensor storage whose records do not match its data"):
        load_bytes(as_tuple)
    with pytest.raises(UnsafePickleError, match="^a damaged tensor storage: "):
        load_bytes(good[:40])
    with refused("a tensor storage must be bytes, got str"):
        load_bytes("PK")
    # storage records other than ("storage", <type>, key: str, location, size >= 0, ...)
    for old, new in ((b"storage", b"storagf"), (b"ctorch\nFloatStorage\n", b"K\x07"), (b"K\x03Nt", b"\x88Nt"),
                     (b"K\x03Nt", b"J\xff\xff\xff\xffNt"), (b"X\x0e\x00\x00\x00" + key + b"q\x02", b"K\x05q\x02")):
        with pytest.raises(UnsafePickleError, match=r"^unexpected storage record .* inside a tensor storage$"):
            load_bytes(good.replace(old, new, 1))


def test_persistence_records_keep_their_class_name_and_dict_state(tmp_path):
    reconstruct = unpickler(10).find_class("torch_utils.persistence", "_reconstruct_persistent_obj")
    assert reconstruct({"type": "class", "state": None}).class_name == ""  # no name: empty, not "None"
    record = reconstruct({"type": "class", "state": None, "class_name": "Net"})
    assert record.class_name == "Net" and record.state == {}
    with refused("a torch_utils.persistence object whose state is not a dict"):
        reconstruct({"type": "class", "state": [1], "class_name": "Net"})
    for meta in ({"type": "function", "state": {}}, {"type": "class"}, ["type", "class"]):
        with refused("a torch_utils.persistence object without the expected class metadata"):
            reconstruct(meta)


def test_build_sets_attributes_of_containers_it_created_only_from_a_dict_of_names(tmp_path):
    easy = load(tmp_path, glob("dnnlib.util", "EasyDict") + b")\x81}" + text("flag") + b"K\x01sb")["G"]
    assert easy.flag == 1 and dict(easy) == {}
    for state, name in ((b"}K\x01K\x02s", "EasyDict"), (b"]", "EasyDict")):
        with pytest.raises(UnsafePickleError, match=f": refusing a {name} state that is not a dict of names$"):
            load(tmp_path, glob("dnnlib.util", "EasyDict") + b")\x81" + state + b"b")
    with pytest.raises(UnsafePickleError, match=": refusing to set the state of a list the pickle did not create$"):
        load(tmp_path, b"]}b")
    with pytest.raises(UnsafePickleError, match=": refusing to create Conv2d while loading$"):
        load(tmp_path, glob("torch.nn.modules.conv", "Conv2d") + b"K\x01\x85\x81")  # NEWOBJ with arguments


def test_bytearray8_spends_the_budget_and_reads_its_bytes_from_the_file(tmp_path):
    body = b"\x96" + struct.pack("<Q", 3) + b"abc"
    assert load(tmp_path, body, protocol=b"\x80\x05")["G"] == bytearray(b"abc")
    two = b"(" + body + body + b"l"  # both within the file: the budget is given back after each read
    assert load(tmp_path, two, protocol=b"\x80\x05")["G"] == [bytearray(b"abc")] * 2
    with pytest.raises(UnsafePickleError, match="more than the pickle's own size allows$"):
        load(tmp_path, b"\x96" + struct.pack("<Q", 1 << 40) + b"abc", protocol=b"\x80\x05")


def test_storages_saved_on_a_gpu_load_on_the_cpu():
    # EG3D's snapshots are written from CUDA training: their storages name a CUDA device.
    cuda_saved = legacy_storage([1.0, 2.0]).replace(b"X\x03\x00\x00\x00cpu", b"X\x06\x00\x00\x00cuda:0")
    storage = unpickler(10).find_class("torch.storage", "_load_from_bytes")(cuda_saved)
    assert storage.device.type == "cpu" and list(storage) == [1.0, 2.0]


def test_line_reads_count_against_what_is_left_of_the_file(tmp_path):
    # '(' 'd' 'S' then the line "'G'\n" leave 10 of 17 bytes; 'B' and its length leave 5, fewer than the 10 asked.
    path = tmp_path / "mixed.pkl"
    path.write_bytes(b"(dS'G'\nB" + struct.pack("<I", 10) + b"abcs.")
    with pytest.raises(UnsafePickleError, match=r"truncated or damaged: it asks for 10 bytes where 5 remain$"):
        load_network_pickle(path)


def test_the_bounded_file_reads_into_buffers_within_its_size():
    from dreamportrait.models.safe_pickle import _BoundedFile

    bounded = _BoundedFile(io.BytesIO(b"abcdefgh"), 6)
    buffer = bytearray(4)
    assert bounded.readinto(buffer) == 4 and buffer == bytearray(b"abcd")
    assert bounded.readline() == b"ef" and bounded.read() == b""
    with pytest.raises(UnsafePickleError, match="asks for 1 bytes where 0 remain"):
        bounded.readinto(bytearray(1))


def discriminator_record(**state):
    from dreamportrait.models import build_discriminator, preset_kwargs

    torch.manual_seed(0)
    weights = build_discriminator("tiny").state_dict()
    record = PickledObject("DualDiscriminator", {"_init_kwargs": preset_kwargs("tiny", "discriminator"),
                                                 "_parameters": dict(weights), **state})
    return record, weights


def test_networks_from_records_load_exactly_and_name_what_does_not_fit():
    from dreamportrait.models.pretrained import network_from_record

    record, weights = discriminator_record(neural_rendering_resolution=64)  # a generator's key: ignored for D
    network = network_from_record(record, "discriminator", "net.pkl:D")
    for key, value in network.state_dict().items():
        assert torch.equal(value, weights[key].float()), key
    half, _ = discriminator_record()
    half.state["_parameters"] = {key: value.double() for key, value in weights.items()}  # stored as float64
    assert all(p.dtype == torch.float32 for p in network_from_record(half, "discriminator", "s").parameters())
    for bad, found in ((PickledObject("Foo"), "'Foo'"), ({"G": 1}, "'dict'")):
        with pytest.raises(ValueError, match=rf"^net.pkl:G: expected an EG3D TriPlaneGenerator, found {found}$"):
            network_from_record(bad, "generator", "net.pkl:G")
    positional, _ = discriminator_record(_init_args=(1, 2))
    with pytest.raises(ValueError, match=r"^net.pkl:D: DualDiscriminator pickled with positional init args; "
                                         r"expected keyword args only$"):
        network_from_record(positional, "discriminator", "net.pkl:D")
    unfit, _ = discriminator_record()
    unfit.state["_init_kwargs"] = {**unfit.state["_init_kwargs"], "colour": 3}
    with pytest.raises(ValueError, match=r"^net.pkl:D: its init kwargs do not fit DualDiscriminator: .*colour"):
        network_from_record(unfit, "discriminator", "net.pkl:D")
    missing, _ = discriminator_record()
    del missing.state["_init_kwargs"]  # no kwargs: the class's required arguments are missing
    with pytest.raises(ValueError, match=r"^net.pkl:D: its init kwargs do not fit DualDiscriminator: .*missing"):
        network_from_record(missing, "discriminator", "net.pkl:D")
    odd, _ = discriminator_record()
    odd.state["_init_kwargs"] = {**odd.state["_init_kwargs"], "extra": {"x": b"1"}}
    with pytest.raises(ValueError, match=r"^net.pkl:D init_kwargs\.extra\.x: cannot express a bytes in a JSON config$"):
        network_from_record(odd, "discriminator", "net.pkl:D")
    extra, _ = discriminator_record()
    extra.state["_parameters"] = {**extra.state["_parameters"], "surplus": torch.zeros(1)}
    with pytest.raises(ValueError, match=r"^net.pkl:D.*surplus"):
        network_from_record(extra, "discriminator", "net.pkl:D")


def test_import_eg3d_names_each_network_by_the_pickle_and_its_key(tmp_path, monkeypatch):
    from dreamportrait.models import pretrained

    calls, saved = [], []
    monkeypatch.setattr(pretrained, "network_from_record",
                        lambda record, role, source: calls.append((role, source)) or role)
    monkeypatch.setattr(pretrained, "save_pretrained", lambda out, g, d: saved.append((g, d)) or out)
    path = tmp_path / "net.pkl"
    path.write_bytes(pickle.dumps({"G_ema": 1, "D": 2}, protocol=4))
    pretrained.import_eg3d(path, tmp_path / "out")
    assert calls == [("generator", f"{path}:G_ema"), ("discriminator", f"{path}:D")]
    assert saved == [("generator", "discriminator")]
    calls.clear()
    path.write_bytes(pickle.dumps({"G_ema": 1}, protocol=4))
    pretrained.import_eg3d(path, tmp_path / "out")
    assert calls == [("generator", f"{path}:G_ema")] and saved[-1] == ("generator", None)
    path.write_bytes(pickle.dumps({"G": 1}, protocol=4))
    with pytest.raises(ValueError, match=r"no 'G_ema' network in the pickle \(found \['G'\]\)$"):
        pretrained.import_eg3d(path, tmp_path / "out")


def test_load_network_pickle_names_empty_damaged_and_non_dict_files(tmp_path):
    path = tmp_path / "net.pkl"
    path.write_bytes(b"")
    with pytest.raises(pickle.UnpicklingError, match=r"net.pkl is empty: not a network pickle$"):
        load_network_pickle(path)
    path.write_bytes(b"P\xff\n.")  # a protocol-0 persistent id that is not ASCII
    with pytest.raises(pickle.UnpicklingError, match=r"net.pkl is damaged \(not a readable pickle\): persistent IDs"):
        load_network_pickle(path)
    path.write_bytes(b".")  # STOP on an empty stack
    with pytest.raises(pickle.UnpicklingError,
                       match=r"net.pkl is damaged or not a network pickle: pop from empty list$"):
        load_network_pickle(path)
    path.write_bytes(b"\xff")  # not an opcode: a KeyError whose message is the byte
    with pytest.raises(pickle.UnpicklingError, match=r"net.pkl is damaged or not a network pickle: 255$"):
        load_network_pickle(path)
    path.write_bytes(b"\x80\x04]K\x01a.")
    with pytest.raises(UnsafePickleError, match=r"net.pkl: expected a dict of networks at the top level, got list$"):
        load_network_pickle(path)


def test_refusals_name_what_was_refused(tmp_path):
    with pytest.raises(UnsafePickleError, match=r": refusing to call dtype while loading$"):
        load(tmp_path, glob("torch", "float32") + b")R")
    with pytest.raises(UnsafePickleError, match=r": refusing to call ndarray while loading$"):
        load(tmp_path, glob("numpy", "ndarray") + b")R")
    with pytest.raises(UnsafePickleError, match=r": refusing to create dtype while loading$"):
        load(tmp_path, glob("torch", "float32") + b")\x81")
    with pytest.raises(UnsafePickleError, match=r": refusing to set the state of a set the pickle did not create$"):
        load(tmp_path, glob("builtins", "set") + b")R}b")  # created, but not a type that takes state


def test_bytearray8_sizes_are_unsigned_and_give_their_budget_back(tmp_path):
    with pytest.raises(UnsafePickleError, match=r": refusing BYTEARRAY8 of 18446744073709551615 bytes: more than"):
        load(tmp_path, b"\x96" + struct.pack("<Q", (1 << 64) - 1) + b"abc", protocol=b"\x80\x05")
    # After a BYTEARRAY8 the whole budget (the file's size) is there again for a bytearray(n).
    head = b"\x80\x05}" + text("G") + b"(\x96" + struct.pack("<Q", 3) + b"abc" + b"l0"  # a list of it, dropped
    call, tail = glob("builtins", "bytearray") + b"(J", b"tRs."
    size = len(head) + len(call) + 4 + len(tail)
    path = tmp_path / "b8.pkl"
    path.write_bytes(head + call + struct.pack("<i", size) + tail)
    assert load_network_pickle(path)["G"] == bytearray(size)
    path.write_bytes(head + call + struct.pack("<i", size + 1) + tail)
    with pytest.raises(UnsafePickleError, match=f"refusing bytearray of {size + 1} bytes: more than"):
        load_network_pickle(path)


def test_bounded_reads_of_nothing_read_nothing():
    from dreamportrait.models.safe_pickle import _BoundedFile

    bounded = _BoundedFile(io.BytesIO(b"abcdef"), 6)
    assert bounded.read(0) == b"" and bounded.read(2) == b"ab" and bounded.read(-1) == b"cdef"


def test_named_tensors_keep_non_tensor_values_as_they_are():
    array = np.arange(3.0)
    record = PickledObject("M", {"_parameters": {}, "_buffers": {"table": array}})
    assert record.named_tensors()["table"] is array


def test_tensor_metadata_survives_the_load(tmp_path):
    # A lazily negated view pickles its storage and {"neg": True}: dropping the metadata flips its sign.
    negated = torch.arange(1.0, 4.0)._neg_view()
    path = tmp_path / "net.pkl"
    path.write_bytes(pickle.dumps({"G": negated}, protocol=4))
    assert torch.equal(load_network_pickle(path)["G"].resolve_neg(), torch.tensor([-1.0, -2.0, -3.0]))
