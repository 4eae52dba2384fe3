"""Model directories carry a manifest of their files' content hashes, written last and checked on
load: a damaged, missing or unlisted file is an error naming it; a directory without a manifest
(converted or assembled by hand) loads with one warning that it is unverified; the shipped models
verify."""

import json
import warnings

import pytest
from tiny_models import write_tiny_clip

from dreamportrait import _manifest
from dreamportrait._manifest import MANIFEST, UnverifiedDirectoryWarning, verify_manifest, write_manifest
from dreamportrait.models import build_discriminator, build_generator, load_pretrained, save_pretrained
from dreamportrait.text import TextConditionedGenerator
from dreamportrait.world.assets import NAMES, asset_dir, publish


def conditioned():
    return TextConditionedGenerator(build_generator("tiny", neural_rendering_resolution=16), 32,
                                    attention_resolutions=(16,), attention_heads=2, attention_head_dim=8)


@pytest.fixture
def saved(tmp_path):
    directory = tmp_path / "model"
    save_pretrained(directory, conditioned(), build_discriminator("tiny"))
    return directory


def _load_quietly(directory):
    with warnings.catch_warnings():
        warnings.simplefilter("error", UnverifiedDirectoryWarning)
        return load_pretrained(directory)


def test_save_pretrained_writes_the_manifest_last_listing_every_file(saved):
    listing = json.loads((saved / MANIFEST).read_text())["files"]
    assert sorted(listing) == ["config.json", "discriminator.safetensors", "generator.safetensors"]
    assert verify_manifest(saved) == set(listing)
    assert (saved / MANIFEST).stat().st_mtime_ns >= max((saved / name).stat().st_mtime_ns for name in listing)
    generator, discriminator = _load_quietly(saved)
    assert discriminator is not None


@pytest.mark.parametrize("name", ["config.json", "generator.safetensors", "discriminator.safetensors"])
@pytest.mark.parametrize("where", ["first", "middle", "last"])
def test_a_flipped_byte_in_any_file_is_an_error_naming_it(saved, name, where):
    path = saved / name
    data = bytearray(path.read_bytes())
    index = {"first": 0, "middle": len(data) // 2, "last": len(data) - 1}[where]
    data[index] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=f"{path}.* is damaged: its SHA-256 differs"):
        load_pretrained(saved)


@pytest.mark.parametrize("name", ["config.json", "generator.safetensors", "discriminator.safetensors"])
def test_a_missing_or_truncated_file_is_an_error_naming_it(saved, name):
    path = saved / name
    path.write_bytes(path.read_bytes()[:-1])
    with pytest.raises(ValueError, match=f"{path} is damaged: .* bytes"):
        load_pretrained(saved)
    path.unlink()
    with pytest.raises(ValueError, match=f"{path} is missing"):
        load_pretrained(saved)


def test_a_file_read_but_not_listed_is_an_error(tmp_path):
    directory = tmp_path / "model"
    save_pretrained(directory, conditioned())
    save_pretrained(tmp_path / "other", conditioned(), build_discriminator("tiny"))
    config = json.loads((tmp_path / "other" / "config.json").read_text())
    (directory / "discriminator.safetensors").write_bytes((tmp_path / "other" / "discriminator.safetensors").read_bytes())
    (directory / "config.json").write_text(json.dumps(config))
    write_manifest(directory)  # the config and the discriminator listed again ...
    listing = json.loads((directory / MANIFEST).read_text())
    del listing["files"]["discriminator.safetensors"]  # ... but the discriminator not
    (directory / MANIFEST).write_text(json.dumps(listing))
    with pytest.raises(ValueError, match="discriminator.safetensors is not listed in .*manifest.json"):
        load_pretrained(directory)


def test_a_manifest_naming_a_path_outside_the_directory_is_damaged(saved):
    listing = json.loads((saved / MANIFEST).read_text())
    listing["files"]["../outside"] = listing["files"]["config.json"]
    (saved / MANIFEST).write_text(json.dumps(listing))
    with pytest.raises(ValueError, match="manifest.json is damaged: it lists '../outside'"):
        load_pretrained(saved)


def test_a_directory_without_a_manifest_loads_with_one_warning(saved, monkeypatch):
    monkeypatch.setattr(_manifest, "_warned_unverified", set())
    (saved / MANIFEST).unlink()
    with pytest.warns(UnverifiedDirectoryWarning, match=f"{saved} has no manifest.json"):
        generator, discriminator = load_pretrained(saved)
    assert discriminator is not None
    with warnings.catch_warnings():
        warnings.simplefilter("error", UnverifiedDirectoryWarning)
        load_pretrained(saved)  # once per directory


def test_text_encoder_files_beside_a_generator_are_listed_and_checked(tmp_path):
    directory = tmp_path / "model"
    save_pretrained(directory, conditioned())
    write_tiny_clip(directory, layout="stable-diffusion")  # as a published generator has its encoder
    with pytest.raises(ValueError, match="tokenizer/.* is not listed"):
        load_pretrained(directory)
    write_manifest(directory)
    assert _load_quietly(directory)[0].text_encoder is not None
    listed = json.loads((directory / MANIFEST).read_text())["files"]
    assert "text_encoder/config.json" in listed and "tokenizer/vocab.json" in listed
    vocabulary = directory / "tokenizer" / "vocab.json"
    vocabulary.write_text(vocabulary.read_text().replace('"a', '"b', 1))
    with pytest.raises(ValueError, match="tokenizer/vocab.json is damaged"):
        load_pretrained(directory)


@pytest.mark.parametrize("name", NAMES)
def test_the_shipped_models_verify_against_their_manifests(name):
    directory = asset_dir(name)  # checks it
    listed = verify_manifest(directory)
    on_disk = {path.relative_to(directory).as_posix() for path in directory.rglob("*")
               if path.is_file() and path.name != MANIFEST and "__pycache__" not in path.parts}
    assert listed == on_disk


def test_publish_writes_a_manifest_of_what_it_copied(saved, tmp_path):
    (saved / "training_state.pt").write_bytes(b"resume state")
    write_manifest(saved)  # as a training checkpoint's, listing the state left out of the copy
    target = publish("gan", saved, assets_root=tmp_path / "assets")
    assert "training_state.pt" not in verify_manifest(target)
    assert _load_quietly(target)[1] is not None


def test_a_damaged_shipped_model_is_refused_by_asset_dir(tmp_path, monkeypatch):
    from dreamportrait.world import assets

    root = tmp_path / "dreamportrait"
    copy = root / "assets" / "world" / "judge"
    copy.parent.mkdir(parents=True)
    source = asset_dir("judge")
    copy.mkdir()
    for path in source.iterdir():
        (copy / path.name).write_bytes(path.read_bytes())
    monkeypatch.setattr(assets.resources, "files", lambda package: root)
    assert asset_dir("judge") == copy
    weights = copy / "judge.safetensors"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0x10
    weights.write_bytes(bytes(data))
    monkeypatch.setattr(assets, "_verified", set())
    with pytest.raises(ValueError, match=f"{weights} is damaged"):
        asset_dir("judge")


@pytest.mark.parametrize("name", ["config.json", "generator.safetensors"])
def test_a_manifest_that_leaves_out_the_config_or_the_generator_is_refused(saved, name):
    listing = json.loads((saved / MANIFEST).read_text())
    del listing["files"][name]
    (saved / MANIFEST).write_text(json.dumps(listing))
    with pytest.raises(ValueError, match=rf"manifest\.json does not list {name}"):
        load_pretrained(saved)
