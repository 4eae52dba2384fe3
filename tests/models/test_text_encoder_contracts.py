"""The text encoder's smaller contracts, against hand-written expectations: which words a vocabulary
holds, the context length, where a model is loaded from, the checked names and their messages, the
UNet context, the features' device, the cache's size and order, and a trainable encoder."""

from types import SimpleNamespace

import pytest
import torch
from tiny_models import write_tiny_clip

from dreamportrait.text.encoder import (TextEncoder, TextFeatures, _resolve, check_encoder_states, check_text_encoding,
                                        context_length, spelled_out_words, text_encoding_of, vocabulary_words)


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
