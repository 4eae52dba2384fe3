"""The trained world models that ship in the package: teacher, judge, 3D GAN, the default generator
and its ablation without the GAN regulariser."""

import json
import random

import imageio.v3 as iio
import pytest
import torch
import trimesh

from dreamportrait.cli import main
from dreamportrait.guidance import StableDiffusionGuidance
from dreamportrait.training import latest_checkpoint
from dreamportrait.world import caption, held_out_combinations
from dreamportrait._manifest import MANIFEST, verify_manifest
from dreamportrait.models import load_pretrained
from dreamportrait.text.encoder import TextEncoder
from dreamportrait.world.assets import NAMES, asset_dir, load_default_generator, model_directory, publish
from dreamportrait.world.dataset import ATTRIBUTE_CLASSES, heads_from_indices, render_samples
from dreamportrait.world.evaluate import depth_error, evaluate, generator_method, spread, world_method
from dreamportrait.world.heads import WORLD_CAMERAS
from dreamportrait.world.judge import accuracy, load_judge
from dreamportrait.world.new_words import relative_squared_error
from dreamportrait.world.paraphrases import paraphrase_test_set
from dreamportrait.world.teacher import Teacher, caption_words, judge_teacher


def fresh_seed() -> int:
    return int(torch.randint(1 << 30, ()))


def test_shipped_teacher_guides_through_the_guidance_class():
    guidance = StableDiffusionGuidance(asset_dir("teacher"), view_dependent_prompts=False)
    assert guidance.encoder_states == "words"  # trained without the end token's and padding's states
    assert guidance.text_encoder.text_encoding == "phrases"  # and with each phrase of a caption encoded alone
    samples = render_samples(held_out_combinations(), 48, 32, seed=fresh_seed())
    heads = heads_from_indices(samples.attributes)
    own = [caption(head, 0) for head in heads]
    # A wrong caption for each render: another render's, with a different hair colour or hat.
    wrong = [next(caption(h, 0) for h in heads if (h.hair_color, h.hat) != (head.hair_color, head.hat))
             for head in heads]
    images = samples.float_images().requires_grad_(True)
    generator = torch.Generator().manual_seed(fresh_seed())
    t = torch.randint(300, 700, (len(heads),), generator=generator)
    noise = torch.randn(images.shape, generator=generator)
    matching = guidance.sds_loss(images, own, t=t, noise=noise)
    mismatched = guidance.sds_loss(images, wrong, t=t, noise=noise)
    # The teacher denoises a held-out render better when told what it shows.
    assert matching.loss.item() < mismatched.loss.item()
    matching.loss.backward()
    assert images.grad is not None and images.grad.abs().sum() > 0


def test_shipped_teacher_draws_held_out_captions_the_judge_recognises():
    # A smoke check of the teacher's target (>= 80 % per attribute; 92.6-100 % on 148 samples,
    # docs/notes/experiments.md).
    teacher, judge = Teacher(asset_dir("teacher")), load_judge(asset_dir("judge"))
    heads = random.Random(fresh_seed()).sample(held_out_combinations(), 32)
    scores, images = judge_teacher(teacher, judge, heads, samples_per_head=1, steps=25, guidance_scale=3.0,
                                   seed=fresh_seed())
    assert images.shape == (32, 3, 32, 32)
    assert sum(scores.values()) / len(scores) >= 0.85 and min(scores.values()) >= 0.7, scores


def test_shipped_judge_is_right_on_fresh_held_out_renders():
    judge = load_judge(asset_dir("judge"))
    scores = accuracy(judge, render_samples(held_out_combinations(), 512, 32, seed=fresh_seed()))
    assert set(scores) == set(ATTRIBUTE_CLASSES)
    assert all(value >= 0.95 for value in scores.values()), scores


def test_the_world_method_is_the_ceiling_of_the_metrics():
    # The world's own renders of held-out prompts: the judge reads them right from every evaluation
    # view, each seed is one head seen from several sides, and different seeds are different heads.
    prompts = [caption(head, 0) for head in spread(held_out_combinations(), 4)]
    method = world_method(views=3)
    rendered = method(prompts[0], 0)
    views = rendered["image"]
    assert views.shape == (3, 3, 64, 64) and rendered["depth"].shape == (3, 1, 64, 64)
    assert not torch.equal(views[0], views[2]) and torch.equal(views, method(prompts[0], 0)["image"])
    real = render_samples(held_out_combinations(), 64, 32, seed=fresh_seed())
    result = evaluate(method, prompts, [0, 1], load_judge(asset_dir("judge")), real, name="world", progress=False)
    assert all(value >= 0.9 for value in result["text_alignment"].values()), result
    assert result["multi_view_consistency"] >= 0.75 and result["diversity"] > 0
    assert result["depth_error"] == 0  # each prompt's own head: its depth is the truth


def test_the_shipped_gan_is_evaluated_and_trained_from(tmp_path):
    # The shipped text-free 3D GAN: evaluated without --checkpoint,
    # and `world train --gan packaged` starts DreamPortrait from it without training a GAN.
    assert main(["evaluate", "--method", "gan", "--held-out", "1", "--seeds", "0-1", "--views", "2",
                 "--real-count", "16", "--out", str(tmp_path / "eval")]) == 0
    result = json.loads((tmp_path / "eval/gan.json").read_text())
    assert result["diversity"] > 0 and 0 <= result["multi_view_consistency"] <= 1
    out = tmp_path / "run"
    assert main(["world", "train", "--out", str(out), "--setting", "tiny", "--gan", "packaged",
                 "log.tensorboard=false"]) == 0
    assert latest_checkpoint(out / "dreamportrait").name == "step-0000002" and not (out / "gan").exists()


def test_generate_uses_the_shipped_model_by_default(tmp_path, capsys):
    prompt = "a portrait of a light-skinned person with short red hair and glasses"
    assert main(["generate", "--prompt", prompt, "--seeds", "0", "--views", "2", "--video", "--mesh",
                 "--mesh-resolution", "32", "--out", str(tmp_path)]) == 0
    assert "forward pass" in capsys.readouterr().out
    folder = next(tmp_path.glob("*/seed0000"))
    view = iio.imread(folder / "view00.png")
    assert view.shape == (64, 64, 3) and view.std() > 1  # a picture, not a flat image
    assert iio.imread(folder / "turntable.mp4").shape[0] == 72
    mesh = trimesh.load(folder / "mesh.ply")
    assert len(mesh.vertices) > 0 and len(mesh.faces) > 0


def test_checkpoint_names_packaged_models_directories_and_runs(tmp_path):
    for name in NAMES:
        assert model_directory(f"packaged:{name}") == asset_dir(name)
    assert model_directory(asset_dir("generator")) == asset_dir("generator")  # a model directory as it is
    assert model_directory(str(asset_dir("gan"))) == asset_dir("gan")
    with pytest.raises(ValueError, match="the packaged models are packaged:teacher, .*packaged:no-gan-regulariser"):
        model_directory("packaged:no-gan")
    with pytest.raises(ValueError, match="packaged:generator"):
        model_directory("packaged:")
    with pytest.raises(FileNotFoundError, match="neither a model directory"):
        model_directory(tmp_path)  # an empty directory: no config.json, no checkpoints
    (tmp_path / "packaged:generator").mkdir()  # only the prefix names a packaged model
    with pytest.raises(FileNotFoundError):
        model_directory(tmp_path / "packaged:generator")


def test_publishing_a_generator_copies_what_using_it_needs(tmp_path):
    # Republish the shipped ablation (a published copy records no text encoder, so it is named)
    # over a stale copy: the generator's weights, a config that records none, the text encoder it
    # was given and a manifest of exactly those files.
    source, encoder, root = asset_dir("no-gan-regulariser"), asset_dir("generator"), tmp_path / "assets"
    (root / "no-gan-regulariser").mkdir(parents=True)
    (root / "no-gan-regulariser" / "stale.txt").write_text("from an earlier publish")
    target = publish("no-gan-regulariser", source, assets_root=root, text_encoder=encoder)
    assert target == root / "no-gan-regulariser" and sorted(p.name for p in root.iterdir()) == ["no-gan-regulariser"]
    files = {p.relative_to(target).as_posix() for p in target.rglob("*") if p.is_file() and p.name != MANIFEST}
    assert verify_manifest(target) == files and "stale.txt" not in files
    assert {"config.json", "generator.safetensors", "tokenizer/vocab.json", "text_encoder/model.safetensors"} <= files
    assert json.loads((target / "config.json").read_text())["text_conditioning"]["text_encoder"] is None
    weights = "text_encoder/model.safetensors"
    assert (target / weights).read_bytes() == (encoder / weights).read_bytes()
    copy, original = load_pretrained(target)[0], load_pretrained(source)[0]
    for key, value in original.state_dict().items():
        assert torch.equal(copy.state_dict()[key], value), key
    with pytest.raises(ValueError, match="records no text encoder"):
        publish("no-gan-regulariser", source, assets_root=root)
    with pytest.raises(ValueError, match="holds no text-conditioned generator"):
        publish("generator", asset_dir("gan"), assets_root=root, text_encoder=encoder)
    with pytest.raises(FileNotFoundError, match="lacks tokenizer/ and text_encoder/"):
        publish("generator", source, assets_root=root, text_encoder=tmp_path)
    with pytest.raises(ValueError, match="text_encoder applies only to a generator"):
        publish("gan", asset_dir("gan"), assets_root=root, text_encoder=encoder)
    with pytest.raises(ValueError, match="name must be one of"):
        publish("no-gan", source, assets_root=root)
    with pytest.raises(FileNotFoundError, match="is not a directory"):
        publish("generator", tmp_path / "missing", assets_root=root)
    assert sorted(p.name for p in root.iterdir()) == ["no-gan-regulariser"]  # no half-written copy left


def test_the_ablation_ships_and_the_command_line_reaches_it(tmp_path, capsys):
    # The generator every ratio against the no-GAN-regulariser run is measured with ships, and
    # `--checkpoint packaged:NAME` reaches it from `evaluate` and `generate`.
    assert main(["evaluate", "--method", "generator", "--checkpoint", "packaged:no-gan-regulariser", "--held-out", "2",
                 "--seeds", "0-1", "--views", "2", "--real-count", "16", "--name", "b", "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "b.json").read_text())
    assert result["diversity"] > 0 and 0 <= result["multi_view_consistency"] <= 1
    assert main(["generate", "--checkpoint", "packaged:no-gan-regulariser", "--prompt",
                 "a portrait of a man with a beard", "--seeds", "0", "--views", "2",
                 "--out", str(tmp_path / "generated")]) == 0
    assert main(["generate", "--checkpoint", "packaged:gan", "--prompt", "a portrait of a man", "--seeds", "0",
                 "--out", str(tmp_path / "refused")]) == 2
    assert "text" in capsys.readouterr().err


def test_a_held_out_prompt_gets_its_hair_colour_and_its_hat():
    # Red hair under a blue hat is a held-out combination: never seen together in any training stage.
    # A smoke check that the prompt reaches the hair and the hat through the shipped model, not the
    # accuracy claim: over every red-hair/blue-hat prompt the hair is red and the hat blue in 100 % of
    # the views (the generators shipped before the mask-supervised
    # teachers drew it red: docs/notes/experiments.md).
    head = next(h for h in held_out_combinations()
                if (h.hair_color, h.hat, h.hair_style, h.skin_tone) == ("red", "blue", "short", "medium"))
    judge = load_judge(asset_dir("judge"))
    method = generator_method(load_default_generator(), views=4)
    views = torch.cat([method(caption(head, 0), seed)["image"] for seed in range(4)])
    verdicts = judge.predict(views)
    hair, hat = (verdicts[:, list(ATTRIBUTE_CLASSES).index(name)] for name in ("hair_color", "hat"))
    assert (hair == ATTRIBUTE_CLASSES["hair_color"].index("red")).float().mean() > 0.5
    assert (hat == ATTRIBUTE_CLASSES["hat"].index("blue")).float().mean() > 0.5


def test_the_shipped_generator_reads_held_out_paraphrases_and_canonical_captions_as_it_was_trained():
    # Its text encoder learnt the paraphrases' words (`world learn-words`). A smoke check, not the
    # accuracy claim (93-99 % per attribute over the whole test set): a held-out combination with
    # glasses and a hat, in the test set's words ("spectacles", "a navy cap", a person word the
    # world does not render), gets its hair colour, glasses and hat in most views.
    prompts = [p for p in paraphrase_test_set() if p.attributes.glasses == "yes" and p.attributes.hat != "none"
               and p.attributes.hair_color != "none"]
    prompt = random.Random(fresh_seed()).choice(prompts)
    judge = load_judge(asset_dir("judge"))
    method = generator_method(load_default_generator(), views=4)
    verdicts = judge.predict(torch.cat([method(prompt.text, seed)["image"] for seed in range(4)]))
    for name in ("hair_color", "glasses", "hat"):
        wanted = ATTRIBUTE_CLASSES[name].index(getattr(prompt.attributes, name))
        assert (verdicts[:, list(ATTRIBUTE_CLASSES).index(name)] == wanted).float().mean() > 0.5, (prompt.text, name)
    # Canonical captions read as with the text encoder it was trained with (the teacher's): the
    # term that holds them there keeps every canonical figure of the generator.
    learnt, trained_with = TextEncoder(asset_dir("generator")), TextEncoder(asset_dir("teacher"))
    rng = random.Random(fresh_seed())
    captions = [caption(rng.choice(held_out_combinations()), rng.randrange(3)) for _ in range(16)]
    read, reference = learnt(captions), trained_with(captions)
    assert relative_squared_error((read.tokens, read.pooled), (reference.tokens, reference.pooled)) < 5e-3
    assert all(len(learnt.tokenizer(word)["input_ids"]) == 3 for word in caption_words("paraphrase"))


def test_the_shipped_generator_draws_solid_heads():
    # The 3D claim, not only the pictures: on held-out prompts the shipped generator's depth is far
    # nearer the world head's true depth than a flat card through the orbit's pivot is (the world's
    # evaluation: 0.040 against 0.127 over every held-out prompt; the fog-GAN generator shipped before the
    # ball-prior GAN, 0.131, fails this).
    generator = generator_method(load_default_generator(), views=4)
    heads = held_out_combinations()
    ours, card = [], []
    for _ in range(4):
        head = heads[int(torch.randint(len(heads), ()))]
        prompt, seed = caption(head, int(torch.randint(3, ()))), fresh_seed()
        depth = generator(prompt, seed)["depth"]
        ours.append(depth_error(depth, prompt, seed))
        card.append(depth_error(torch.full_like(depth, WORLD_CAMERAS["radius"]), prompt, seed))  # through the pivot
    assert sum(ours) < 0.75 * sum(card), (ours, card)
