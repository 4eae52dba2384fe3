"""Text encoder, condition adapters, 3D-aware cross-attention and the text-conditioned generator."""

import math
import warnings

import pytest
import torch
from tiny_models import write_tiny_clip

from dreamportrait.models import build_generator, camera_labels, fov_to_intrinsics, orbit_poses
from dreamportrait.models.renderer import TRIPLANE_AXES
from dreamportrait.text.conditioning import TextConditionedGenerator, line_features
from dreamportrait.text.encoder import TextEncoder, TextFeatures, encode_text, split_phrases

PROMPTS = ["a portrait of a bald man with glasses", "a portrait of a woman with red hair"]


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    return write_tiny_clip(tmp_path_factory.mktemp("clip"))


@pytest.fixture(scope="module")
def encoder(clip_dir):
    return TextEncoder(clip_dir)


def conditioned(encoder, **kwargs):
    base = build_generator("tiny").eval()
    options = {"attention_resolutions": (16, 32), "attention_heads": 2, "attention_head_dim": 8, **kwargs}
    return TextConditionedGenerator(base, encoder.dim, text_encoder=encoder, **options)


def inputs(batch=2):
    yaw = math.pi / 2 + (torch.rand(batch) - 0.5)
    return torch.randn(batch, 64), camera_labels(orbit_poses(yaw, torch.full((batch,), math.pi / 2)),
                                                 fov_to_intrinsics(18.837))


def render(generator, z, c, **kwargs):
    return generator(z, c, noise_mode="const", deterministic_sampling=True, neural_rendering_resolution=8, **kwargs)


def open_everything(generator):
    """Give the zero-initialised paths random values, as training would."""
    with torch.no_grad():
        for block in generator.cross_attention.values():
            block.gate.normal_()
        for mlp in generator.adapters.groups.values():
            mlp[2].weight.normal_(std=0.1)


def test_text_encoder_batches_caches_and_truncates(clip_dir, encoder, monkeypatch):
    features = encoder(PROMPTS + [""])
    assert features.tokens.shape == (3, 77, 32) and features.pooled.shape == (3, 32)
    lengths = [len(ids) for ids in encoder.tokenizer(PROMPTS + [""])["input_ids"]]  # start + words + end
    assert features.mask.sum(1).tolist() == lengths and lengths[0] == 10 and lengths[2] == 2
    assert not any(p.requires_grad for p in encoder.parameters())
    batch = encoder.tokenizer(PROMPTS + [""], padding="max_length", max_length=77, truncation=True, return_tensors="pt")
    with torch.no_grad():  # the whole caption in one sequence, as Stable Diffusion encodes it
        reference = encoder.model(input_ids=batch["input_ids"])
    torch.testing.assert_close(features.tokens, reference.last_hidden_state)
    torch.testing.assert_close(features.pooled, reference.pooler_output)
    assert torch.equal(features.mask, batch["attention_mask"].bool())
    calls = []
    original = encoder.model.forward
    monkeypatch.setattr(encoder.model, "forward", lambda *a, **k: calls.append(1) or original(*a, **k))
    again = encoder([PROMPTS[1], PROMPTS[0]])
    assert not calls  # both cached
    torch.testing.assert_close(again.tokens[0], features.tokens[1], rtol=0, atol=0)
    with pytest.warns(UserWarning, match="1 prompt\\(s\\) longer than the text model's 77 tokens were truncated: "
                                         f"'bald bald .*' loses '{' '.join(['bald'] * 25)}'$"):
        long = encoder(["bald " * 100])  # start, 75 words, end
    assert long.mask.all()
    # The Stable Diffusion layout (tokenizer/ and text_encoder/ subfolders) loads the same way.
    sd_layout = TextEncoder(write_tiny_clip(clip_dir.parent / "sd", layout="stable-diffusion"))
    assert sd_layout(PROMPTS).tokens.shape == (2, 77, 32)


def test_word_tokens_hide_the_end_token_and_padding():
    lengths = torch.randint(2, 12, (5,))  # start + words + end; the shortest is the empty prompt
    lengths[0] = 2
    mask = torch.arange(16) < lengths[:, None]
    features = TextFeatures(torch.randn(5, 16, 8), mask, torch.randn(5, 8))
    words = features.word_tokens()
    for row, length in enumerate(lengths.tolist()):
        torch.testing.assert_close(words[row, :length - 1], features.tokens[row, :length - 1], rtol=0, atol=0)
        assert (words[row, length - 1:] == 0).all()  # the end token (which saw every word) and the padding
    assert torch.equal(features.mask, mask)  # the features themselves are unchanged


def test_text_encoder_bad_input(encoder, tmp_path):
    with pytest.raises(ValueError, match="list of strings"):
        encoder("a bald man")
    with pytest.raises(ValueError, match="prompts is empty"):
        encoder([])
    with pytest.raises(FileNotFoundError, match="not a model directory"):
        TextEncoder(tmp_path / "missing")


def test_split_phrases_at_commas_with_and_and():
    assert split_phrases("a portrait of a man with red hair, glasses and a blue hat") == [
        "a portrait of a man", "red hair", "glasses", "a blue hat"]
    assert split_phrases(" A Woman With Black Hair AND a hat, smiling ") == ["A Woman", "Black Hair", "a hat", "smiling"]
    assert split_phrases("a handsome woman withstanding wind") == ["a handsome woman withstanding wind"]  # whole words
    assert split_phrases("") == [] and split_phrases(" , and with ") == []


def test_phrase_encoding_encodes_each_phrase_alone(tmp_path):
    encoder = TextEncoder(write_tiny_clip(tmp_path, text_encoding="phrases"))
    assert encoder.text_encoding == "phrases"
    prompts = ["a bald man with red hair and a hat", "a bald man with black hair and a hat", "", "with"]
    features = encoder(prompts)

    def alone(phrase):  # (start, words..., end) states of the phrase as its own sequence
        with torch.no_grad():
            return encoder.model(input_ids=torch.tensor([encoder.tokenizer(phrase)["input_ids"]])).last_hidden_state[0]

    for row, phrases in enumerate([["a bald man", "red hair", "a hat"], ["a bald man", "black hair", "a hat"], [""], [""]]):
        states = [alone(phrase) for phrase in phrases]
        end = torch.stack([s[-1] for s in states]).mean(0)
        real = torch.cat([states[0][:1], *(s[1:-1] for s in states), end[None]])
        assert features.mask[row].tolist() == [i < len(real) for i in range(77)]
        torch.testing.assert_close(features.tokens[row, :len(real)], real)
        assert (features.tokens[row, len(real):] == 0).all()  # padding is zero, not a padding token's state
        torch.testing.assert_close(features.pooled[row], end)
    hat = slice(6, 8)  # "a hat" (after start + 3 + 2 words in both) reads the same whatever the hair
    torch.testing.assert_close(features.tokens[0, hat], features.tokens[1, hat], rtol=0, atol=0)
    with pytest.warns(UserWarning, match="2 prompt\\(s\\) longer .* truncated: 'bald hair, .*' loses "
                                         "'hair bald hair bald hair'; 'bald bald .*' loses 'bald bald bald "):
        many = encoder(["bald hair, " * 40, "bald " * 100])  # too many phrases; one phrase too long
    assert many.mask.all()
    torch.testing.assert_close(many.pooled[0], alone("bald hair")[-1])  # all 40 phrases are the same
    with pytest.raises(ValueError, match="text_encoding must be one of"):
        TextEncoder(write_tiny_clip(tmp_path / "bad", text_encoding="sentences"))


@pytest.mark.parametrize("closed_vocabulary", [False, True])
@pytest.mark.parametrize("text_encoding", ["caption", "phrases"])
def test_words_outside_the_vocabulary_are_named_once(tmp_path, text_encoding, closed_vocabulary):
    # The tiny tokenizer, like the world's, holds a closed vocabulary and spells any other word
    # letter by letter, which its text model does not read; a config saying so leaves them out.
    encoder = TextEncoder(write_tiny_clip(tmp_path, text_encoding=text_encoding, closed_vocabulary=closed_vocabulary))
    with pytest.warns(UserWarning) as caught:
        encoder(["a purple man with glasses", "a bald woman wearing a hat", "a man with a purple hat"])
    messages = [str(warning.message) for warning in caught]
    assert len(messages) == 1 and str(tmp_path / "vocab.json") in messages[0], messages
    treatment = ("left out (the model was trained on a closed vocabulary and cannot read them)" if closed_vocabulary
                 else "spelled letter by letter (a model trained on a closed vocabulary does not read them)")
    assert f"vocabulary does not hold, {treatment}: " in messages[0]
    assert "): 'purple', 'wearing'; the vocabulary" in messages[0]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        encoder(["a bald man with glasses, smiling", "a purple man with glasses"])  # known words; cached


@pytest.mark.parametrize("text_encoding", ["caption", "phrases"])
def test_cached_features_do_not_depend_on_the_batch_a_prompt_first_came_in(tmp_path, text_encoding):
    # Training reads prompts through the cache: if a prompt's cached features depended on its first
    # batch, a resumed run (fresh cache, other batches) would drift from an uninterrupted one. In
    # phrase encoding a batch's padding width follows its longest prompt, which changes the last bits.
    encoder = TextEncoder(write_tiny_clip(tmp_path, text_encoding=text_encoding))
    long = "a bald man with red hair, black hair, blond hair, glasses and a hat, smiling"
    prompts = ["", "a man with glasses", "a woman with blond hair and a hat"]
    first = encoder([long, *prompts])  # each encoded for the first time, next to the long prompt
    for index, prompt in enumerate(prompts, start=1):
        with torch.no_grad():
            alone = encode_text(encoder.tokenizer, encoder.model, [prompt])
        for cached, row in ((first, index), (encoder([prompt]), 0)):
            assert torch.equal(cached.tokens[row], alone.tokens[0]), repr(prompt)
            assert torch.equal(cached.pooled[row], alone.pooled[0]), repr(prompt)


@pytest.mark.parametrize("axes", ["eg3d", "orthogonal"])
def test_line_features_average_each_texels_3d_line(axes):
    order = TRIPLANE_AXES[axes]
    resolution = 5
    planes = torch.randn(2, 3, 4, resolution, resolution, dtype=torch.float64)
    result = line_features(planes, order)
    assert result.shape == (2, 3, 8, resolution, resolution)
    for p in range(3):
        u, v = order[2 * p], order[2 * p + 1]
        missing = 3 - u - v
        for i in range(resolution):  # row: coordinate along v
            for j in range(resolution):  # column: coordinate along u
                others = []
                for q in (q for q in range(3) if q != p):
                    samples = []
                    for k in range(resolution):  # walk the 3D line through the texel
                        point = [0, 0, 0]
                        point[u], point[v], point[missing] = j, i, k
                        samples.append(planes[:, q, :, point[order[2 * q + 1]], point[order[2 * q]]])
                    others.append(torch.stack(samples).mean(0))
                torch.testing.assert_close(result[:, p, :, i, j], torch.cat(others, dim=1))


def test_identity_at_initialisation(encoder):
    generator = conditioned(encoder)
    z, c = inputs()
    with torch.no_grad():
        expected = render(generator.base, z, c)
        for prompts in (PROMPTS, ["", "a bald man"]):
            out = render(generator, z, c, prompts=prompts)
            for key in ("image", "image_raw", "image_depth"):
                assert torch.equal(out[key], expected[key]), key


def test_gradients_reach_adapters_and_gates(encoder):
    generator = conditioned(encoder)
    z, c = inputs()
    out = render(generator, z, c, prompts=PROMPTS)
    (out["image"].square().mean() + out["image_raw"].mean()).backward()
    for name, mlp in generator.adapters.groups.items():
        assert mlp[2].weight.grad.abs().sum() > 0, name
    for res, block in generator.cross_attention.items():
        assert block.gate.grad.abs().sum() > 0, res
    groups = generator.parameter_groups()
    assert {id(p) for p in groups["base"]} == {id(p) for p in generator.base.parameters()}
    assert sum(map(len, groups.values())) == len(list(generator.parameters()))


def test_padding_mask_is_honoured(encoder):
    generator = conditioned(encoder)
    open_everything(generator)
    z, c = inputs()
    text = encoder(PROMPTS)
    scrambled = torch.where(text.mask[..., None], text.tokens, torch.randn_like(text.tokens) * 10)
    with torch.no_grad():
        a = render(generator, z, c, text=text)
        b = render(generator, z, c, text=TextFeatures(scrambled, text.mask, text.pooled))
        other = render(generator, z, c, text=encoder(PROMPTS[::-1]))
    assert_close = torch.testing.assert_close
    assert_close(b["image"], a["image"], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(other["image"], a["image"], atol=1e-4)


def test_training_separates_two_prompts(encoder):
    generator = conditioned(encoder)
    groups = generator.parameter_groups()
    optimiser = torch.optim.Adam([{"params": groups["adapters"], "lr": 1e-2},
                                  {"params": groups["cross_attention"], "lr": 1e-2}])
    z, c = inputs(1)
    z, c = z.expand(2, -1), c.expand(2, -1)

    def contrast():  # toy objective: prompt 0's render brighter than prompt 1's, by 1
        out = render(generator, z, c, prompts=PROMPTS)["image"]
        return out[0].mean() - out[1].mean(), out

    start, out = contrast()
    torch.testing.assert_close(out[0], out[1])  # the same at init
    for _ in range(10):
        optimiser.zero_grad()
        value, _ = contrast()
        (value - 1).square().backward()
        optimiser.step()
    end, out = contrast()
    assert end > start + 0.05
    assert (out[0] - out[1]).abs().max() > 0.05


def test_ablations_and_bad_input(encoder):
    z, c = inputs()
    without_attention = conditioned(encoder, use_cross_attention=False)
    without_adapters = conditioned(encoder, use_adapters=False)
    assert not len(without_attention.cross_attention) and without_adapters.adapters is None
    for generator in (without_attention, without_adapters):
        assert render(generator, z, c, prompts=PROMPTS)["image"].shape == (2, 3, 64, 64)
    generator = conditioned(encoder)
    with pytest.raises(ValueError, match="exactly one of prompts"):
        render(generator, z, c)
    with pytest.raises(ValueError, match="1 prompts/text features for a batch of 2"):
        render(generator, z, c, prompts=PROMPTS[:1])
    with pytest.raises(ValueError, match="attention_resolutions: 12"):
        conditioned(encoder, attention_resolutions=(12,))
    base = build_generator("tiny")
    generator.load_base_state_dict(base.state_dict())
    with pytest.raises(ValueError, match="missing keys: decoder.net.0.bias"):
        generator.load_base_state_dict({k: v for k, v in base.state_dict().items() if k != "decoder.net.0.bias"})


def test_text_conditioned_checkpoint_round_trip(encoder, tmp_path):
    from dreamportrait.models import load_pretrained, save_pretrained

    generator = conditioned(encoder, adapter_boundaries=(8, 32))
    open_everything(generator)
    save_pretrained(tmp_path, generator)
    loaded, discriminator = load_pretrained(tmp_path)
    assert isinstance(loaded, TextConditionedGenerator) and discriminator is None
    assert loaded.init_kwargs == generator.init_kwargs and loaded.text_encoder.source == encoder.source
    z, c = inputs()
    with torch.no_grad():
        expected, actual = render(generator, z, c, prompts=PROMPTS), render(loaded, z, c, prompts=PROMPTS)
    torch.testing.assert_close(actual["image"], expected["image"], rtol=0, atol=0)
