"""The restricted unpickler's limits: what a hostile or damaged file cannot make it do."""

import collections
import io
import pickle
import struct

import numpy as np
import pytest
import torch

from dreamportrait.cli import main
from dreamportrait.models.safe_pickle import EasyDict, UnsafePickleError, load_network_pickle


def global_(module, name):
    return b"c" + module.encode() + b"\n" + name.encode() + b"\n"


def unicode_(text):
    data = text.encode()
    return b"X" + struct.pack("<I", len(data)) + data


def write(tmp_path, body):
    path = tmp_path / "network.pkl"
    path.write_bytes(b"\x80\x04" + body + b".")
    return path


class Calls:
    """Pickles as ``function(*args)``."""

    def __init__(self, function, *args):
        self.function, self.args = function, args

    def __reduce__(self):
        return self.function, self.args


def test_empty_or_truncated_file_is_a_clear_error(tmp_path, capsys):
    path = tmp_path / "network.pkl"
    path.write_bytes(b"")
    with pytest.raises(pickle.UnpicklingError, match="is empty"):
        load_network_pickle(path)
    assert main(["import-eg3d", str(path), str(tmp_path / "out")]) == 1
    error = capsys.readouterr().err
    assert "is empty" in error and "Traceback" not in error and len(error.strip().splitlines()) == 1
    path.write_bytes(pickle.dumps({"G_ema": {"w": torch.ones(100)}})[:-60])
    with pytest.raises(pickle.UnpicklingError, match="truncated|damaged"):
        load_network_pickle(path)


@pytest.mark.parametrize("size", [1 << 40, 2 << 30, 4096])
def test_allocations_are_bounded_by_the_file_size(tmp_path, size):
    path = tmp_path / "network.pkl"
    path.write_bytes(pickle.dumps({"G_ema": Calls(bytearray, size)}, protocol=4))
    assert path.stat().st_size < 100
    with pytest.raises(UnsafePickleError, match="bytearray of"):
        load_network_pickle(path)
    # A declared length longer than the file (BINBYTES8 / BYTEARRAY8) is refused before allocating.
    for opcode in (b"\x8e", b"\x96"):
        with pytest.raises(pickle.UnpicklingError, match="asks for|more than"):
            load_network_pickle(write(tmp_path, opcode + struct.pack("<Q", size)))


def test_a_small_bytearray_that_fits_is_data(tmp_path):
    path = tmp_path / "network.pkl"
    path.write_bytes(pickle.dumps({"G_ema": Calls(bytearray, 16), "pad": b"x" * 64}, protocol=4))
    assert load_network_pickle(path)["G_ema"] == bytearray(16)


def test_numpy_arrays_are_bounded_and_still_load(tmp_path):
    path = tmp_path / "network.pkl"
    path.write_bytes(pickle.dumps({"G_ema": np.arange(6, dtype=np.float32).reshape(2, 3)}, protocol=4))
    np.testing.assert_array_equal(load_network_pickle(path)["G_ema"], np.arange(6).reshape(2, 3))
    body = (b"}" + unicode_("G_ema") + global_("numpy.core.multiarray", "_reconstruct") + global_("numpy", "ndarray")
            + b"J" + struct.pack("<i", 1 << 30) + b"\x85" + b"C\x01b" + b"\x87R" + b"s")
    with pytest.raises(UnsafePickleError, match="numpy array of"):
        load_network_pickle(write(tmp_path, body))


@pytest.mark.parametrize("module, name, target", [
    ("torch._utils", "_rebuild_tensor_v2", lambda: torch._utils._rebuild_tensor_v2),
    ("collections", "OrderedDict", lambda: collections.OrderedDict),
    ("dnnlib.util", "EasyDict", lambda: EasyDict),
    ("torch", "float32", lambda: torch.float32),
])
@pytest.mark.parametrize("slots", [False, True])
def test_build_cannot_modify_objects_the_file_did_not_create(tmp_path, module, name, target, slots):
    state = b"}" + unicode_("planted") + b"K\x07" + b"s"
    if slots:
        state = b"N" + state + b"\x86"  # (None, {...}): set as attributes
    with pytest.raises(UnsafePickleError, match="did not create"):
        load_network_pickle(write(tmp_path, global_(module, name) + state + b"b"))
    assert not hasattr(target(), "planted")


def test_shared_numpy_dtypes_are_never_modified(tmp_path):
    # numpy pickles a dtype as dtype('f4', False, True) and then sets its state; a call without the
    # copy flag would return the process-wide float32 dtype.
    body = (global_("numpy", "dtype") + unicode_("f4") + b"\x89\x89\x87R"
            + b"(K\x03" + unicode_(">") + b"NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00tb")
    result = load_network_pickle(write(tmp_path, b"}" + unicode_("G_ema") + body + b"s"))["G_ema"]
    assert result.byteorder == ">" and np.dtype("f4").byteorder in ("<", "=")


def test_tensor_views_beyond_their_storage_are_refused(tmp_path):
    tensor = torch.arange(4.0)
    payload = pickle.dumps({"G_ema": tensor}, protocol=4)
    assert torch.equal(load_network_pickle(write(tmp_path, payload[2:-1]))["G_ema"], tensor)
    # Same storage, a view of 1e9 elements (torch would grow the storage to fit it).
    forged = payload.replace(b"K\x04\x85", b"J\x00\xca\x9a\x3b\x85", 1)
    assert forged != payload
    with pytest.raises(UnsafePickleError, match="tensor view reaching"):
        load_network_pickle(write(tmp_path, forged[2:-1]))


def test_storages_declaring_more_than_they_hold_are_refused(tmp_path):
    storage = io.BytesIO()
    torch.save(torch.arange(3.0).storage(), storage, _use_new_zipfile_serialization=False)
    data = storage.getvalue()
    index = data.index(b"cpuq\x03K\x03")
    forged = data[:index] + b"cpuq\x03J\x00\x00\x00\x40" + data[index + 7:]
    body = b"}" + unicode_("G_ema") + global_("torch.storage", "_load_from_bytes")
    body_of = lambda raw: body + b"B" + struct.pack("<I", len(raw)) + raw + b"\x85Rs"  # noqa: E731
    assert load_network_pickle(write(tmp_path, body_of(data)))["G_ema"].tolist() == [0.0, 1.0, 2.0]
    with pytest.raises(UnsafePickleError, match="does not match|declares"):
        load_network_pickle(write(tmp_path, body_of(forged)))
