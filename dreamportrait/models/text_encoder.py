"""Prompts -> CLIP text features (transformers ``CLIPTokenizer`` + ``CLIPTextModel``)."""

from __future__ import annotations

import warnings
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn


ENCODER_STATES = ("all", "words")


def check_encoder_states(value: str) -> str:
    """``value`` if it names which encoder states a diffusion UNet reads (:data:`ENCODER_STATES`)."""
    if value not in ENCODER_STATES:
        raise ValueError(f"encoder_states must be one of {ENCODER_STATES}, got {value!r}")
    return value


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

    Over-long prompts are truncated to the model's context (77 tokens) with a warning; the empty
    prompt is allowed (the unconditional embedding of classifier-free guidance).
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
        self.trainable = trainable
        self.model.requires_grad_(trainable)
        if not trainable:
            self.model.eval()
        self.cache_size = cache_size
        self._cache: OrderedDict[str, tuple[Tensor, Tensor, Tensor]] = OrderedDict()

    @property
    def context_length(self) -> int:
        """Tokens per prompt: the tokenizer's limit, capped by the model's positions (77 for CLIP)."""
        return min(self.tokenizer.model_max_length, self.model.config.max_position_embeddings)

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
        encoded = dict(zip(missing, self._encode(missing))) if missing else {}
        if use_cache:
            for prompt, value in encoded.items():
                self._cache[prompt] = value
            for prompt in prompts:
                self._cache.move_to_end(prompt)
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
            encoded = {prompt: self._cache[prompt] for prompt in prompts}
        tokens, mask, pooled = (torch.stack(parts) for parts in zip(*(encoded[prompt] for prompt in prompts)))
        return TextFeatures(tokens, mask, pooled)

    def _encode(self, prompts: list[str]) -> list[tuple[Tensor, Tensor, Tensor]]:
        lengths = [len(ids) for ids in self.tokenizer(prompts, truncation=False)["input_ids"]]
        too_long = [prompt for prompt, length in zip(prompts, lengths) if length > self.context_length]
        if too_long:
            warnings.warn(f"{len(too_long)} prompt(s) longer than the text model's {self.context_length} tokens "
                          f"were truncated, e.g. {too_long[0][:80]!r}", stacklevel=3)
        batch = self.tokenizer(prompts, padding="max_length", max_length=self.context_length, truncation=True,
                               return_tensors="pt")
        device = next(self.model.parameters()).device
        ids, mask = batch["input_ids"].to(device), batch["attention_mask"].to(device).bool()
        with torch.set_grad_enabled(self.trainable and torch.is_grad_enabled()):
            # CLIP's text model is causal: padding after the end token cannot change real tokens, so
            # the mask is given to the cross-attention rather than to the text model.
            output = self.model(input_ids=ids)
        return list(zip(output.last_hidden_state, mask, output.pooler_output))
