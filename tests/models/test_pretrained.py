"""Pretrained directories and the import of EG3D network pickles (built here in EG3D's format)."""

import collections
import copy
import io
import json
import os
import pickle
import pickletools
import sys
import types

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from dreamportrait._manifest import write_manifest
from dreamportrait.cli import main
from dreamportrait.models import build_discriminator, build_generator, camera_labels, fov_to_intrinsics
from dreamportrait.models import import_eg3d, load_pretrained, sample_orbit_poses, save_pretrained
from dreamportrait.models.renderer import ImportanceRenderer, OSGDecoder
from dreamportrait.models.safe_pickle import EG3D_PLAIN_CLASSES, UnsafePickleError, load_network_pickle
from eg3d_restated import eg3d_code


@pytest.fixture
def eg3d_modules(monkeypatch):
    """Stand-ins for EG3D's ``torch_utils.persistence`` and ``dnnlib.util`` so pickle records their
    names as EG3D's own pickles do; loading must never call them."""
    persistence = types.ModuleType("torch_utils.persistence")

    def _reconstruct_persistent_obj(meta):
        raise AssertionError("EG3D's loader (which executes module_src) was called")

    _reconstruct_persistent_obj.__module__ = "torch_utils.persistence"
    _reconstruct_persistent_obj.__qualname__ = "_reconstruct_persistent_obj"
    persistence._reconstruct_persistent_obj = _reconstruct_persistent_obj
    util = types.ModuleType("dnnlib.util")
    util.EasyDict = type("EasyDict", (dict,), {"__module__": "dnnlib.util"})
    for name, module in {"torch_utils": types.ModuleType("torch_utils"), "torch_utils.persistence": persistence,
                         "dnnlib": types.ModuleType("dnnlib"), "dnnlib.util": util}.items():
        monkeypatch.setitem(sys.modules, name, module)
    return persistence._reconstruct_persistent_obj, util.EasyDict


class PersistentRecord:
    """Pickles like an object of an EG3D ``@persistence.persistent_class``."""

    def __init__(self, reconstruct, class_name, state, module_src):
        self.reconstruct, self.meta = reconstruct, dict(type="class", version=6, module_src=module_src,
                                                        class_name=class_name, state=state)

    def __reduce__(self):
        return self.reconstruct, (self.meta,)


@pytest.fixture
def eg3d():
    """EG3D's code (re-stated in tests/eg3d_restated) importable under its own module paths."""
    with eg3d_code() as modules:
        yield modules


def as_eg3d(module, eg3d, lr_multiplier=1):
    """Our module tree as the same network built from EG3D's classes: its own networks as
    persistent classes, the renderer, ray marcher and decoder as EG3D's plain modules."""
    if isinstance(module, ImportanceRenderer):
        return eg3d.renderer.ImportanceRenderer()
    if isinstance(module, OSGDecoder):
        decoder = eg3d.triplane.OSGDecoder(module.net[0].in_features, {
            "decoder_lr_mul": lr_multiplier, "decoder_output_dim": module.net[2].out_features - 1})
        decoder.load_state_dict(module.state_dict(), strict=True)
        return decoder
    children = collections.OrderedDict((name, as_eg3d(child, eg3d, lr_multiplier))
                                       for name, child in module._modules.items())
    if type(module).__module__.startswith("torch.nn."):
        cls = type(module)
    else:
        cls = eg3d.persistence.persistent_class(type(module))
    copy = cls.__new__(cls)
    copy.__dict__.update({key: value for key, value in module.__dict__.items() if key != "init_kwargs"})
    copy.__dict__["_modules"] = children
    if cls is not type(module):
        copy._init_args, copy._init_kwargs = (), {}
    return copy


def eg3d_networks(generator, discriminator, eg3d, label_std=(0.1, 0.2)):
    """``G`` and ``D`` as EG3D's training loop constructs them: the generator with its ray sampler and
    the ``dataset_label_std`` buffer it registers."""
    kwargs = dict(generator.init_kwargs)
    del kwargs["neural_rendering_resolution"]  # EG3D keeps it as an attribute, not an init kwarg
    G = as_eg3d(generator, eg3d, generator.rendering_kwargs.get("decoder_lr_mul", 1))
    modules = G._modules
    G._modules = collections.OrderedDict([("renderer", modules["renderer"]),
                                          ("ray_sampler", eg3d.ray_sampler.RaySampler()),
                                          *[(name, modules[name])
                                            for name in ("backbone", "superresolution", "decoder")]])
    G._init_kwargs, G._last_planes = kwargs, None
    G.register_buffer("dataset_label_std", torch.tensor(label_std))
    D = as_eg3d(discriminator, eg3d)
    D._init_kwargs = dict(discriminator.init_kwargs)
    return G, D


def write_network_pickle(path, generator, discriminator, eg3d):
    """A network snapshot written as EG3D's training loop writes one: G_ema a deep copy of G, every
    network deep-copied in eval mode without gradients, one ``pickle.dump`` of the dict."""
    G, D = eg3d_networks(generator, discriminator, eg3d)
    G, D = G.train().requires_grad_(False), D.train().requires_grad_(False)
    G_ema = copy.deepcopy(G).eval()
    snapshot = dict(training_set_kwargs=dict(resolution=64, use_labels=True))
    for name, module in [("G", G), ("D", D), ("G_ema", G_ema), ("augment_pipe", None)]:
        if module is not None:
            module = copy.deepcopy(module).eval().requires_grad_(False).cpu()
        snapshot[name] = module
    with open(path, "wb") as file:
        pickle.dump(snapshot, file)


def pickled_globals(path):
    """The (module, name) globals a pickle file refers to."""
    strings, names = [], set()
    for opcode, argument, _ in pickletools.genops(path.read_bytes()):
        if opcode.name in ("SHORT_BINUNICODE", "BINUNICODE", "UNICODE"):
            strings.append(argument)
        elif opcode.name == "STACK_GLOBAL":
            names.add(tuple(strings[-2:]))
        elif opcode.name == "GLOBAL":
            names.add(tuple(argument.split(" ", 1)))
    return names


def render(generator, c, z):
    with torch.no_grad():
        return generator(z, c, noise_mode="const", deterministic_sampling=True, neural_rendering_resolution=16)


def test_eg3d_snapshot_imports_without_running_its_code(tmp_path, eg3d, capsys):
    generator, discriminator = build_generator("tiny").eval(), build_discriminator("tiny").eval()
    generator.neural_rendering_resolution = 16
    write_network_pickle(tmp_path / "network.pkl", generator, discriminator, eg3d)
    # What makes it EG3D's: plain submodules named by module path, the training loop's extra buffer.
    assert set(EG3D_PLAIN_CLASSES) <= pickled_globals(tmp_path / "network.pkl")
    assert b"dataset_label_std" in (tmp_path / "network.pkl").read_bytes()
    reconstructions = len(eg3d.persistence.RECONSTRUCTIONS)
    data = load_network_pickle(tmp_path / "network.pkl")
    renderer = data["G_ema"].state["_modules"]["renderer"]
    assert renderer.class_name == "training.volumetric_rendering.renderer.ImportanceRenderer"
    assert main(["import-eg3d", str(tmp_path / "network.pkl"), str(tmp_path / "out")]) == 0, capsys.readouterr().err
    assert len(eg3d.persistence.RECONSTRUCTIONS) == reconstructions  # EG3D's loader never ran
    assert sorted(os.listdir(tmp_path / "out")) == ["config.json", "discriminator.safetensors", "generator.safetensors",
                                                    "manifest.json"]
    loaded_generator, loaded_discriminator = load_pretrained(tmp_path / "out")
    assert loaded_generator.neural_rendering_resolution == 16
    c, z = camera_labels(sample_orbit_poses(2), fov_to_intrinsics(18.837)), torch.randn(2, generator.z_dim)
    expected, actual = render(generator, c, z), render(loaded_generator, c, z)
    for key in ("image", "image_raw", "image_depth"):
        torch.testing.assert_close(actual[key], expected[key], rtol=0, atol=0)
    images = {"image": expected["image"], "image_raw": expected["image_raw"]}
    torch.testing.assert_close(loaded_discriminator(images, c), discriminator(images, c), rtol=0, atol=0)
    import_eg3d(tmp_path / "network.pkl", tmp_path / "api")  # the Python API too
    api_generator = load_pretrained(tmp_path / "api")[0]
    torch.testing.assert_close(render(api_generator, c, z)["image"], expected["image"], rtol=0, atol=0)


def test_eg3d_decoder_restated_equals_ours(eg3d):
    """The re-stated EG3D decoder the snapshot carries computes what ours does."""
    generator = build_generator("tiny").eval()
    decoder = as_eg3d(generator.decoder, eg3d)
    features = torch.randn(2, 3, 50, 32)
    expected, actual = generator.decoder(features.mean(1)), decoder(features, None)
    for key in ("rgb", "sigma"):
        torch.testing.assert_close(actual[key], expected[key], rtol=1e-6, atol=1e-6)


def test_state_dict_round_trip_is_strict_and_exact(tmp_path):
    generator, discriminator = build_generator("tiny"), build_discriminator("tiny")
    save_pretrained(tmp_path, generator, discriminator)
    loaded_generator, loaded_discriminator = load_pretrained(tmp_path)
    for original, loaded in ((generator, loaded_generator), (discriminator, loaded_discriminator)):
        expected, actual = original.state_dict(), loaded.state_dict()
        assert expected.keys() == actual.keys()
        for key in expected:
            torch.testing.assert_close(actual[key], expected[key], rtol=0, atol=0)
        loaded.load_state_dict(original.state_dict(), strict=True)
    save_pretrained(tmp_path / "g-only", generator)
    assert load_pretrained(tmp_path / "g-only")[1] is None


def test_checkpoint_with_unknown_or_missing_keys_is_named(tmp_path):
    # Weights edited by hand, with a manifest that records them: the structural checks behind the hashes.
    save_pretrained(tmp_path, build_generator("tiny"))
    weights = load_file(str(tmp_path / "generator.safetensors"))
    weights["backbone.synthesis.b8.extra"] = torch.zeros(3)
    del weights["decoder.net.0.bias"]
    save_file(weights, str(tmp_path / "generator.safetensors"))
    write_manifest(tmp_path)
    with pytest.raises(ValueError, match=r"missing keys: decoder\.net\.0\.bias; unknown keys: backbone\.synthesis\.b8\.extra"):
        load_pretrained(tmp_path)
    weights["decoder.net.0.bias"] = torch.zeros(7)
    del weights["backbone.synthesis.b8.extra"]
    save_file(weights, str(tmp_path / "generator.safetensors"))
    write_manifest(tmp_path)
    with pytest.raises(ValueError, match=r"wrong shapes: decoder\.net\.0\.bias \(7,\) \(expected \(64,\)\)"):
        load_pretrained(tmp_path)


def test_damaged_directories_give_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json is missing"):
        load_pretrained(tmp_path)
    save_pretrained(tmp_path, build_generator("tiny"))
    data = (tmp_path / "generator.safetensors").read_bytes()
    (tmp_path / "generator.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"generator\.safetensors is damaged: \d+ bytes, .*manifest\.json lists"):
        load_pretrained(tmp_path)
    # Without a manifest (a directory made by hand) the files' own checks speak.
    (tmp_path / "manifest.json").unlink()
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        load_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["generator"]["depth"] = 3
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="generator config does not fit TriPlaneGenerator"):
        load_pretrained(tmp_path)
    (tmp_path / "config.json").write_text("{")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_pretrained(tmp_path)
    assert not [name for name in os.listdir(tmp_path) if ".tmp" in name]


class RunsShell:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_malicious_pickles_are_refused(tmp_path, eg3d_modules, capsys):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pkl"
    path.write_bytes(pickle.dumps({"G_ema": RunsShell(marker)}))
    with pytest.raises(UnsafePickleError, match=r"refusing to load (posix|os)\.system"):
        load_network_pickle(path)
    assert main(["import-eg3d", str(path), str(tmp_path / "out")]) == 1
    assert "refusing to load" in capsys.readouterr().err
    # Hidden inside a network's state.
    reconstruct, _ = eg3d_modules
    path.write_bytes(pickle.dumps({"G_ema": PersistentRecord(reconstruct, "TriPlaneGenerator",
                                                             {"_modules": {"x": RunsShell(marker)}}, "pass")}))
    with pytest.raises(UnsafePickleError):
        load_network_pickle(path)
    # Hidden inside a tensor storage (EG3D pickles storages as torch.save bytes).
    payload = io.BytesIO()
    torch.save({"x": RunsShell(marker)}, payload)
    evil_storage = type("EvilStorage", (), {"__reduce__": lambda self: (torch.storage._load_from_bytes,
                                                                        (payload.getvalue(),))})()
    path.write_bytes(pickle.dumps({"G_ema": evil_storage}))
    with pytest.raises(pickle.UnpicklingError):
        load_network_pickle(path)
    assert not marker.exists()


def test_pickle_without_networks_is_named(tmp_path, eg3d_modules):
    path = tmp_path / "n.pkl"
    path.write_bytes(pickle.dumps({"D": None}))
    with pytest.raises(ValueError, match="no 'G_ema' network"):
        import_eg3d(path, tmp_path / "out")
    reconstruct, _ = eg3d_modules
    path.write_bytes(pickle.dumps({"G_ema": PersistentRecord(reconstruct, "Generator", {}, "pass")}))
    with pytest.raises(ValueError, match="expected an EG3D TriPlaneGenerator, found 'Generator'"):
        import_eg3d(path, tmp_path / "out")
    assert not (tmp_path / "out").exists()
