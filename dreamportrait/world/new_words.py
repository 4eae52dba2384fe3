"""``dreamportrait world learn-words``: a trained world generator learns to read captions as people
write them; only its text encoder is trained.

A generator trained on the canonical captions has a text encoder whose closed vocabulary holds
only their words: "spectacles", "ginger" or "cap" are left out (:func:`~dreamportrait.text.encoder.read_sequences`),
and templates it never saw ("a red-haired, bearded man wearing a cap") put several attributes in
one phrase. :func:`learn_words` widens the vocabulary to every word of the paraphrase captions
(:func:`widen_vocabulary`, :func:`~dreamportrait.world.teacher.caption_words`) and trains the text
encoder by distillation through the frozen generator: from the same latent, the generator given
a caption of a training combination (:func:`~dreamportrait.world.captions.training_text`: most of
them paraphrases) must produce what it produces given a canonical caption of that head (the same
ws, super-resolution ws and tri-planes). A second term, weighted ``canonical_weight`` (default
:data:`~dreamportrait.defaults.LEARN_WORDS_CANONICAL_WEIGHT`), keeps the encoder's reading of
canonical captions where it was.

- The generator's weights are copied byte for byte: what a reading means is what the generator
  already draws. The target is the generator's own output for the canonical caption, not a
  teacher's, so the text encoder learns nothing the generator cannot render, and none of a
  teacher's misses (a teacher trained on paraphrases draws glasses at chance, RESULTS.md, *Prompts
  as people write them*).
- Only the encoder's layers and embeddings change, and the canonical term holds them near the
  reading the generator was trained with; the canonical figures are measured again, not assumed.
- The held-out combinations and the paraphrase test set's templates appear in no step.
"""

from __future__ import annotations

import json
import math
import random
import shutil
import time
from pathlib import Path

import torch
from torch import Tensor
from tqdm.auto import tqdm

from .._manifest import write_manifest
from ..defaults import LEARN_WORDS_CANONICAL_WEIGHT
from ..generation import forward_pass, frontal_camera
from ..models.pretrained import CONFIG_FILE, WEIGHT_FILES, load_pretrained, read_config
from ..text.conditioning import TextConditionedGenerator
from ..text.encoder import TextFeatures, closed_vocabulary_of, encode_text, vocabulary_words
from .attributes import PHRASINGS, caption, training_combinations
from .captions import training_text
from .teacher import caption_words, learning_rate
from .tokenizer import write_clip_tokenizer

REPORT = "learn_words.json"
"""What :func:`learn_words` records beside the model: its settings, the words learnt, the losses."""


def widen_vocabulary(tokenizer, model, words, directory: str | Path, seed: int = 0):
    """A tokenizer holding ``words`` and every word of ``tokenizer``'s vocabulary as single tokens
    (written to ``directory``), and a copy of the CLIP text ``model`` for it: the same layers, and
    for each token the two vocabularies share the same embedding; the new tokens' embeddings are
    drawn (``seed``) with the spread of the old ones. Returns ``(tokenizer, model, new)``, ``new``
    ``(V,)`` bool marking the new tokens."""
    from transformers import CLIPTextModel

    old_vocabulary = tokenizer.get_vocab()
    wider = write_clip_tokenizer(directory, [*vocabulary_words(old_vocabulary), *words],
                                 model_max_length=tokenizer.model_max_length)
    vocabulary = wider.get_vocab()
    config = model.config.__class__.from_dict(model.config.to_dict())
    config.update(dict(vocab_size=len(vocabulary), bos_token_id=wider.bos_token_id,
                       eos_token_id=wider.eos_token_id, pad_token_id=wider.pad_token_id))
    rows = model.get_input_embeddings().weight
    old = rows.detach()
    embedding = torch.randn(len(vocabulary), old.shape[1], generator=torch.Generator().manual_seed(seed))
    embedding = (embedding * old.std()).to(old.dtype)
    new = torch.ones(len(vocabulary), dtype=torch.bool)
    for token, index in vocabulary.items():
        if token in old_vocabulary:
            embedding[index] = old[old_vocabulary[token]]
            new[index] = False
    state = model.state_dict()
    state[next(name for name, value in model.named_parameters() if value is rows)] = embedding
    widened = CLIPTextModel(config).to(dtype=model.dtype)
    widened.load_state_dict(state)
    return wider, widened.eval(), new


def relative_squared_error(outputs: tuple[Tensor, ...], targets: tuple[Tensor, ...]) -> Tensor:
    """The sum over the tensors of ``outputs`` (the generator's ws, super-resolution ws and
    tri-planes; or a text encoder's token states and pooled embeddings) of the mean squared
    difference from ``targets``, each divided by its targets' variance: a fraction of their spread."""
    return sum((output - target).square().mean() / target.var() for output, target in zip(outputs, targets))


def _check_number(name: str, value, positive: bool) -> None:
    if (not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value)
            or value < 0 or (positive and value == 0)):
        raise ValueError(f"{name} must be a finite number {'>' if positive else '>='} 0, got {value!r}")


def _check_integer(name: str, value, low: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
        raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")


def learn_words(source: str | Path, out_dir: str | Path, steps: int = 1500, batch_size: int = 16,
                lr: float = 1e-3, canonical_weight: float = LEARN_WORDS_CANONICAL_WEIGHT, seed: int = 0,
                text_encoder: str | Path | None = None, progress: bool = True) -> dict:
    """Write to ``out_dir`` the generator of ``source`` (a model directory) with a text encoder that
    starts from its own (``text_encoder``, default the one beside it or recorded; its config must
    say ``closed_vocabulary``) and also
    reads the paraphrase captions' words (module docstring): ``steps`` Adam steps over
    ``batch_size`` training captions and their canonical captions, at
    :func:`~dreamportrait.world.teacher.learning_rate` (peak ``lr``), the canonical term weighted
    ``canonical_weight``; latents and captions drawn from ``seed``. ``out_dir`` (new) is written
    whole at the end, a model directory with its manifest and :data:`REPORT`, or not at all;
    returns the report (settings, the words learnt, the two losses over the first and the last
    100 steps, seconds)."""
    _check_integer("steps", steps, 1)
    _check_integer("batch_size", batch_size, 1)
    _check_integer("seed", seed, 0)
    _check_number("lr", lr, positive=True)
    _check_number("canonical_weight", canonical_weight, positive=False)
    source, out = Path(source), Path(out_dir)
    if out.exists():
        raise FileExistsError(f"out_dir {out} exists: give a new directory")
    generator, _ = load_pretrained(source, text_encoder=text_encoder)
    if not isinstance(generator, TextConditionedGenerator) or generator.text_encoder is None:
        raise ValueError(f"source {source} holds no text-conditioned generator with its text encoder")
    encoder = generator.text_encoder
    if not closed_vocabulary_of(encoder.model.config):
        raise ValueError(f"source {source}: its text encoder is not trained on a closed vocabulary "
                         f"(closed_vocabulary in its config); it reads any word already")
    generator.requires_grad_(False)
    start = time.perf_counter()
    temporary = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(temporary, ignore_errors=True)
    temporary.mkdir(parents=True)
    try:
        report = _learn(generator, source, temporary, steps, batch_size, lr, canonical_weight, seed, progress)
    except BaseException:
        shutil.rmtree(temporary, ignore_errors=True)
        raise
    report["seconds"] = time.perf_counter() - start
    (temporary / REPORT).write_text(json.dumps(report, indent=2) + "\n")
    write_manifest(temporary)
    temporary.rename(out)
    return report


def _learn(generator: TextConditionedGenerator, source: Path, directory: Path, steps: int, batch_size: int,
           lr: float, canonical_weight: float, seed: int, progress: bool) -> dict:
    """:func:`learn_words`'s training, writing the model's files into ``directory``; the report."""
    encoder = generator.text_encoder
    tokenizer, model, new = widen_vocabulary(encoder.tokenizer, encoder.model, caption_words("paraphrase"),
                                             directory / "tokenizer", seed)
    model.requires_grad_(True)
    optimiser = torch.optim.Adam(model.parameters(), lr=lr)
    heads, rng = training_combinations(), random.Random(seed)
    latents = torch.Generator().manual_seed(seed)
    camera = frontal_camera(generator).expand(batch_size, -1)
    losses = {"distillation": [], "canonical": []}
    for step in tqdm(range(steps), desc="learning the paraphrases' words", disable=not progress):
        batch = [heads[rng.randrange(len(heads))] for _ in range(batch_size)]
        canonical = [caption(head, rng.randrange(len(PHRASINGS))) for head in batch]
        texts = [training_text(own, head, rng) for own, head in zip(canonical, batch)]
        z = torch.randn(batch_size, generator.base.z_dim, generator=latents)
        with torch.no_grad():
            reference = encoder(canonical)
            targets = forward_pass(generator, z, camera, reference)
        read = encode_text(tokenizer, model, texts + canonical, warn=False)
        texts_read, canonical_read = (TextFeatures(read.tokens[part], read.mask[part], read.pooled[part])
                                      for part in (slice(batch_size), slice(batch_size, None)))
        distillation = relative_squared_error(forward_pass(generator, z, camera, texts_read), targets)
        kept = relative_squared_error((canonical_read.tokens, canonical_read.pooled),
                                      (reference.tokens, reference.pooled))
        loss = distillation + canonical_weight * kept
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        for group in optimiser.param_groups:
            group["lr"] = learning_rate(step, steps, lr)
        optimiser.step()
        losses["distillation"].append(distillation.item())
        losses["canonical"].append(kept.item())
    model.requires_grad_(False)
    model.save_pretrained(directory / "text_encoder")
    shutil.copy2(source / WEIGHT_FILES["generator"], directory / WEIGHT_FILES["generator"])
    config = read_config(source)
    config.pop("discriminator", None)
    config["text_conditioning"]["text_encoder"] = None  # the copy beside it (load_pretrained)
    (directory / CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    vocabulary = tokenizer.get_vocab()
    windows = {"first": slice(100), "last": slice(-100, None)}
    return {"source": str(source), "text_encoder": encoder.source, "steps": steps, "batch_size": batch_size,
            "lr": lr, "canonical_weight": canonical_weight, "seed": seed,
            "words_learnt": sorted(token[:-4] for token, index in vocabulary.items()
                                   if new[index] and token.endswith("</w>") and len(token) > 5),
            **{f"{name}_loss_{part}_100": sum(values[window]) / len(values[window])
               for name, values in losses.items() for part, window in windows.items()}}
