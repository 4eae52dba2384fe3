"""World datasets, the judge and the teacher at tiny sizes."""

import dataclasses
import json
import os
import random

import imageio.v3 as iio
import pytest
import torch

from dreamportrait.guidance import StableDiffusionGuidance
from dreamportrait.text.encoder import encode_text, split_phrases
from dreamportrait.world import all_combinations, caption, training_combinations
from dreamportrait.world import dataset as dataset_module
from dreamportrait.training.real_images import ImageFolder
from dreamportrait.world.dataset import (attribute_indices, build_dataset, export_image_folder, heads_from_indices,
                                        load_dataset, render_samples)
from dreamportrait.world.judge import accuracy, load_judge, save_judge, train_judge
from dreamportrait.world.heads import MASK_PARTS
from dreamportrait.world.teacher import (Teacher, TeacherConfig, attention_region_loss, build_teacher, caption_words,
                                         judge_teacher, phrase_region, token_regions, train_teacher)

TINY_TEACHER = TeacherConfig(channels=(32, 32), text_width=32, text_layers=2, text_heads=2, attention_head_dim=16)


@pytest.fixture(scope="module")
def samples():
    return render_samples(training_combinations(), 48, 32, seed=3)


def test_datasets_are_deterministic_and_resume(tmp_path, samples, monkeypatch):
    again = render_samples(training_combinations(), 48, 32, seed=3)
    assert torch.equal(again.images, samples.images) and again.captions == samples.captions
    assert samples.images.dtype == torch.uint8 and samples.images.shape == (48, 3, 32, 32)
    assert heads_from_indices(samples.attributes) == heads_from_indices(attribute_indices(heads_from_indices(samples.attributes)))
    built = build_dataset(tmp_path, training_combinations(), 20, 32, seed=1, progress=False)
    monkeypatch.setattr(dataset_module, "render_samples", lambda *a, **k: pytest.fail("re-rendered a finished shard"))
    resumed = build_dataset(tmp_path, training_combinations(), 20, 32, seed=1, progress=False)
    assert torch.equal(resumed.images, built.images) and len(resumed) == 20


def test_datasets_export_as_an_eg3d_image_folder(tmp_path, samples, monkeypatch):
    umask = os.umask(0o022)
    try:
        folder = export_image_folder(samples, tmp_path / "images", progress=False)
    finally:
        os.umask(umask)
    assert folder.stat().st_mode & 0o777 == 0o755  # as mkdir makes it, not mkdtemp's 0700
    labels = json.loads((folder / "dataset.json").read_text())["labels"]
    assert [name for name, _ in labels] == [f"00000/img{i:08d}.png" for i in range(len(samples))]
    for index in (0, len(samples) - 1):  # lossless PNGs, each with its own camera label
        assert torch.equal(torch.from_numpy(iio.imread(folder / labels[index][0])).permute(2, 0, 1),
                           samples.images[index])
        assert labels[index][1] == samples.labels[index].tolist()
    images, cameras = ImageFolder(folder, resolution=32, raw_resolution=16).sample(4)  # what gan.real: images reads
    assert images["image"].shape == (4, 3, 32, 32) and cameras.shape == (4, 25)

    monkeypatch.setattr(dataset_module.iio, "imwrite", lambda *a, **k: pytest.fail("re-exported a finished folder"))
    assert export_image_folder(samples, folder, progress=False) == folder
    writes = []

    def fail_on_the_third(*args, **kwargs):
        writes.append(args)
        if len(writes) == 3:
            raise OSError("disk full")

    monkeypatch.setattr(dataset_module.iio, "imwrite", fail_on_the_third)
    with pytest.raises(OSError, match="disk full"):
        export_image_folder(samples, tmp_path / "interrupted", progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["images"]  # nothing half-written left behind
    (tmp_path / "stray").mkdir()
    with pytest.raises(FileExistsError, match="stray exists but holds no dataset.json"):
        export_image_folder(samples, tmp_path / "stray", progress=False)


def test_grouped_renders_show_one_combination_from_one_camera_per_group(tmp_path):
    # The regulariser's real groups (gan.group_size): within a group only the heads' own small
    # variations differ, so their spread is what one prompt's latents should show.
    grouped = render_samples(training_combinations(), 16, 32, seed=int(torch.randint(1 << 20, ())), batch_size=8,
                             group_size=4)
    groups = torch.arange(16).reshape(4, 4)
    for members in groups:
        assert (grouped.attributes[members] == grouped.attributes[members[0]]).all()
        assert (grouped.labels[members] == grouped.labels[members[0]]).all()
        images = grouped.images[members].float()
        assert (images[1:] - images[0]).abs().amax(dim=(1, 2, 3)).min() > 0  # every head varies
    assert len({tuple(grouped.labels[members[0]].tolist()) for members in groups}) == 4  # a camera per group
    folder = export_image_folder(grouped, tmp_path / "grouped", progress=False, group_size=4)
    assert json.loads((folder / "dataset.json").read_text())["groups"] == groups.tolist()
    images, cameras = ImageFolder(folder, resolution=32, raw_resolution=16).sample(4, group_size=2)
    assert torch.equal(cameras[:2], cameras[2:])  # two groups, member-major
    assert "groups" not in json.loads((export_image_folder(grouped, tmp_path / "plain", progress=False)
                                       / "dataset.json").read_text())
    with pytest.raises(ValueError, match=r"count \(6\) and batch_size \(8\) must be multiples of group_size \(4\)"):
        render_samples(training_combinations(), 6, 32, seed=0, batch_size=8, group_size=4)


def test_part_masks_leave_the_renders_as_they_were_and_are_kept_on_disk(tmp_path, samples):
    masked = render_samples(training_combinations(), 48, 32, seed=3, part_masks=True)
    assert torch.equal(masked.images, samples.images) and masked.captions == samples.captions
    assert samples.masks is None and masked.masks.dtype == torch.uint8 and masked.masks.shape == (48, 5, 32, 32)
    built = build_dataset(tmp_path / "masked", training_combinations(), 20, 32, seed=1, progress=False, part_masks=True)
    assert built.masks.shape == (20, 5, 32, 32) and built.masks.max() == 255
    build_dataset(tmp_path / "plain", training_combinations(), 20, 32, seed=1, progress=False)
    with pytest.raises(ValueError, match="plain was rendered without part masks"):
        build_dataset(tmp_path / "plain", training_combinations(), 20, 32, seed=1, progress=False, part_masks=True)


def test_judge_trains_saves_and_loads(tmp_path, samples):
    judge = train_judge(samples, steps=3, batch_size=16, progress=False)
    scores = accuracy(judge, samples)
    assert set(scores) == {"hair_color", "skin_tone", "hair_style", "beard", "glasses", "hat"}
    assert all(0 <= value <= 1 for value in scores.values())
    save_judge(judge, tmp_path)
    loaded = load_judge(tmp_path)
    assert torch.equal(loaded.predict(samples.float_images()), judge.predict(samples.float_images()))
    assert judge.features(samples.float_images()[:4]).shape == (4, 128)


def test_teacher_trains_resumes_samples_and_guides(tmp_path, samples):
    directory = build_teacher(tmp_path, TINY_TEACHER)
    teacher = Teacher(directory)
    words = teacher.tokenizer.tokenize("a portrait of a dark-skinned person with long blond hair, front view")
    assert all(token.endswith("</w>") for token in words)  # every caption word is one token
    losses = train_teacher(teacher, samples, steps=2, batch_size=8, checkpoint_every=1, progress=False)
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(losses)))
    resumed = Teacher(directory)
    assert len(train_teacher(resumed, samples, steps=3, batch_size=8, progress=False)) == 1  # continues at step 2
    images = resumed.sample(["a portrait of a light-skinned person with short red hair"], steps=3,
                            generator=torch.Generator().manual_seed(0))
    assert images.shape == (1, 3, 32, 32) and images.abs().max() <= 1
    guidance = StableDiffusionGuidance(directory)  # loads like any diffusers model directory
    assert guidance.vae is None and guidance.image_resolution == 32
    out = guidance.sds_loss(torch.rand(2, 3, 64, 64) * 2 - 1, ["a portrait of a person with a bald head, light skin"] * 2)
    assert torch.isfinite(out.loss)
    assert "skinned" in caption_words() and "view" in caption_words()


@pytest.mark.parametrize("encoder_states, text_encoding", [("words", "phrases"), ("words", "caption"), ("all", "caption")])
def test_teacher_and_guidance_read_the_same_encoder_states(tmp_path, encoder_states, text_encoding):
    config = dataclasses.replace(TINY_TEACHER, encoder_states=encoder_states, text_encoding=text_encoding)
    teacher = Teacher(build_teacher(tmp_path, config, seed=int(torch.randint(1 << 30, ()))))
    prompts = ["a portrait of a person with long red hair and a blue hat", ""]
    with torch.no_grad():
        context = teacher.encode(prompts)
    sequences = [split_phrases(p) for p in prompts] if text_encoding == "phrases" else [[p] for p in prompts]
    words = [sum(len(teacher.tokenizer(text)["input_ids"]) - 2 for text in texts) for texts in sequences]
    hidden = (context.abs().sum(-1) == 0).tolist()
    for row, count in enumerate(words):  # "words": the end token (after start + words) and padding zeroed
        if encoder_states == "words":
            assert hidden[row] == [i >= 1 + count for i in range(77)]
        else:  # "all": the caption's padding tokens have states too
            assert not any(hidden[row])

    guidance = StableDiffusionGuidance(tmp_path)  # the directory says which states its UNet reads
    assert guidance.encoder_states == encoder_states and guidance.text_encoder.text_encoding == text_encoding
    torch.testing.assert_close(guidance.text_encoder(prompts).unet_context(guidance.encoder_states), context)
    noisy, t = torch.randn(2, 3, 32, 32), torch.tensor([700, 90])  # the guided ε̂ is built on that context
    with torch.no_grad():
        conditional = teacher.unet(noisy, t, encoder_hidden_states=context[:1].expand(2, -1, -1)).sample
        unconditional = teacher.unet(noisy, t, encoder_hidden_states=context[1:].expand(2, -1, -1)).sample
    guided = guidance.predict_noise(noisy, t, guidance.text_encoder(prompts[:1] * 2), guidance.text_encoder([""] * 2))
    torch.testing.assert_close(guided, unconditional + guidance.guidance_scale * (conditional - unconditional),
                               rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="encoder_states must be one of"):
        StableDiffusionGuidance(tmp_path, encoder_states="end")
    with pytest.raises(ValueError, match="encoder_states must be one of"):
        build_teacher(tmp_path / "bad", dataclasses.replace(TINY_TEACHER, encoder_states="end"))
    with pytest.raises(ValueError, match="text_encoding must be one of"):
        build_teacher(tmp_path / "bad", dataclasses.replace(TINY_TEACHER, text_encoding="words"))
    index = json.loads((tmp_path / "model_index.json").read_text())
    index["teacher_config"]["encoder_states"] = "summary"  # a directory recording an unknown choice
    (tmp_path / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match="encoder_states must be one of"):
        Teacher(tmp_path)


def test_teacher_norm_groups_are_built_recorded_and_checked(tmp_path):
    # one channel per group would be instance normalisation, which hides the noise's mean (TeacherConfig)
    teacher = Teacher(build_teacher(tmp_path, dataclasses.replace(TINY_TEACHER, norm_groups=4)))
    norms = [module for module in teacher.unet.modules() if isinstance(module, torch.nn.GroupNorm)]
    assert norms and all(norm.num_groups == 4 and norm.num_channels // 4 >= 8 for norm in norms)
    assert json.loads((tmp_path / "model_index.json").read_text())["teacher_config"]["norm_groups"] == 4
    assert TeacherConfig().norm_groups < min(TeacherConfig().channels)  # the default keeps several channels per group
    for groups in (0, 12):
        with pytest.raises(ValueError, match="norm_groups must divide every entry of channels"):
            build_teacher(tmp_path / f"bad-{groups}", dataclasses.replace(TINY_TEACHER, norm_groups=groups))
        assert not (tmp_path / f"bad-{groups}").exists()  # refused before anything is written


def test_teacher_loss_is_min_snr_weighted_and_reaches_the_pooled_caption(tmp_path, samples):
    teacher = Teacher(build_teacher(tmp_path, TINY_TEACHER))
    images, prompts = samples.float_images()[:6], samples.captions[:6]
    weighted = teacher.denoising_loss(images, prompts, torch.Generator().manual_seed(5), snr_gamma=2.0)
    weighted.backward()
    # the caption also enters through the pooled-text timestep embedding, which is trained
    assert teacher.unet.config.addition_embed_type == "text"
    assert teacher.unet.add_embedding.proj.weight.grad.abs().sum() > 0
    assert teacher.text_encoder.get_input_embeddings().weight.grad.abs().sum() > 0  # phrase by phrase, it still trains

    generator = torch.Generator().manual_seed(5)  # the same draws, weighted by hand
    t = torch.randint(0, teacher.scheduler.config.num_train_timesteps, (6,), generator=generator)
    noise = torch.randn(images.shape, generator=generator)
    with torch.no_grad():
        prediction = teacher.unet(teacher.scheduler.add_noise(images, noise, t), t,
                                  encoder_hidden_states=teacher.encode(prompts)).sample
    per_sample = (prediction - noise).square().mean(dim=(1, 2, 3))
    snr = teacher.scheduler.alphas_cumprod[t] / (1 - teacher.scheduler.alphas_cumprod[t])
    assert (snr > 2.0).any() and (snr < 2.0).any()  # the draws exercise both sides of the clamp
    torch.testing.assert_close(weighted.detach(), (per_sample * snr.clamp(max=2.0) / snr).mean())
    plain = teacher.denoising_loss(images, prompts, torch.Generator().manual_seed(5), snr_gamma=None)
    torch.testing.assert_close(plain.detach(), per_sample.mean())


def test_judge_teacher_samples_each_heads_caption_and_scores_its_attributes():
    """With ``captions`` the teacher samples those words for each head, ``samples_per_head`` times,
    and the verdicts are scored against the heads' own attributes."""
    heads = all_combinations()[:3]
    prompts = []

    class StandInTeacher:
        def sample(self, texts, steps, guidance_scale, generator):
            prompts.extend(texts)
            return torch.zeros(len(texts), 3, 4, 4)

    class StandInJudge:  # right on the first head's samples, wrong (every class shifted) elsewhere
        def predict(self, images):
            per_head = len(images) // len(heads)
            right = attribute_indices([head for head in heads for _ in range(per_head)])
            return torch.where(torch.arange(len(right))[:, None] < per_head, right, right + 1)

    captions = ["one", "two", "three"]
    scores, images = judge_teacher(StandInTeacher(), StandInJudge(), heads, samples_per_head=2, steps=1,
                                   captions=captions)
    assert prompts == ["one", "one", "two", "two", "three", "three"] and images.shape == (6, 3, 4, 4)
    assert all(value == pytest.approx(1 / 3) for value in scores.values())
    prompts.clear()
    judge_teacher(StandInTeacher(), StandInJudge(), heads, samples_per_head=1, steps=1)
    assert prompts == [caption(head, 0) for head in heads]
    with pytest.raises(ValueError, match="captions: one per head expected"):
        judge_teacher(StandInTeacher(), StandInJudge(), heads, captions=captions[:2])


def test_world_build_cli_runs_and_resumes(tmp_path, capsys, monkeypatch):
    from dreamportrait.cli import main
    from dreamportrait.world import build as build_module
    from dreamportrait.world.paraphrases import paraphrase_test_set

    asked = []  # the captions each teacher evaluation samples (None: the canonical ones)
    judged = build_module.judge_teacher
    monkeypatch.setattr(build_module, "judge_teacher",
                        lambda *args, **kwargs: asked.append(kwargs.get("captions")) or judged(*args, **kwargs))
    assert main(["world", "build", "--out", str(tmp_path), "--setting", "tiny"]) == 0
    assert asked == [None, [held_out.text for held_out in paraphrase_test_set()]]
    report = json.loads((tmp_path / "report.json").read_text())
    attributes = {"hair_color", "skin_tone", "hair_style", "beard", "glasses", "hat"}
    assert set(report["judge_accuracy_held_out"]) == attributes
    assert set(report["teacher_accuracy_held_out"]) == attributes
    assert all(0 <= value <= 1 for value in report["teacher_accuracy_held_out"].values())
    assert set(report["teacher_accuracy_held_out_paraphrases"]) == attributes
    assert iio.imread(tmp_path / "teacher_samples.png").shape[1] == 2 * 32  # two held-out captions per row
    assert (tmp_path / "teacher/unet/config.json").is_file() and (tmp_path / "judge/judge.safetensors").is_file()
    state = torch.load(tmp_path / "teacher/training_state.pt", weights_only=True)
    assert state["step"] == 2
    teacher_data = load_dataset(tmp_path / "data/teacher-train")  # rendered with the masks the supervision reads
    assert teacher_data.masks.shape == (64, len(MASK_PARTS), 32, 32) and teacher_data.masks.float().std() > 0
    assert report["config"]["teacher_attention_weight"] > 0 and report["config"]["teacher_attention_terms"] == ["pixels"]
    assert main(["world", "build", "--out", str(tmp_path), "--setting", "tiny"]) == 0  # everything done: quick
    with pytest.raises(SystemExit):
        main(["world", "build", "--out", str(tmp_path), "--setting", "huge"])
    assert "invalid choice: 'huge'" in capsys.readouterr().err


def test_token_regions_mark_each_phrase_where_the_phrase_encoding_puts_its_words(tmp_path):
    teacher = Teacher(build_teacher(tmp_path, TINY_TEACHER))
    config = teacher.text_encoder.config
    heads = random.Random().sample(all_combinations(), 6)
    prompts = [caption(head, phrasing) for head in heads for phrasing in range(3)] + [""]
    # words outside the closed vocabulary are left out, and with them a phrase of nothing else
    prompts += [prompts[0].replace(" with ", " zorbly with ").replace(" hair", " very hair") + ", gentleman"]
    regions = token_regions(teacher.tokenizer, config, prompts, 77)
    encoded = encode_text(teacher.tokenizer, teacher.text_encoder, prompts, warn=False)
    assert regions.shape == (len(prompts), encoded.tokens.shape[1]) and (regions[len(prompts) - 2] == -1).all()
    torch.testing.assert_close(regions[-1], regions[0])
    for row, prompt in enumerate(prompts):
        named = [phrase for phrase in split_phrases(prompt) if phrase_region(phrase) is not None]
        assert sorted({int(r) for r in regions[row] if r >= 0}) == sorted({phrase_region(p) for p in named})
        assert regions[row, 0] == -1 and (regions[row, int(encoded.mask[row].sum()) - 1:] == -1).all()  # start, end
        for phrase in named:  # the marked positions hold exactly the phrase's own states
            alone = encode_text(teacher.tokenizer, teacher.text_encoder, [phrase], warn=False)
            words = int(alone.mask[0].sum()) - 2
            positions = (regions[row] == phrase_region(phrase)).nonzero()[:, 0]
            assert len(positions) == words
            torch.testing.assert_close(encoded.tokens[row, positions], alone.tokens[0, 1:1 + words])
    some = random.Random().sample(list(MASK_PARTS), 2)  # a subset of the regions keeps only its own phrases
    kept = torch.isin(regions, torch.tensor([list(MASK_PARTS).index(part) for part in some]))
    torch.testing.assert_close(token_regions(teacher.tokenizer, config, prompts, 77, some), regions.where(kept, -1))
    with pytest.raises(ValueError, match="parts: expected a collection of names"):
        token_regions(teacher.tokenizer, config, prompts, 77, ["hats"])
    assert phrase_region("a blue hat") == list(MASK_PARTS).index("hat")
    assert phrase_region("a dark-skinned person") == phrase_region("light skin") == list(MASK_PARTS).index("skin")
    assert phrase_region("a photo of a person") is None and phrase_region("a bald head") is None


def test_attention_region_loss_measures_the_attention_outside_each_phrase_region():
    batch, heads, side, length = 2, 3, 4, 6
    masks = torch.rand(batch, len(MASK_PARTS), 2 * side, 2 * side)
    regions = torch.tensor([[-1, 4, 4, 1, -1, -1], [-1, 0, 2, -1, -1, -1]])
    logits = torch.randn(batch * heads, side * side, length, requires_grad=True)
    loss = attention_region_loss([(logits.softmax(-1), heads)], regions, masks)
    coverage = torch.nn.functional.avg_pool2d(masks, 2).flatten(2)  # (B, P, Q)
    token_terms, pixel_terms, pixel_weights = [], [], []
    for b in range(batch):
        attention = logits.softmax(-1)[b * heads:(b + 1) * heads].mean(0)  # (Q, L)
        for token in range(length):
            if regions[b, token] >= 0:
                column = attention[:, token]
                token_terms.append((1 - (column * coverage[b, regions[b, token]]).sum() / column.sum()) ** 2)
        for region in {int(r) for r in regions[b] if r >= 0}:
            on_phrase = attention[:, regions[b] == region].sum(1)  # (Q,)
            pixel_terms.append((coverage[b, region] * (1 - on_phrase) ** 2).sum())
            pixel_weights.append(coverage[b, region].sum())
    tokens, pixels = torch.stack(token_terms).mean(), torch.stack(pixel_terms).sum() / torch.stack(pixel_weights).sum()
    torch.testing.assert_close(loss, tokens + pixels)
    for terms, expected in ((["tokens"], tokens), (("pixels",), pixels)):
        torch.testing.assert_close(attention_region_loss([(logits.softmax(-1), heads)], regions, masks, terms), expected)
    for terms in ("pixels", [], ["pixel"]):
        with pytest.raises(ValueError, match="terms: expected a non-empty collection"):
            attention_region_loss([(logits.softmax(-1), heads)], regions, masks, terms)
    loss.backward()
    assert logits.grad.abs().sum() > 0

    region = torch.zeros(1, len(MASK_PARTS), side, side)
    region[0, 4, :2] = 1  # the hat covers the top half
    top = torch.zeros(1, side * side, 2)
    top[0, :2 * side, 1], top[0, 2 * side:, 0] = 1, 1  # the top half attends only to the hat's token
    hat_token = torch.tensor([[-1, 4]])
    assert attention_region_loss([(top, 1)], hat_token, region) == 0
    assert attention_region_loss([(top.flip(1), 1)], hat_token, region) == 2  # every pixel and token wrong
    sliver = torch.zeros(1, side * side, 2)
    sliver[0, :, 0], sliver[0, 0] = 1, torch.tensor([0.0, 1.0])  # one hat pixel reads the hat, the rest do not
    assert attention_region_loss([(sliver, 1)], hat_token, region) == 7 / 8  # 7 of 8 hat pixels; the token term is 0
    assert attention_region_loss([(top, 1)], torch.tensor([[-1, -1]]), region) == 0  # nothing supervised


def test_attention_supervision_trains_the_cross_attention_towards_the_regions(tmp_path):
    data = render_samples(training_combinations(), 32, 32, seed=int(torch.randint(1 << 30, ())), part_masks=True)
    supervised, control = (Teacher(build_teacher(tmp_path / name, TINY_TEACHER)) for name in ("supervised", "control"))
    processors = {name: type(p) for name, p in supervised.unet.attn_processors.items()}

    def attention_loss(teacher):
        with torch.no_grad():
            return teacher.training_losses(data.float_images()[:16], data.captions[:16], torch.Generator().manual_seed(0),
                                           masks=data.masks[:16].float() / 255)[1]

    before = attention_loss(supervised)
    torch.testing.assert_close(attention_loss(control), before)  # the same initial weights
    losses = train_teacher(supervised, data, steps=30, batch_size=8, lr=1e-2, attention_weight=10.0, progress=False)
    train_teacher(control, data, steps=30, batch_size=8, lr=1e-2, progress=False)
    assert all(torch.isfinite(torch.tensor(losses)))
    assert attention_loss(supervised) < 0.8 * min(before, attention_loss(control))
    assert {name: type(p) for name, p in supervised.unet.attn_processors.items()} == processors  # put back each step
    with pytest.raises(ValueError, match="needs part masks"):
        train_teacher(supervised, render_samples(training_combinations(), 8, 32, seed=0), steps=31, attention_weight=1.0)
    with pytest.raises(ValueError, match="attention_weight must be >= 0"):
        train_teacher(supervised, data, steps=31, attention_weight=-1.0)
    with pytest.raises(ValueError, match="parts: expected a collection of names"):
        train_teacher(supervised, data, steps=31, attention_weight=1.0, attention_parts="hat")
    with pytest.raises(ValueError, match="terms: expected a non-empty collection"):
        train_teacher(supervised, data, steps=31, attention_weight=1.0, attention_terms=["token"])
    whole = Teacher(build_teacher(tmp_path / "whole", dataclasses.replace(TINY_TEACHER, text_encoding="caption")))
    with pytest.raises(ValueError, match="encodes phrases"):
        whole.training_losses(data.float_images()[:2], data.captions[:2], torch.Generator(), masks=data.masks[:2] / 255)
