"""The text encoder's smaller contracts, against hand-written expectations: which words a vocabulary
holds, the context length, where a model is loaded from, the checked names and their messages, the
UNet context, the features' device, the cache's size and order, and a trainable encoder."""

import random
import warnings
from types import SimpleNamespace

import pytest
import torch
from tiny_models import write_tiny_clip

from dreamportrait.text.encoder import (TextEncoder, TextFeatures, _resolve, check_encoder_states, check_text_encoding,
                                        closed_vocabulary_of, context_length, encode_text, read_sequences,
                                        spelled_out_words, text_encoding_of, vocabulary_words, warn_about_unread_words)


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    return write_tiny_clip(tmp_path_factory.mktemp("clip"))


def test_vocabulary_words_are_the_whole_words_of_two_or_more_letters():
    vocabulary = {"bald</w>": 0, "a</w>": 1, "ab</w>": 2, "hat": 3, "glasses</w>": 4, "b": 5, "man</w>": 6}
    assert vocabulary_words(vocabulary) == ["ab", "bald", "glasses", "man"]


def test_context_length_is_the_smaller_of_the_tokenizers_and_the_models():
    def length(tokens, positions):
        return context_length(SimpleNamespace(model_max_length=tokens),
                              SimpleNamespace(config=SimpleNamespace(max_position_embeddings=positions)))

    assert length(100, 77) == 77 and length(50, 77) == 50 and length(77, 77) == 77


def test_checked_names_and_their_messages():
    assert check_encoder_states("all") == "all" and check_encoder_states("words") == "words"
    assert check_text_encoding("caption") == "caption" and check_text_encoding("phrases") == "phrases"
    with pytest.raises(ValueError, match=r"^encoder_states must be one of \('all', 'words'\), got 'tokens'$"):
        check_encoder_states("tokens")
    with pytest.raises(ValueError, match=r"^text_encoding must be one of \('caption', 'phrases'\), got 'x'$"):
        check_text_encoding("x")
    assert text_encoding_of(SimpleNamespace()) == "caption"  # a config without the entry
    assert text_encoding_of(SimpleNamespace(text_encoding="phrases")) == "phrases"
    with pytest.raises(ValueError, match="text_encoding must be one of"):
        text_encoding_of(SimpleNamespace(text_encoding="words"))


def test_a_model_is_loaded_from_a_directory_its_subfolder_or_the_hub(tmp_path):
    (tmp_path / "flat").mkdir()
    (tmp_path / "sd" / "tokenizer").mkdir(parents=True)
    assert _resolve(tmp_path / "flat", "tokenizer") == (str(tmp_path / "flat"), {})
    assert _resolve(tmp_path / "sd", "tokenizer") == (str(tmp_path / "sd" / "tokenizer"), {})
    assert _resolve("someone/some-model", "text_encoder") == ("someone/some-model", {"subfolder": "text_encoder"})
    (tmp_path / "file").write_text("")
    for missing in (tmp_path / "file", "./nothing-here", "/nothing-here", "~/nothing-here"):
        with pytest.raises(FileNotFoundError, match=r"^text encoder: .* is not a model directory$"):
            _resolve(missing, "tokenizer")


def test_the_unet_context_and_the_features_device():
    mask = torch.tensor([[True, True, True, False], [True, True, False, False]])
    features = TextFeatures(torch.randn(2, 4, 3), mask, torch.randn(2, 3))
    assert len(features) == 2
    assert features.unet_context("all") is features.tokens
    words = features.unet_context("words")  # the end tokens (index 2 and 1) and the padding zeroed
    assert torch.equal(words[0, :2], features.tokens[0, :2]) and (words[0, 2:] == 0).all()
    assert torch.equal(words[1, :1], features.tokens[1, :1]) and (words[1, 1:] == 0).all()
    with pytest.raises(ValueError, match="encoder_states must be one of"):
        features.unet_context("pooled")
    moved = features.to("meta")
    assert {moved.tokens.device.type, moved.mask.device.type, moved.pooled.device.type} == {"meta"}
    assert moved.mask.dtype == torch.bool and moved.tokens.shape == (2, 4, 3)


def test_spelled_out_words_are_those_mostly_in_single_letters(clip_dir):
    encoder = TextEncoder(clip_dir)
    ids = encoder.tokenizer("a bald man wearing a purple hat")["input_ids"][1:-1]
    assert spelled_out_words(encoder.tokenizer, ids) == ["wearing", "purple"]
    assert spelled_out_words(encoder.tokenizer, encoder.tokenizer("a bald man")["input_ids"][1:-1]) == []


@pytest.mark.parametrize("text_encoding", ["caption", "phrases"])
def test_a_closed_vocabulary_model_leaves_out_the_words_it_does_not_hold(tmp_path, text_encoding):
    closed = TextEncoder(write_tiny_clip(tmp_path / "closed", text_encoding=text_encoding, closed_vocabulary=True))
    open_ = TextEncoder(write_tiny_clip(tmp_path / "open", text_encoding=text_encoding))
    open_.model.load_state_dict(closed.model.state_dict())  # the same weights: only the reading differs
    assert closed_vocabulary_of(closed.model.config) and not closed_vocabulary_of(open_.model.config)
    unknown = ["wearing", "purple", "zq", "gentleman", "--"]  # each spelled in two or more pieces
    for word in unknown:
        assert len(closed.tokenizer(word)["input_ids"]) > 3, word
    rng = random.Random()
    base = rng.choice(["a bald man with red hair, glasses and a hat", "a portrait of a woman with black hair and a beard"])
    words = base.split(" ")
    for word in rng.sample(unknown, 3):  # unknown words anywhere, a phrase of only them too
        words.insert(rng.randrange(len(words) + 1), word)
    # read whole, a caption keeps the comma; read by phrases, a phrase of unknown words goes entirely
    separator = ", " if text_encoding == "phrases" else " "
    noisy = separator.join([rng.choice(unknown), " ".join(words), rng.choice(unknown)])
    with pytest.warns(UserWarning, match=r"left out \(the model was trained on a closed vocabulary"):
        read = closed([noisy])
    expected = open_([base])  # the open model reads the prompt without the unknown words
    torch.testing.assert_close(read.tokens, expected.tokens)
    torch.testing.assert_close(read.mask, expected.mask)
    torch.testing.assert_close(read.pooled, expected.pooled)
    with pytest.warns(UserWarning, match="spelled letter by letter"):
        spelled = open_([noisy])
    assert spelled.mask.sum() > expected.mask.sum()  # the open model reads the pieces
    sequences, left_out = read_sequences(closed.tokenizer, closed.model.config, noisy)
    assert sorted(left_out) == sorted(w for w in noisy.replace(",", " ").split() if w in unknown)
    assert [ids for _, ids in sequences] == [ids for _, ids in read_sequences(open_.tokenizer, open_.model.config, base)[0]]
    nothing, _ = read_sequences(closed.tokenizer, closed.model.config, "wearing purple gentleman")
    assert nothing == [("", closed.tokenizer("")["input_ids"])]  # nothing left: the empty prompt
    assert not closed.reads_words("wearing purple gentleman") and closed.reads_words(noisy)
    assert closed.reads_words("wearing a gentleman")  # one word is enough
    assert open_.reads_words("wearing purple gentleman")  # its pieces are read
    with pytest.raises(ValueError, match=r"^closed_vocabulary must be true or false in the text model's config, got 'yes'$"):
        closed_vocabulary_of(SimpleNamespace(closed_vocabulary="yes"))


def test_the_cache_keeps_the_most_recently_used_prompts(clip_dir, monkeypatch):
    encoder = TextEncoder(clip_dir, cache_size=2)
    encoded = []
    original = encoder._encode
    monkeypatch.setattr(encoder, "_encode", lambda prompts: encoded.append(list(prompts)) or original(prompts))
    encoder(["a bald man", "a woman"])
    assert encoded == [["a bald man"], ["a woman"]]  # one at a time
    encoder(["a bald man"])  # cached, and now the most recent
    encoder(["a man with glasses"])  # evicts "a woman", the least recently used
    encoder(["a bald man"])
    assert encoded[2:] == [["a man with glasses"]]
    encoder(["a woman"])
    assert encoded[3:] == [["a woman"]]
    uncached = TextEncoder(clip_dir, cache_size=0)
    monkeypatch.setattr(uncached, "_encode", lambda prompts: encoded.append(list(prompts)) or original(prompts))
    uncached(["a bald man", "a woman", "a bald man"])
    assert encoded[4:] == [["a bald man", "a woman"]]  # one batch of the distinct prompts, nothing kept
    # a batch of more distinct prompts than the cache holds is served whole; its last ones stay
    batch = ["a bald man", "a woman", "a man with glasses"]
    features = encoder(batch)
    torch.testing.assert_close(features.pooled, TextEncoder(clip_dir, cache_size=0)(batch).pooled)
    assert list(encoder._cache) == ["a woman", "a man with glasses"]


def test_a_trainable_encoder_trains_and_is_never_cached(clip_dir):
    frozen = TextEncoder(clip_dir)
    assert frozen.dim == 32 and frozen.context_length == 77 and not frozen.trainable
    frozen.train()
    assert frozen.training and not frozen.model.training  # a frozen encoder keeps its dropout off
    assert not any(p.requires_grad for p in frozen.model.parameters())
    trainable = TextEncoder(clip_dir, trainable=True)
    assert all(p.requires_grad for p in trainable.model.parameters())
    trainable.train()
    assert trainable.model.training
    features = trainable(["a bald man"])
    assert features.tokens.requires_grad and features.pooled.requires_grad
    features.pooled.sum().backward()
    assert any(p.grad is not None for p in trainable.model.parameters())
    again = trainable(["a bald man"])
    assert again.tokens.grad_fn is not None and again.tokens is not features.tokens
    with torch.no_grad():
        assert not trainable(["a bald man"]).tokens.requires_grad
    trainable.eval()
    assert not trainable.model.training
    assert TextEncoder(clip_dir, dtype=torch.float64)(["a man"]).tokens.dtype == torch.float64


def test_refusals_word_for_word(clip_dir):
    encoder = TextEncoder(clip_dir)
    assert encoder.source == str(clip_dir)
    with pytest.raises(ValueError, match=r"^prompts must be a list of strings \(one per sample\); wrap a single "
                                         r"prompt in a list$"):
        encoder("a man")
    with pytest.raises(ValueError, match="^prompts is empty: give at least one prompt$"):
        encoder([])


def test_a_stable_diffusion_checkpoint_is_read_from_its_subfolders(tmp_path):
    encoder = TextEncoder(write_tiny_clip(tmp_path, layout="stable-diffusion"))
    assert encoder.tokenizer.name_or_path == str(tmp_path / "tokenizer")
    assert encoder.model.name_or_path == str(tmp_path / "text_encoder")


def test_caches_of_one_prompt_and_none_and_a_trainable_encoder_that_never_caches(clip_dir, monkeypatch):
    encoded = []

    def counting(encoder):
        original = encoder._encode
        monkeypatch.setattr(encoder, "_encode", lambda prompts: encoded.append(list(prompts)) or original(prompts))
        return encoder

    one = counting(TextEncoder(clip_dir, cache_size=1))
    one(["a man"]), one(["a man"])
    assert encoded == [["a man"]]
    trainable = counting(TextEncoder(clip_dir, trainable=True))
    trainable(["a man"]), trainable(["a man", "a woman"])
    assert encoded[1:] == [["a man"], ["a man", "a woman"]]  # every call encodes, in one batch


@pytest.mark.parametrize("text_encoding", ["caption", "phrases"])
def test_features_are_made_on_the_text_models_device_at_its_context_length(tmp_path, text_encoding):
    encoder = TextEncoder(write_tiny_clip(tmp_path, text_encoding=text_encoding), device="meta")
    assert next(encoder.model.parameters()).device.type == "meta"
    features = encoder(["a bald man with red hair", "a woman"])
    assert {features.tokens.device.type, features.mask.device.type, features.pooled.device.type} == {"meta"}
    assert features.tokens.shape == (2, 77, 32) and features.mask.shape == (2, 77)
    assert features.word_tokens().device.type == "meta"


class StandInTokenizer:
    """Token ids are indices into ``pieces``; a piece ending in ``</w>`` ends a word."""

    def __init__(self, pieces):
        self.pieces = pieces

    def convert_ids_to_tokens(self, ids):
        return [self.pieces[i] for i in ids]

    def decode(self, ids):
        return "".join(self.pieces[i].replace("</w>", " ") for i in ids)


def test_a_word_is_spelled_out_when_more_than_half_its_pieces_are_single_letters():
    tokenizer = StandInTokenizer(["a</w>", "x", "y</w>", "yz</w>", "ha", "t", "ter</w>", "p", "u", "ple</w>"])
    assert spelled_out_words(tokenizer, [0]) == []  # one piece: a word of the vocabulary
    assert spelled_out_words(tokenizer, [1, 2]) == ["xy"]  # 2 of 2 single letters
    assert spelled_out_words(tokenizer, [1, 3]) == []  # 1 of 2: not more than half
    assert spelled_out_words(tokenizer, [4, 5, 6]) == []  # 1 of 3
    assert spelled_out_words(tokenizer, [7, 8, 7, 9, 0, 1, 2]) == ["pupple", "xy"]  # 3 of 4, then "a", then 2 of 2


def test_truncation_warnings_name_each_prompt_and_what_it_loses(clip_dir):
    encoder = TextEncoder(clip_dir)

    def warned(prompts):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            warn_about_unread_words(encoder.tokenizer, encoder.model, prompts)
        return [str(warning.message) for warning in caught]

    assert warned(["bald " * 75]) == []  # 75 words, start and end: 77 tokens
    (message,) = warned(["bald " * 76])
    prefix = "1 prompt(s) longer than the text model's 77 tokens were truncated: "
    assert message == prefix + repr(("bald " * 76)[:60]) + " loses 'bald'"
    (message,) = warned(["bald " * 150])  # 75 words lost: 374 characters, 200 of them named
    assert message.endswith(" loses " + repr(("bald " * 75).strip()[:200]))
    # A caption is counted whole, with its "with" and "and" (the phrases' separators).
    assert len(warned(["bald " * 74 + "with bald"])) == 1
    (message,) = warned([f"bald {index} " * 40 for index in range(6)])
    assert message.startswith("6 prompt(s) longer") and message.count(" loses ") == 5
    with pytest.warns(UserWarning, match="'wearing'"):  # encode_text warns by default
        encode_text(encoder.tokenizer, encoder.model, ["a man wearing a hat"])
