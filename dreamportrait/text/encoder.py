"""Prompts -> CLIP text features (transformers ``CLIPTokenizer`` + ``CLIPTextModel``)."""

from __future__ import annotations

import re
import warnings
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn


ENCODER_STATES = ("all", "words")
TEXT_ENCODINGS = ("caption", "phrases")
_PHRASE_BREAK = re.compile(r"\s*(?:,|\bwith\b|\band\b)\s*", re.IGNORECASE)


def _one_of(name: str, value: str, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")
    return value


def check_encoder_states(value: str) -> str:
    """``value`` if it names which encoder states a diffusion UNet reads (:data:`ENCODER_STATES`)."""
    return _one_of("encoder_states", value, ENCODER_STATES)


def text_encoding_of(config) -> str:
    """How a text model's config says prompts are encoded (:func:`encode_text`): ``"caption"``
    (whole, as CLIP and Stable Diffusion do; what a config without the entry means) or
    ``"phrases"`` (each phrase alone; world teachers built with ``TeacherConfig(text_encoding=...)``)."""
    return check_text_encoding(getattr(config, "text_encoding", "caption"))


def check_text_encoding(value: str) -> str:
    """``value`` if it names how prompts are encoded (:data:`TEXT_ENCODINGS`)."""
    return _one_of("text_encoding", value, TEXT_ENCODINGS)


def closed_vocabulary_of(config) -> bool:
    """Whether a text model's config says it was trained on a closed vocabulary
    (``closed_vocabulary: true``, which world teachers' builds record; a config without the entry,
    CLIP's among them, means no). Such a model has never seen a word its vocabulary does not hold
    as one token: spelled piece by piece, the word would reach it as pieces with untrained
    embeddings, so :func:`encode_text` leaves it out (:func:`read_sequences`)."""
    value = getattr(config, "closed_vocabulary", False)
    if not isinstance(value, bool):
        raise ValueError(f"closed_vocabulary must be true or false in the text model's config, got {value!r}")
    return value


def split_phrases(prompt: str) -> list[str]:
    """The phrases of ``prompt``: its text between commas and the words "with" and "and", which
    are dropped ("a portrait of a man with red hair, glasses and a blue hat" -> ["a portrait of a
    man", "red hair", "glasses", "a blue hat"]); ``[]`` for a prompt of only such separators."""
    return [phrase for phrase in _PHRASE_BREAK.split(prompt.strip()) if phrase]


@dataclass(frozen=True)
class TextFeatures:
    """A batch of encoded prompts.

    tokens ``(B, L, D)``: the text model's last hidden states (L = 77 for CLIP);
    mask ``(B, L)`` bool, True for real tokens (start, words, end), False for padding;
    pooled ``(B, D)``: the pooled embedding (the end token's state).
    """

    tokens: Tensor
    mask: Tensor
    pooled: Tensor

    def __len__(self) -> int:
        return self.tokens.shape[0]

    def to(self, device) -> TextFeatures:
        return TextFeatures(self.tokens.to(device), self.mask.to(device), self.pooled.to(device))

    def word_tokens(self) -> Tensor:
        """``tokens`` with the end token's and the padding's states set to zero ``(B, L, D)``:
        in a causal text model only those have seen the whole prompt, so a diffusion model given
        this reads each word's own state instead of a summary (see ``TeacherConfig.encoder_states``)."""
        keep = self.mask.clone()
        keep[torch.arange(keep.shape[0], device=keep.device), keep.sum(1) - 1] = False  # the end token
        return self.tokens * keep.unsqueeze(-1).to(self.tokens.dtype)

    def unet_context(self, encoder_states: str) -> Tensor:
        """The ``encoder_hidden_states`` ``(B, L, D)`` of a diffusion UNet trained to read
        ``encoder_states``: ``"all"`` the tokens (Stable Diffusion), ``"words"`` :meth:`word_tokens`."""
        return self.word_tokens() if check_encoder_states(encoder_states) == "words" else self.tokens


def context_length(tokenizer, model) -> int:
    """Tokens per prompt: the tokenizer's limit, capped by the model's positions (77 for CLIP)."""
    return min(tokenizer.model_max_length, model.config.max_position_embeddings)


def _words(tokenizer, ids: list[int]) -> list[list[int]]:
    """``ids`` (without start and end) grouped into words: each word's pieces up to the one that
    ends it (``</w>``, which CLIP's BPE puts on every word's last piece)."""
    words, word = [], []
    for token_id, token in zip(ids, tokenizer.convert_ids_to_tokens(ids)):
        word.append(token_id)
        if token.endswith("</w>"):
            words.append(word)
            word = []
    return words


def read_sequences(tokenizer, config, prompt: str) -> tuple[list[tuple[str, list[int]]], list[str]]:
    """What :func:`encode_text` runs the text model on for ``prompt``: ``(text, ids)`` for the
    prompt whole or, with ``text_encoding="phrases"``, for each of its :func:`split_phrases`; ids
    are start, words, end, untruncated. Under a :func:`closed_vocabulary_of` model, each word that
    is not one token of the vocabulary is left out, and so is a phrase left without words; the
    words left out are returned second. A prompt with nothing left reads as the empty prompt."""
    texts = split_phrases(prompt) if text_encoding_of(config) == "phrases" else [prompt]
    closed = closed_vocabulary_of(config)
    sequences, left_out = [], []
    for text, ids in zip(texts, tokenizer(texts)["input_ids"] if texts else []):
        if closed:
            words = _words(tokenizer, ids[1:-1])
            left_out += [tokenizer.decode(word).strip() for word in words if len(word) > 1]
            ids = ids[:1] + [word[0] for word in words if len(word) == 1] + ids[-1:]
            if len(ids) == 2:
                continue
        sequences.append((text, ids))
    return sequences or [("", tokenizer("")["input_ids"])], left_out


def encode_text(tokenizer, model, prompts: list[str], warn: bool = True) -> TextFeatures:
    """``prompts`` encoded by a CLIP ``tokenizer`` and text ``model`` (gradients as the caller's
    context allows), each padded to :func:`context_length` tokens L, as the model's config says
    (:func:`text_encoding_of`):

    - ``"caption"``: the prompt in one sequence (start, words, end, padding), as Stable Diffusion.
    - ``"phrases"``: each of :func:`split_phrases` in its own sequence (as Structured Diffusion
      Guidance, Feng et al. 2023, encodes noun phrases), laid out as start, the words of each
      phrase in order, one end token holding the mean of the phrases' end states (also
      ``pooled``), then zeros. A causal text model's state of "hat" in "red hair and a blue hat"
      has seen "red"; encoded alone, "a blue hat" reads the same in every caption.

    Over-long prompts are truncated to L (keeping the end token). Words the vocabulary does not
    hold as one token are left out under a closed vocabulary (:func:`read_sequences`), else read
    as the pieces the tokenizer spells them in. With ``warn``, both are named in a warning
    (:func:`warn_about_unread_words`).
    """
    length = context_length(tokenizer, model)
    device = next(model.parameters()).device
    by_phrase = text_encoding_of(model.config) == "phrases"
    read = [read_sequences(tokenizer, model.config, prompt) for prompt in prompts]
    sequences = [[tuple(ids) for _, ids in own] for own, _ in read]
    unique = list(dict.fromkeys(ids for own in sequences for ids in own))  # each: start, words, end
    if warn:
        _warn(tokenizer, model, prompts, read, stacklevel=3)
    width = length if not by_phrase else min(max(map(len, unique)), length)
    ids = [row if len(row) <= width else row[:width - 1] + row[-1:] for row in unique]  # keep the end token
    words = {key: len(row) - 2 for key, row in zip(unique, ids)}  # word tokens kept per sequence
    batch = torch.full((len(ids), width), tokenizer.pad_token_id, dtype=torch.long)
    for row, tokens in enumerate(ids):
        batch[row, :len(tokens)] = torch.tensor(tokens)
    output = model(input_ids=batch.to(device))
    states, row_of = output.last_hidden_state, {key: row for row, key in enumerate(unique)}
    if not by_phrase:
        # CLIP's text model is causal: padding after the end token cannot change real tokens, so
        # the mask is given to the cross-attention rather than to the text model.
        rows = torch.tensor([row_of[own[0]] for own in sequences], device=device)
        mask = torch.arange(length) < torch.tensor([words[own[0]] + 2 for own in sequences])[:, None]
        return TextFeatures(states[rows], mask.to(device), output.pooler_output[rows])
    tokens, pooled, lengths = [], [], []
    for texts in sequences:
        start = states[row_of[texts[0]], :1]
        word_states = [states[row_of[t], 1:1 + words[t]] for t in texts]
        end = torch.stack([states[row_of[t], 1 + words[t]] for t in texts]).mean(0, keepdim=True)
        real = torch.cat([start, *word_states])[:length - 1]
        tokens.append(torch.cat([real, end, end.new_zeros(length - 1 - len(real), end.shape[1])]))
        pooled.append(end[0])
        lengths.append(len(real) + 1)
    mask = torch.arange(length) < torch.tensor(lengths)[:, None]
    return TextFeatures(torch.stack(tokens), mask.to(device), torch.stack(pooled))


def vocabulary_words(vocabulary: dict[str, int]) -> list[str]:
    """The words of two or more characters a CLIP tokenizer's vocabulary (``get_vocab()``, or its
    ``vocab.json``) holds as single tokens: what a model trained on a closed vocabulary can read."""
    return sorted(token[:-4] for token in vocabulary if token.endswith("</w>") and len(token) > 5)


def spelled_out_words(tokenizer, ids: list[int]) -> list[str]:
    """The words of a tokenised text (``ids`` without start and end) that the tokenizer could only
    spell mostly letter by letter (single letters are most of their pieces), not as a whole word
    or word pieces of its vocabulary. For the world's closed vocabulary that is any word outside
    it; a full CLIP vocabulary splits a rare word into longer pieces ("hatter", "s")."""
    unread, word = [], []
    for token_id, token in zip(ids, tokenizer.convert_ids_to_tokens(ids)):
        word.append((token_id, token.removesuffix("</w>")))
        if token.endswith("</w>"):
            if len(word) > 1 and 2 * sum(len(piece) == 1 for _, piece in word) > len(word):
                unread.append(tokenizer.decode([token_id for token_id, _ in word]).strip())
            word = []
    return unread


def warn_about_unread_words(tokenizer, model, prompts: Sequence[str], stacklevel: int = 2) -> None:
    """Warn, once for all ``prompts``, about the words the text model will not read: those past its
    :func:`context_length` (truncated) and those its vocabulary does not hold (left out under a
    closed vocabulary, :func:`read_sequences`; else spelled out, :func:`spelled_out_words`)."""
    _warn(tokenizer, model, prompts, [read_sequences(tokenizer, model.config, prompt) for prompt in prompts],
          stacklevel + 1)


def _warn(tokenizer, model, prompts: Sequence[str], read: list, stacklevel: int) -> None:
    """:func:`warn_about_unread_words` given each prompt's :func:`read_sequences` (``read``), which
    :func:`encode_text` has already made."""
    length = context_length(tokenizer, model)
    closed = closed_vocabulary_of(model.config)
    dropped, unread = [], []
    for prompt, (sequences, left_out) in zip(prompts, read):
        rows = [ids[1:-1] for _, ids in sequences]
        words = [token for row in rows for token in row]  # as :func:`encode_text` lays them out
        if len(words) > length - 2:  # the start and end tokens stay
            dropped.append(f"{prompt[:60]!r} loses {tokenizer.decode(words[length - 2:]).strip()[:200]!r}")
        unread += left_out if closed else [word for row in rows for word in spelled_out_words(tokenizer, row)]
    if dropped:
        warnings.warn(f"{len(dropped)} prompt(s) longer than the text model's {length} tokens were truncated: "
                      + "; ".join(dropped[:5]), stacklevel=stacklevel + 1)
    if unread:
        treatment = ("left out (the model was trained on a closed vocabulary and cannot read them)" if closed else
                     "spelled letter by letter (a model trained on a closed vocabulary does not read them)")
        warnings.warn(f"words the text model's vocabulary does not hold, {treatment}: "
                      f"{', '.join(map(repr, dict.fromkeys(unread)))}; the vocabulary: "
                      f"{Path(tokenizer.name_or_path) / 'vocab.json'} (`dreamportrait info` lists the packaged "
                      f"generator's)", stacklevel=stacklevel + 1)


def _resolve(source: str | Path, subfolder: str) -> tuple[str, dict]:
    """A local directory (with or without the subfolder) or a hub id, as from_pretrained arguments."""
    path = Path(source)
    if path.is_dir():
        if (path / subfolder).is_dir():
            return str(path / subfolder), {}
        return str(path), {}
    if path.exists() or str(source).startswith((".", "/", "~")):
        raise FileNotFoundError(f"text encoder: {source} is not a model directory")
    return str(source), {"subfolder": subfolder}


class TextEncoder(nn.Module):
    """A CLIP text encoder: ``encoder(["a bald man", ""])`` -> :class:`TextFeatures`.

    Args:
        source: a directory written by ``save_pretrained`` (holding the tokenizer and text model
            files, or a Stable Diffusion checkpoint with ``tokenizer/`` and ``text_encoder/``
            subfolders), or a hub id of such a checkpoint.
        trainable: keep gradients for the text model (default: frozen, in eval mode).
        cache_size: encodings of this many distinct prompts are kept (frozen encoders only).
        device, dtype: where the text model runs.

    Prompts are encoded as the text model's config says, whole or phrase by phrase
    (:func:`encode_text`; ``text_encoding``). Over-long prompts are truncated to the model's
    context (77 tokens) with a warning, and so are words outside a closed vocabulary left out
    (``closed_vocabulary``, :func:`read_sequences`); the empty prompt is allowed (the
    unconditional embedding of classifier-free guidance).
    """

    def __init__(self, source: str | Path, trainable: bool = False, cache_size: int = 1024,
                 device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32):
        super().__init__()
        from transformers import CLIPTextModel, CLIPTokenizer

        self.source = str(source)
        name, tokenizer_kwargs = _resolve(source, "tokenizer")
        self.tokenizer = CLIPTokenizer.from_pretrained(name, **tokenizer_kwargs)
        name, model_kwargs = _resolve(source, "text_encoder")
        self.model = CLIPTextModel.from_pretrained(name, **model_kwargs).to(device=device, dtype=dtype)
        self.text_encoding = text_encoding_of(self.model.config)  # how it encodes, checked once here
        self.trainable = trainable
        self.model.requires_grad_(trainable)
        if not trainable:
            self.model.eval()
        self.cache_size = cache_size
        self._cache: OrderedDict[str, tuple[Tensor, Tensor, Tensor]] = OrderedDict()

    @property
    def context_length(self) -> int:
        """Tokens per prompt (:func:`context_length`)."""
        return context_length(self.tokenizer, self.model)

    def reads_words(self, prompt: str) -> bool:
        """Whether the text model reads any word of ``prompt``: under a closed vocabulary, a prompt
        of words it does not hold reads as the empty prompt (:func:`read_sequences`)."""
        return any(len(ids) > 2 for _, ids in read_sequences(self.tokenizer, self.model.config, prompt)[0])

    @property
    def dim(self) -> int:
        """D: the width of token and pooled embeddings."""
        return self.model.config.hidden_size

    def train(self, mode: bool = True) -> TextEncoder:
        super().train(mode)
        if not self.trainable:
            self.model.eval()  # a frozen encoder keeps its dropout off
        return self

    def forward(self, prompts: Sequence[str]) -> TextFeatures:
        if isinstance(prompts, str) or not all(isinstance(prompt, str) for prompt in prompts):
            raise ValueError("prompts must be a list of strings (one per sample); wrap a single prompt in a list")
        if len(prompts) == 0:
            raise ValueError("prompts is empty: give at least one prompt")
        use_cache = not self.trainable and self.cache_size > 0
        missing = list(dict.fromkeys(p for p in prompts if not (use_cache and p in self._cache)))
        # A prompt's features can differ in the last bits with the batch it is encoded in (the width
        # phrases are padded to, the matrix sizes). With the cache, that batch is whichever the prompt
        # first came in, so training would depend on its history and a resumed run would drift from
        # an uninterrupted one: cached prompts are encoded one at a time, a function of the prompt only.
        batches = [[prompt] for prompt in missing] if use_cache else [missing] if missing else []
        if missing:
            warn_about_unread_words(self.tokenizer, self.model, missing, stacklevel=2)
        encoded = {prompt: value for batch in batches for prompt, value in zip(batch, self._encode(batch))}
        if use_cache:
            for prompt, value in encoded.items():
                self._cache[prompt] = value
            for prompt in prompts:
                self._cache.move_to_end(prompt)
            # read before evicting: a batch of more distinct prompts than the cache holds evicts its own
            encoded = {prompt: self._cache[prompt] for prompt in prompts}
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        tokens, mask, pooled = (torch.stack(parts) for parts in zip(*(encoded[prompt] for prompt in prompts)))
        return TextFeatures(tokens, mask, pooled)

    def _encode(self, prompts: list[str]) -> list[tuple[Tensor, Tensor, Tensor]]:
        with torch.set_grad_enabled(self.trainable and torch.is_grad_enabled()):
            features = encode_text(self.tokenizer, self.model, prompts, warn=False)
        return list(zip(features.tokens, features.mask, features.pooled))
