"""``dreamportrait world train``: every stage at the tiny setting, resumable; ablation overrides."""

import json

import imageio.v3 as iio
import pytest
import torch
import yaml

from dreamportrait.cli import main
from dreamportrait.models import TextConditionedGenerator, load_pretrained
from dreamportrait.training import latest_checkpoint
from dreamportrait.world import is_held_out, parse_caption
from dreamportrait.world.assets import publish
from dreamportrait.world.teacher import TeacherConfig, build_teacher

TINY_TEACHER = TeacherConfig(channels=(32, 32), text_width=32, text_layers=2, text_heads=2, attention_head_dim=16)


def test_world_train_runs_every_stage_and_resumes(tmp_path, capsys):
    teacher = build_teacher(tmp_path / "teacher", TINY_TEACHER, seed=int(torch.randint(1 << 30, ())))
    out = tmp_path / "run"
    command = ["world", "train", "--out", str(out), "--teacher", str(teacher), "--setting", "tiny",
               "log.tensorboard=false", "model.attention_head_dim=8"]
    assert main(command) == 0
    samples = iio.imread(out / "gan/samples.png")
    assert samples.shape == (8 * 64, 4 * 64, 3)  # 4 latents, each followed by its depth in grey
    depth, image = samples[64:128].astype(int), samples[:64].astype(int)
    assert (depth == depth[..., :1]).all() and not (image == image[..., :1]).all()
    gan, discriminator = load_pretrained(out / "gan/final")
    assert discriminator is not None and gan.rendering_kwargs["avg_camera_pivot"] == [0, 0, 0]
    prompts = (out / "prompts.txt").read_text().splitlines()
    assert len(prompts) == 394 * 3 and not any(is_held_out(parse_caption(p)) for p in prompts)
    checkpoint = latest_checkpoint(out / "dreamportrait")
    assert checkpoint.name == "step-0000002"
    generator, _ = load_pretrained(checkpoint, text_encoder=teacher)
    assert isinstance(generator, TextConditionedGenerator)

    # Publishing into (a stand-in for) the package's assets keeps what using the model needs.
    published = publish("generator", checkpoint, assets_root=tmp_path / "assets")  # the teacher it records
    assert sorted(p.name for p in published.iterdir()) == ["config.json", "generator.safetensors", "manifest.json",
                                                           "text_encoder", "tokenizer"]
    copy, discriminator = load_pretrained(published)  # self-contained: it loads the encoder beside it
    assert discriminator is None and copy.text_encoder.source == str(published)
    for key, value in generator.state_dict().items():  # the text encoder's weights included
        assert torch.equal(copy.state_dict()[key], value)
    probe = ["a portrait of a dark-skinned person with a bald head"]
    torch.testing.assert_close(copy.text_encoder(probe).tokens, generator.text_encoder(probe).tokens)
    with pytest.raises(ValueError, match="records no text encoder"):
        publish("generator", published, assets_root=tmp_path / "again")  # a published copy records none
    with pytest.raises(ValueError, match="text_encoder applies only to a generator"):
        publish("teacher", teacher, assets_root=tmp_path / "assets", text_encoder=teacher)
    (teacher / "training_state.pt").write_bytes(b"resume-only")
    assert not (publish("teacher", teacher, assets_root=tmp_path / "assets") / "training_state.pt").exists()

    # The text-free GAN through the harness (packaged judge; real renders drawn for world-FID).
    assert main(["evaluate", "--method", "gan", "--checkpoint", str(out / "gan/final"), "--held-out", "2",
                 "--seeds", "0-1", "--views", "2", "--real-count", "16", "--out", str(tmp_path / "eval")]) == 0
    result = json.loads((tmp_path / "eval/gan.json").read_text())
    assert result["diversity"] > 0 and 0 <= result["multi_view_consistency"] <= 1
    assert main(["evaluate", "--method", "generator", "--checkpoint", str(out / "gan/final"), "--held-out", "1",
                 "--out", str(tmp_path / "eval")]) == 2
    assert "needs a text-conditioned generator" in capsys.readouterr().err

    assert main(command) == 0  # every stage done: nothing retrained
    assert latest_checkpoint(out / "dreamportrait").name == "step-0000002"

    ablation = out / "no-gan"
    assert main(command + ["gan.weight=0", f"out_dir={ablation}"]) == 0  # reuses the GAN stage
    assert latest_checkpoint(ablation).name == "step-0000002"

    # By default the regulariser's real portraits are the GAN stage's renders, exported as an EG3D folder.
    config = yaml.safe_load((checkpoint / "train_config.yaml").read_text())
    assert config["gan"]["real"] == "images" and config["gan"]["image_dir"] == str(out / "data/gan-train-images")
    labels = json.loads((out / "data/gan-train-images/dataset.json").read_text())["labels"]
    assert len(labels) == 16  # the tiny setting's GAN images
    capsys.readouterr()
    assert main(command + ["gan.image_dir=elsewhere", f"out_dir={out / 'elsewhere'}"]) == 1  # one line, no traceback
    assert "gan.image_dir elsewhere: dataset.json is missing" in capsys.readouterr().err
    # With gan.group_size above 1 they are renders in groups, one combination and camera each.
    grouped = out / "grouped"
    assert main(command + ["gan.group_size=2", f"out_dir={grouped}"]) == 0
    config = yaml.safe_load((latest_checkpoint(grouped) / "train_config.yaml").read_text())
    assert config["gan"]["group_size"] == 2 and config["gan"]["image_dir"] == str(out / "data/gan-groups-images")
    groups = json.loads((out / "data/gan-groups-images/dataset.json").read_text())["groups"]
    assert groups == [[4 * i + j for j in range(4)] for i in range(4)]  # the tiny setting's 16 images
    # The shipped recipe's second command: the finished run continued with groups and the spread term.
    capsys.readouterr()
    assert main(command + ["steps=4", "gan.group_size=2", "gan.spread_weight=150"]) == 0
    assert f"resumed at step 2 from {out / 'dreamportrait'}" in capsys.readouterr().out
    continued = latest_checkpoint(out / "dreamportrait")
    config = yaml.safe_load((continued / "train_config.yaml").read_text())
    assert continued.name == "step-0000004" and config["gan"]["spread_weight"] == 150
    assert config["gan"]["image_dir"] == str(out / "data/gan-groups-images")

    # A run that starts from a given GAN (as `--gan packaged` does) trains no GAN; with the GAN's own
    # samples as real portraits it renders no GAN data either.
    other = tmp_path / "from-gan"
    assert main(["world", "train", "--gan-real", "pretrained", "--gan", str(out / "gan/final"), "--out", str(other)]
                + command[4:]) == 0
    checkpoint = latest_checkpoint(other / "dreamportrait")
    assert checkpoint.name == "step-0000002" and not (other / "gan").exists()
    assert not (other / "data").exists()
    assert yaml.safe_load((checkpoint / "train_config.yaml").read_text())["gan"]["real"] == "pretrained"
    # Nor does one without the regulariser, though it leaves --gan-real at its default (renders).
    unregularised = tmp_path / "from-gan-no-regulariser"
    assert main(["world", "train", "--gan", str(out / "gan/final"), "--out", str(unregularised)] + command[4:]
                + ["gan.weight=0"]) == 0
    assert latest_checkpoint(unregularised / "dreamportrait").name == "step-0000002"
    assert not (unregularised / "data").exists()
    published = publish("gan", out / "gan/final", assets_root=tmp_path / "assets")
    assert load_pretrained(published)[1] is not None  # the discriminator ships with the GAN


def test_world_train_errors_are_named(tmp_path, capsys):
    assert main(["world", "train", "--out", str(tmp_path), "--setting", "tiny", "--teacher", str(tmp_path / "none"),
                 "--config", str(tmp_path / "missing.yaml")]) == 2
    assert "missing.yaml" in capsys.readouterr().err
    assert main(["world", "train", "--out", str(tmp_path), "--setting", "tiny", "--gan", str(tmp_path)]) == 2
    assert "--gan must be a pretrained 3D GAN directory" in capsys.readouterr().err
    assert main(["world", "train", "--out", str(tmp_path), "--setting", "tiny", "--gan", str(tmp_path),
                 "--gan-steps", "5"]) == 2
    assert "--gan-steps trains a GAN and --gan skips that stage" in capsys.readouterr().err
    # A group larger than the rendered real groups is refused before anything is rendered.
    assert main(["world", "train", "--out", str(tmp_path / "big-groups"), "--setting", "tiny", "--gan", "packaged",
                 "batch_size=8", "gan.group_size=8"]) == 2
    assert "gan.group_size=8 is larger than the groups of 4 heads" in capsys.readouterr().err
    assert not (tmp_path / "big-groups" / "data").exists()
