"""The training configuration: YAML and ``key=value`` overrides into typed values, each check's
boundary and message, the prompt list and the regulariser's image folder."""

import dataclasses

import pytest
import yaml

from dreamportrait.training.config import TrainConfig, apply_override, load_config

SOURCE = "guidance.source=some/model"


def load(*overrides, path=None):
    return load_config(path, [SOURCE, *overrides])


def refused(message, *overrides):
    with pytest.raises(ValueError, match=message):
        load(*overrides)


def test_no_file_and_no_overrides_but_the_source_gives_the_declared_defaults():
    config = load()
    expected = dataclasses.asdict(TrainConfig())
    expected["guidance"]["source"] = "some/model"
    assert config.to_dict() == expected
    assert isinstance(config.to_dict()["gan"], dict)


def test_a_file_then_overrides_in_order(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("steps: 7\nguidance:\n  source: from/file\n  t_min: 0.1\nmodel:\n  attention_heads: 2\n")
    config = load_config(path, ["steps=9", "model.attention_heads=3", "model.attention_heads=5"])
    assert (config.steps, config.guidance.source, config.guidance.t_min, config.model.attention_heads) == \
        (9, "from/file", 0.1, 5)
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    assert load_config(empty, [SOURCE]).steps == 1000
    assert load_config(str(path)).steps == 7  # a str path too


def test_file_errors_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"^config file .*missing.yaml does not exist$"):
        load_config(tmp_path / "missing.yaml")
    path = tmp_path / "list.yaml"
    path.write_text("- 1\n- 2\n")
    with pytest.raises(ValueError, match=r"list.yaml: the top level must be a mapping of config keys$"):
        load_config(path)


def test_overrides_parse_their_values_as_yaml_and_split_at_the_first_equals_sign():
    values = {}
    apply_override(values, " gan.betas =[0.5, 0.9]")
    apply_override(values, "prompts=['a=b', 'c']")
    apply_override(values, "model.backend=null")
    apply_override(values, "model.pretrained= a dir ")
    assert values == {"gan": {"betas": [0.5, 0.9]}, "prompts": ["a=b", "c"],
                      "model": {"backend": None, "pretrained": "a dir"}}
    with pytest.raises(ValueError, match=r"^override 'steps' must look like key=value \(e.g. optim.lr_base=0\)$"):
        apply_override(values, "steps")
    with pytest.raises(ValueError, match=r"^override 'prompts.x=1': 'prompts' is not a section$"):
        apply_override(values, "prompts.x=1")
    deep = {}
    apply_override(deep, "a.b.c=3")
    assert deep == {"a": {"b": {"c": 3}}}


def test_values_are_converted_to_the_declared_types():
    config = load("optim.lr_base=1", "guidance.grad_clip=2", "guidance.t_max_final=null", "model.backend=cpu",
                  "model.attention_resolutions=[8, 64]", "cameras.pivot=[0, 1, 0.5]", "log.tensorboard=false")
    assert config.optim.lr_base == 1.0 and type(config.optim.lr_base) is float
    assert config.guidance.grad_clip == 2.0 and type(config.guidance.grad_clip) is float
    assert config.guidance.t_max_final is None and config.model.backend == "cpu"
    assert config.model.attention_resolutions == [8, 64]
    assert config.cameras.pivot == [0.0, 1.0, 0.5] and all(type(value) is float for value in config.cameras.pivot)
    assert config.log.tensorboard is False
    assert load("model.neural_rendering_resolution=null").model.neural_rendering_resolution is None
    assert load("model.neural_rendering_resolution=32").model.neural_rendering_resolution == 32


@pytest.mark.parametrize("override, message", [
    ("steps=true", "config key 'steps' must be int, got True"),
    ("steps=1.5", "config key 'steps' must be int, got 1.5"),
    ("optim.lr_base=true", "config key 'optim.lr_base' must be float, got True"),
    ("optim.lr_base=fast", "config key 'optim.lr_base' must be float, got 'fast'"),
    ("log.tensorboard=1", "config key 'log.tensorboard' must be bool, got 1"),
    ("device=1", "config key 'device' must be str, got 1"),
    ("guidance.grad_clip=big", "config key 'guidance.grad_clip' must be float, got 'big'"),
    ("model.attention_resolutions=16", "config key 'model.attention_resolutions' must be a list, got 16"),
    ("model.attention_resolutions=[16, x]", r"config key 'model.attention_resolutions\[1\]' must be int, got 'x'"),
    ("model=3", "config key 'model' must be a mapping, got 3"),
    ("optim.lr_decoder=1", "unknown config key 'optim.lr_decoder'; known keys under optim: amp, betas, "
                           "ema_half_life_steps, lr_adapters, lr_base, lr_cross_attention"),
    ("epochs=1", "unknown config key 'epochs'; known keys under the top level: batch_size, cameras, "
                 "checkpoint_every, device, gan, guidance, keep_checkpoints, log, max_bad_steps, model, optim, "
                 "out_dir, prompt_file, prompts, resume, seed, steps$"),
])
def test_wrong_values_and_unknown_keys_are_named(override, message):
    refused(f"^{message}", override)


def test_the_guidance_source_is_required():
    with pytest.raises(ValueError, match=r"^config key 'guidance.source' is required: a diffusers model directory"):
        load_config(None, ["steps=2"])


@pytest.mark.parametrize("overrides, message", [
    (["gan.real=fake"], r"^config key 'gan.real' must be 'pretrained' or 'images', got 'fake'$"),
    (["gan.real=images"], r"^config key 'gan.image_dir' is required when gan.real is 'images'$"),
    (["gan.real=images", "gan.image_dir=''"], r"'gan.image_dir' is required"),
    (["gan.group_size=0"], r"^config key 'gan.group_size' must be >= 1 and divide batch_size \(4\), got 0$"),
    (["gan.group_size=3"], r"'gan.group_size' must be >= 1 and divide batch_size \(4\), got 3$"),
    (["gan.group_size=2"], r"^config key 'gan.group_size' above 1 needs gan.real: images \(real groups of one attribute "
                           r"combination seen from one camera\); the pretrained generator's samples have no such groups$"),
    (["gan.spread_weight=-0.5"], r"^config key 'gan.spread_weight' must be >= 0 and, above 0, needs gan.group_size "
                                 r">= 2 \(it compares the renders of one prompt's group\), got -0.5 with group_size 1$"),
    (["gan.spread_weight=0.1"], r"'gan.spread_weight' must be >= 0 .* got 0.1 with group_size 1$"),
    (["cameras.conditioning=side"], r"^config key 'cameras.conditioning' must be 'frontal' or 'render', got 'side'$"),
    (["guidance.anneal_steps=0"], r"^config key 'guidance.anneal_steps' must be >= 1 or null, got 0$"),
    (["batch_size=0"], r"^config keys 'batch_size' must be >= 1 and 'steps' >= 0$"),
    (["steps=-1"], r"^config keys 'batch_size' must be >= 1 and 'steps' >= 0$"),
])
def test_inconsistent_settings_are_refused(overrides, message):
    refused(message, *overrides)


def test_the_checks_boundaries_are_accepted():
    grouped = load("gan.real=images", "gan.image_dir=faces", "gan.group_size=2", "gan.spread_weight=0.5")
    assert (grouped.gan.group_size, grouped.gan.spread_weight) == (2, 0.5)
    assert load("gan.weight=0", "gan.group_size=2").gan.group_size == 2  # no regulariser: groups need no images
    assert load("gan.group_size=1", "batch_size=3").batch_size == 3
    assert load("gan.real=pretrained").gan.real == "pretrained"
    assert load("cameras.conditioning=render").cameras.conditioning == "render"
    assert load("guidance.anneal_steps=1").guidance.anneal_steps == 1
    assert load("guidance.anneal_steps=null").guidance.anneal_steps is None
    assert load("steps=0", "batch_size=1").steps == 0
    assert load("gan.spread_weight=0").gan.spread_weight == 0.0


def test_the_image_folder_is_read_only_with_the_regulariser_on_and_images_as_reals():
    assert load("gan.real=images", "gan.image_dir=faces").gan.real_image_dir == "faces"
    assert load("gan.real=images", "gan.image_dir=faces", "gan.weight=0").gan.real_image_dir is None
    assert load("gan.image_dir=faces").gan.real_image_dir is None  # pretrained samples are the reals
    assert load("gan.real=images", "gan.image_dir=faces", "gan.weight=0.001").gan.real_image_dir == "faces"


def test_prompts_come_from_the_list_then_the_file_without_blank_lines(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("  a woman with red hair \n\n   \na man with glasses\n")
    config = load("prompts=['a bald man']", f"prompt_file={path}")
    assert config.all_prompts() == ["a bald man", "a woman with red hair", "a man with glasses"]
    assert config.prompts == ["a bald man"]  # the list itself is not extended
    assert load(f"prompt_file={path}").all_prompts() == ["a woman with red hair", "a man with glasses"]
    assert load("prompts=['x', 'y']").all_prompts() == ["x", "y"]
    with pytest.raises(FileNotFoundError, match=r"^prompt_file .*nothing.txt does not exist$"):
        load(f"prompt_file={tmp_path / 'nothing.txt'}").all_prompts()
    with pytest.raises(ValueError, match=r"^the prompt list is empty: set prompts \(a list\) or prompt_file$"):
        load().all_prompts()
    (tmp_path / "blank.txt").write_text("\n  \n")
    with pytest.raises(ValueError, match="the prompt list is empty"):
        load(f"prompt_file={tmp_path / 'blank.txt'}").all_prompts()
    with pytest.raises(ValueError, match=r"^config key 'prompts' holds an empty prompt; every prompt must have words "
                                         r"\(the empty one is guidance's unconditional prompt\)$"):
        load("prompts=['a', ' ']").all_prompts()


def test_to_dict_round_trips_through_yaml(tmp_path):
    config = load("steps=3", "gan.betas=[0.1, 0.2]", "prompts=['p']")
    path = tmp_path / "again.yaml"
    path.write_text(yaml.safe_dump(config.to_dict()))
    assert load_config(path) == config
