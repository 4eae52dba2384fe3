"""A pretrained directory's layout written out by hand (config.json's entries and formatting, the
weight files' metadata) and where loading takes a text-conditioned generator's encoder from, its
device, backend and mode, and the config checks word for word."""

import json
import re

import pytest
import torch
from safetensors import safe_open
from tiny_models import write_tiny_clip

from dreamportrait._manifest import write_manifest
from dreamportrait.models import build_discriminator, build_generator, load_pretrained, save_pretrained
from dreamportrait.models.pretrained import read_config
from dreamportrait.text import TextConditionedGenerator, TextEncoder


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    return write_tiny_clip(tmp_path_factory.mktemp("clip"))


def conditioned(encoder=None, text_dim=32):
    return TextConditionedGenerator(build_generator("tiny", neural_rendering_resolution=16), text_dim,
                                    text_encoder=encoder, attention_resolutions=(16,), attention_heads=2,
                                    attention_head_dim=8)


def test_a_text_conditioned_directory_holds_the_documented_config_and_weight_files(tmp_path, clip_dir):
    generator, discriminator = conditioned(TextEncoder(clip_dir)), build_discriminator("tiny")
    assert save_pretrained(tmp_path, generator, discriminator) == tmp_path
    config = {"format": "dreamportrait.triplane-gan", "version": 1,
              "generator": {**generator.base.init_kwargs, "neural_rendering_resolution": 16},
              "text_conditioning": {**generator.init_kwargs, "text_encoder": str(clip_dir)},
              "discriminator": dict(discriminator.init_kwargs)}
    text = (tmp_path / "config.json").read_text()
    assert text == json.dumps(json.loads(json.dumps(config)), indent=2, sort_keys=True) + "\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "discriminator.safetensors",
                                                          "generator.safetensors", "manifest.json"]
    for role in ("generator", "discriminator"):
        with safe_open(tmp_path / f"{role}.safetensors", "pt") as weights:
            assert weights.metadata() == {"format": "dreamportrait.triplane-gan", "role": role}
    # Without a text encoder the source is recorded as null; without a discriminator there is none.
    save_pretrained(tmp_path / "bare", conditioned())
    bare = json.loads((tmp_path / "bare" / "config.json").read_text())
    assert bare["text_conditioning"]["text_encoder"] is None and "discriminator" not in bare
    assert sorted(p.name for p in (tmp_path / "bare").iterdir()) == ["config.json", "generator.safetensors",
                                                                    "manifest.json"]


def test_loading_takes_the_encoder_given_recorded_or_beside_the_generator(tmp_path, clip_dir):
    encoder = TextEncoder(clip_dir)
    generator = conditioned(encoder)
    save_pretrained(tmp_path / "recorded", generator)
    loaded, discriminator = load_pretrained(tmp_path / "recorded", backend="reference")
    assert isinstance(loaded, TextConditionedGenerator) and discriminator is None
    assert loaded.text_encoder.source == str(clip_dir) and loaded.init_kwargs == generator.init_kwargs
    assert loaded.base.renderer.backend == "reference" and not loaded.training
    for key, value in generator.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    assert load_pretrained(tmp_path / "recorded", text_encoder=encoder)[0].text_encoder is encoder
    other = write_tiny_clip(tmp_path / "other-clip")
    assert load_pretrained(tmp_path / "recorded", text_encoder=str(other))[0].text_encoder.source == str(other)
    # Nothing recorded: the tokenizer/ and text_encoder/ beside it, as a published generator has, or none.
    save_pretrained(tmp_path / "published", conditioned())
    assert load_pretrained(tmp_path / "published")[0].text_encoder is None
    write_tiny_clip(tmp_path / "published", layout="stable-diffusion")
    write_manifest(tmp_path / "published")  # as publishing does
    beside = load_pretrained(tmp_path / "published")[0].text_encoder
    assert beside.source == str(tmp_path / "published")


def test_loading_onto_a_device_in_eval_mode(tmp_path, clip_dir):
    save_pretrained(tmp_path, conditioned(TextEncoder(clip_dir)), build_discriminator("tiny").train())
    generator, discriminator = load_pretrained(tmp_path, device="meta")
    assert {p.device.type for p in generator.parameters()} == {"meta"}
    assert {p.device.type for p in discriminator.parameters()} == {"meta"}
    assert next(generator.text_encoder.model.parameters()).device.type == "meta"
    assert not generator.training and not discriminator.training


def test_config_checks_word_for_word(tmp_path, clip_dir):
    config_path = tmp_path / "config.json"
    with pytest.raises(FileNotFoundError, match=f"^{re.escape(str(tmp_path))} is not a pretrained model directory: "
                                                f"config.json is missing$"):
        read_config(tmp_path)
    needs = re.escape(f"{config_path}: not a dreamportrait.triplane-gan config (needs 'format': "
                      f"'dreamportrait.triplane-gan' and a 'generator' entry)")
    for config in ([], {"format": "other", "generator": {}}, {"format": "dreamportrait.triplane-gan"}):
        config_path.write_text(json.dumps(config))
        with pytest.raises(ValueError, match=f"^{needs}$"):
            read_config(tmp_path)
    config_path.write_text(json.dumps({"format": "dreamportrait.triplane-gan", "generator": {}, "version": 1,
                                       "text_conditioning": {}, "discriminator": {}, "extra": 1, "another": 2}))
    with pytest.raises(ValueError, match=f"^{re.escape(str(config_path))}: unknown entries \\['another', 'extra'\\]$"):
        read_config(tmp_path)
    save_pretrained(tmp_path, conditioned(), build_discriminator("tiny"))
    (tmp_path / "manifest.json").unlink()  # the config is edited by hand below
    config = json.loads(config_path.read_text())
    for entry, what in (("generator", "the generator config does not fit TriPlaneGenerator"),
                        ("text_conditioning", "text_conditioning does not fit TextConditionedGenerator"),
                        ("discriminator", "the discriminator config does not fit DualDiscriminator")):
        broken = {**config, entry: {**config[entry], "no_such_argument": 1}}
        config_path.write_text(json.dumps(broken))
        with pytest.raises(ValueError, match=f"^{re.escape(str(config_path))}: {what}: .*no_such_argument"):
            load_pretrained(tmp_path)


def test_a_directory_with_a_manifest_is_checked_against_it_and_a_config_may_omit_the_encoder(tmp_path):
    save_pretrained(tmp_path, conditioned())
    write_manifest(tmp_path)  # as a training checkpoint has
    assert load_pretrained(tmp_path)[0].text_encoder is None
    weights = tmp_path / "generator.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1] + bytes([weights.read_bytes()[-1] ^ 1]))  # one bit flipped
    with pytest.raises(ValueError, match="generator.safetensors"):
        load_pretrained(tmp_path)
    (tmp_path / "manifest.json").unlink()
    config = json.loads((tmp_path / "config.json").read_text())
    del config["text_conditioning"]["text_encoder"]  # written by hand, without the entry: no recorded source
    (tmp_path / "config.json").write_text(json.dumps(config))
    save_pretrained(tmp_path / "fresh", conditioned())
    (tmp_path / "generator.safetensors").write_bytes((tmp_path / "fresh" / "generator.safetensors").read_bytes())
    assert load_pretrained(tmp_path)[0].text_encoder is None
