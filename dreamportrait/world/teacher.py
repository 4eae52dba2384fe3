"""The world's text-to-image teacher: a pixel-space diffusion model trained from scratch on
captioned renders, with the classes real Stable Diffusion checkpoints use (diffusers
``UNet2DConditionModel`` + ``DDPMScheduler``, transformers ``CLIPTextModel`` + ``CLIPTokenizer``),
saved in the Stable Diffusion directory layout so :class:`StableDiffusionGuidance` loads it like
any other model::

    model_index.json  scheduler/  text_encoder/  tokenizer/  unet/
"""

from __future__ import annotations

import json
import math
import random
import re
from collections.abc import Collection, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm.auto import tqdm

from .._atomic import atomic_path
from ..guidance.stable_diffusion import VIEWS, encoder_states_of
from ..text.encoder import check_encoder_states, check_text_encoding, encode_text, read_sequences, text_encoding_of
from .attributes import ATTRIBUTES, PHRASINGS
from .captions import check_captions, paraphrase_vocabulary
from .dataset import WorldSamples
from .heads import MASK_PARTS
from .tokenizer import write_clip_tokenizer

VIEW_WORDS = (*VIEWS, "view")  # the words view-dependent prompts add, in the teacher's vocabulary


def caption_words(captions: str = "canonical") -> list[str]:
    """Every word a world training caption (with a view suffix) can contain: of the canonical
    phrasings, and with ``captions="paraphrase"`` also of :func:`~dreamportrait.world.captions.paraphrase`
    (the tokenizer a teacher is built with must hold every word it is trained on)."""
    check_captions(captions)
    words = {"bald", "head", "beard", "glasses", "hat", "hair", "skin", "skinned", "with", "and", "a", *VIEW_WORDS}
    for phrasing in PHRASINGS:
        words.update(w for w in phrasing.replace(",", " ").replace("-", " ").split() if not w.startswith("{"))
    for values in ATTRIBUTES.values():
        words.update(values)
    if captions == "paraphrase":
        words.update(paraphrase_vocabulary())
    return sorted(words - {"no", "yes", "none"})


@dataclass
class TeacherConfig:
    """Sizes of the teacher (the defaults: a 2.5 M-parameter UNet, a 4-layer, 64-wide text encoder).

    Cross-attention sits only in the ``attention_levels`` coarsest UNet levels (and the middle
    block): the world's attributes are colours and coarse shapes that 8² attention places well
    enough. Adding 16² (``attention_levels=2``) doubles the CPU training step and did not bind
    colours to their nouns any better (docs/notes/experiments.md, *The teacher*).

    ``pooled_text``: the caption, attention-pooled, is also added to the timestep embedding
    (diffusers' ``addition_embed_type="text"``), so every ResNet block at every resolution sees
    it; global attributes (hair and hat colours, skin tone) then no longer have to pass through
    the 8² cross-attention alone. The UNet still takes only ``encoder_hidden_states``, so
    :class:`StableDiffusionGuidance` drives it unchanged.

    ``encoder_states``: ``"all"`` hands the UNet all 77 text-encoder states, as Stable Diffusion
    does; ``"words"`` zeroes the end token's and the padding's (:meth:`TextFeatures.word_tokens`).
    The text encoder is causal, so only those have seen the whole caption; a teacher reading them
    learnt each training caption as one summary, in which "red" with "hat" meant a red hat, and
    drew red hats on held-out *red hair, blue hat* captions. ``model_index.json`` records the
    choice, and :class:`StableDiffusionGuidance` reads it (docs/notes/experiments.md, *The teacher*).

    ``text_encoding``: ``"phrases"`` encodes each phrase of a caption on its own
    (:func:`~dreamportrait.text.encoder.encode_text`), so the words of "a blue hat" have
    not seen the hair's "red"; ``"caption"`` encodes the caption whole. The text encoder's
    ``config.json`` records it, so every :class:`TextEncoder` of this directory, or of a copy
    beside a generator, encodes as the teacher was trained.

    ``norm_groups``: the UNet's GroupNorm groups. With one channel per group (32 groups of the
    32-channel level: instance normalisation) every normalised feature map loses its spatial
    mean, so the output convolution, which reads one, cannot track the noise's per-channel mean:
    the teacher built that way (the pixel-term one) barely predicted it (correlation 0.07–0.31 from
    t = 100 to 950, ``docs/world/experiments/noise_mean.py``).
    DDIM then turns that error into a colour cast over the whole sample (divided by √ᾱ, 13× at
    t = 950), which hides the hair colour. Groups of several channels keep the channels' relative
    means (docs/notes/experiments.md, *The teacher*, the twelfth attempt)."""

    resolution: int = 32
    channels: tuple[int, ...] = (32, 64, 96)
    attention_levels: int = 1
    layers_per_block: int = 1
    text_width: int = 64
    text_layers: int = 4
    text_heads: int = 4
    attention_head_dim: int = 32
    train_timesteps: int = 1000
    norm_groups: int = 8
    pooled_text: bool = True
    encoder_states: str = "words"
    text_encoding: str = "phrases"


def build_teacher(directory: str | Path, config: TeacherConfig = TeacherConfig(), seed: int = 0,
                  captions: str = "canonical") -> Path:
    """Write a freshly initialised teacher (Stable Diffusion layout) into ``directory``, its
    tokenizer holding every word of the ``captions`` it will be trained on (:func:`caption_words`)
    and its text model's config recording ``closed_vocabulary`` (any other word is left out when
    encoding, :func:`~dreamportrait.text.encoder.read_sequences`); a bad ``config`` is refused
    before anything is written."""
    check_captions(captions)
    from diffusers import DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    check_encoder_states(config.encoder_states)
    check_text_encoding(config.text_encoding)
    if not 1 <= config.attention_levels <= len(config.channels):
        raise ValueError(f"attention_levels must be in [1, {len(config.channels)}], got {config.attention_levels}")
    if config.norm_groups < 1 or any(width % config.norm_groups for width in config.channels):
        raise ValueError(f"norm_groups must divide every entry of channels {config.channels}, got {config.norm_groups}")
    directory = Path(directory)
    torch.manual_seed(seed)
    tokenizer = write_clip_tokenizer(directory / "tokenizer", caption_words(captions))
    CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=config.text_width, intermediate_size=4 * config.text_width,
        num_hidden_layers=config.text_layers, num_attention_heads=config.text_heads, max_position_embeddings=77,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        text_encoding=config.text_encoding, closed_vocabulary=True,
    )).save_pretrained(directory / "text_encoder")
    attention = [level >= len(config.channels) - config.attention_levels for level in range(len(config.channels))]
    UNet2DConditionModel(
        sample_size=config.resolution, in_channels=3, out_channels=3, layers_per_block=config.layers_per_block,
        block_out_channels=config.channels, cross_attention_dim=config.text_width,
        attention_head_dim=config.attention_head_dim, norm_num_groups=config.norm_groups,
        addition_embed_type="text" if config.pooled_text else None, addition_embed_type_num_heads=config.text_heads,
        down_block_types=tuple("CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attention),
        up_block_types=tuple("CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attention)),
    ).save_pretrained(directory / "unet")
    DDPMScheduler(num_train_timesteps=config.train_timesteps, beta_schedule="squaredcos_cap_v2",
                  prediction_type="epsilon").save_pretrained(directory / "scheduler")
    (directory / "model_index.json").write_text(json.dumps({
        "_class_name": "DreamPortraitWorldTeacher", "teacher_config": asdict(config), "captions": captions,
        "scheduler": ["diffusers", "DDPMScheduler"], "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"], "unet": ["diffusers", "UNet2DConditionModel"]}, indent=2) + "\n")
    return directory


REGION_WORDS: dict[str, frozenset[str]] = {
    "hat": frozenset({"hat", "cap"}), "glasses": frozenset({"glasses", "spectacles", "eyeglasses"}),
    "beard": frozenset({"beard", "bearded"}), "hair": frozenset({"hair", "haired"}),
    "skin": frozenset({"skin", "skinned", "complexion"})}
"""The words by which a caption's phrase names each region of :data:`~dreamportrait.world.heads.MASK_PARTS`
(the canonical captions' nouns and the paraphrases' synonyms and adjectives: "cap", "spectacles",
"bearded", "red-haired", "a fair complexion")."""


def missing_words(directory: str | Path, captions: str) -> list[str]:
    """The words of :func:`caption_words` (``captions``) missing from the vocabulary of the
    tokenizer of the teacher (or text model) in ``directory``: words it would spell byte by byte,
    with embeddings it never trained."""
    vocabulary = json.loads((Path(directory) / "tokenizer" / "vocab.json").read_text())
    return [word for word in caption_words(captions) if f"{word}</w>" not in vocabulary]


def teacher_captions(directory: str | Path) -> str:
    """The captions the teacher in ``directory`` is built for (``model_index.json``; teachers
    built before the entry existed, the packaged one among them, were trained on ``"canonical"``)."""
    return json.loads((Path(directory) / "model_index.json").read_text()).get("captions", "canonical")


def check_vocabulary(directory: str | Path, captions: str, argument: str) -> None:
    """ValueError naming ``argument`` if the teacher in ``directory`` lacks words of ``captions``."""
    missing = missing_words(directory, captions)
    if missing:
        raise ValueError(f"{argument}: the teacher in {directory} was not built for {captions!r} captions: its "
                         f"tokenizer lacks {len(missing)} of their words ({', '.join(missing[:5])}, ...); build one "
                         f"with `dreamportrait world build --captions {captions}` into a new directory")


def phrase_region(phrase: str) -> int | None:
    """The index in :data:`~dreamportrait.world.heads.MASK_PARTS` of the region a caption phrase
    names ("a blue hat" -> hat, "long red hair" -> hair, "dark skin" -> skin, "a navy cap" -> hat),
    or ``None`` for a phrase that names no region ("a photo of a person", "portrait", "a bald
    head") or several ("a red-haired woman wearing glasses": no one region's pixels should read
    all of its words). Every phrase of a canonical caption names at most one."""
    words = set(re.findall(r"[a-z]+", phrase.lower()))
    named = [region for region, names in REGION_WORDS.items() if words & names]
    return list(MASK_PARTS).index(named[0]) if len(named) == 1 else None


def part_indices(parts: Collection[str]) -> set[int]:
    """The indices in :data:`~dreamportrait.world.heads.MASK_PARTS` of the region names ``parts``."""
    if isinstance(parts, str) or set(parts) - set(MASK_PARTS):
        raise ValueError(f"parts: expected a collection of names from {list(MASK_PARTS)}, got {parts!r}")
    return {list(MASK_PARTS).index(part) for part in parts}


def token_regions(tokenizer, config, prompts: list[str], length: int,
                  parts: Collection[str] = tuple(MASK_PARTS)) -> Tensor:
    """``(B, length)``: for each position of a phrase-encoded prompt's UNet context
    (:func:`~dreamportrait.text.encoder.encode_text` under the text model's ``config``: start,
    each phrase's words, end, padding), the :func:`phrase_region` of the phrase whose word sits
    there when that region is one of ``parts`` (names of :data:`~dreamportrait.world.heads.MASK_PARTS`),
    -1 elsewhere."""
    kept = part_indices(parts)
    regions = torch.full((len(prompts), length), -1, dtype=torch.long)
    for row, prompt in enumerate(prompts):
        position = 1  # after the start token
        for phrase, ids in read_sequences(tokenizer, config, prompt)[0]:
            words = len(ids) - 2
            region = phrase_region(phrase)
            if region in kept:
                regions[row, position:min(position + words, length - 1)] = region
            position += words
    return regions


class _RecordingAttention:
    """Stands in for a diffusers ``Attention`` module inside diffusers' plain ``AttnProcessor``
    (which computes the attention probabilities explicitly), keeping each probability tensor
    ``(B * heads, Q, L)`` in ``maps``; every other attribute is the module's."""

    def __init__(self, attention, maps: list[tuple[Tensor, int]]):
        self._attention, self._maps = attention, maps

    def __getattr__(self, name):
        return getattr(self._attention, name)

    def get_attention_scores(self, query: Tensor, key: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        probabilities = self._attention.get_attention_scores(query, key, attention_mask)
        self._maps.append((probabilities, self._attention.heads))
        return probabilities


ATTENTION_TERMS = ("tokens", "pixels")


def check_attention_terms(terms: Collection[str]) -> None:
    if isinstance(terms, str) or not terms or set(terms) - set(ATTENTION_TERMS):
        raise ValueError(f"terms: expected a non-empty collection of names from {list(ATTENTION_TERMS)}, got {terms!r}")


def attention_region_loss(maps: list[tuple[Tensor, int]], regions: Tensor, masks: Tensor,
                          terms: Collection[str] = ATTENTION_TERMS) -> Tensor:
    """How far the cross-attention strays from the regions the prompt's phrases name, over every
    recorded map (``(B * heads, Q, L)`` probabilities over the L tokens for each of Q = h² image
    positions; heads averaged). ``regions`` ``(B, L)``: each token's region (-1 for none);
    ``masks`` ``(B, P, R, R)`` in [0, 1]: the regions' coverage of each pixel
    (:func:`~dreamportrait.world.heads.render_part_masks`), area-averaged to each map's h². The
    sum of the ``terms`` named (both by default), each in [0, 1] (0 when nothing is supervised):

    - tokens (TokenCompose's token loss, Wang et al. 2024): for every token with a region,
      (1 − the share of the attention it receives that comes from its region)², averaged; alone,
      a token meets it by being attended little, from anywhere inside;
    - pixels: for every position, (1 − its attention on the tokens of the phrase naming its
      region)², weighted by the region's coverage there, over the regions the prompt names: the
      hair's pixels must read the hair's words. A teacher trained on the token term alone drew
      the hat asked for, but the hair colour no more often than chance (docs/notes/experiments.md,
      *The teacher*); the build trains with this term alone, lightly weighted (the eleventh attempt).
    """
    check_attention_terms(terms)
    supervised = regions >= 0
    if not supervised.any():
        return masks.new_zeros(())
    named = F.one_hot(regions.clamp(min=0), masks.shape[1]).to(masks) * supervised[..., None]  # (B, L, P)
    losses = []
    for probabilities, heads in maps:
        positions, length = probabilities.shape[1:]
        attention = probabilities.reshape(-1, heads, positions, length).mean(1).transpose(1, 2)  # (B, L, Q)
        coverage = F.adaptive_avg_pool2d(masks, math.isqrt(positions)).flatten(2)  # (B, P, Q)
        loss = attention.new_zeros(())  # only the terms asked for are computed: this runs every training step
        if "tokens" in terms:
            region = coverage.gather(1, regions.clamp(min=0)[:, :, None].expand(-1, -1, positions))  # (B, L, Q)
            inside = (attention * region).sum(-1) / attention.sum(-1).clamp_min(1e-8)
            loss = loss + (1 - inside)[supervised].square().mean()
        if "pixels" in terms:
            on_phrase = torch.einsum("blq,blp->bpq", attention, named)  # (B, P, Q) attention on each region's words
            weight = coverage * named.amax(1)[..., None]
            loss = loss + (weight * (1 - on_phrase).square()).sum() / weight.sum().clamp_min(1e-8)
        losses.append(loss)
    return torch.stack(losses).mean()


class Teacher:
    """A teacher directory's models, for training and sampling."""

    def __init__(self, directory: str | Path, device: str | torch.device = "cpu"):
        from diffusers import DDPMScheduler, UNet2DConditionModel
        from transformers import CLIPTextModel, CLIPTokenizer

        self.directory = Path(directory)
        self.tokenizer = CLIPTokenizer.from_pretrained(self.directory / "tokenizer")
        self.text_encoder = CLIPTextModel.from_pretrained(self.directory / "text_encoder").to(device)
        self.unet = UNet2DConditionModel.from_pretrained(self.directory / "unet").to(device)
        self.scheduler = DDPMScheduler.from_pretrained(self.directory / "scheduler")
        self.encoder_states = encoder_states_of(self.directory)
        self.device = torch.device(device)

    def encode(self, prompts: list[str]) -> Tensor:
        """The UNet's ``encoder_hidden_states`` ``(N, 77, D)`` for ``prompts`` (with gradients:
        the text encoder trains with the UNet)."""
        return encode_text(self.tokenizer, self.text_encoder, prompts).unet_context(self.encoder_states)

    def denoising_loss(self, images: Tensor, prompts: list[str], generator: torch.Generator,
                       snr_gamma: float | None = 5.0) -> Tensor:
        """DDPM's ε-prediction loss on images ``(N, 3, R, R)`` in [-1, 1], each sample weighted by
        min(SNR(t), ``snr_gamma``) / SNR(t) (Min-SNR weighting, Hang et al. 2023; ``None``: plain
        MSE). The weighting takes weight off the nearly clean timesteps, whose ε-loss is large but
        teaches only fine detail, towards the noisy ones where the caption decides the image."""
        return self.training_losses(images, prompts, generator, snr_gamma)[0]

    def training_losses(self, images: Tensor, prompts: list[str], generator: torch.Generator,
                        snr_gamma: float | None = 5.0, masks: Tensor | None = None,
                        parts: Collection[str] = tuple(MASK_PARTS),
                        terms: Collection[str] = ATTENTION_TERMS) -> tuple[Tensor, Tensor | None]:
        """:meth:`denoising_loss` and, given the images' part masks ``(N, P, R, R)`` in [0, 1],
        :func:`attention_region_loss` (its ``terms``) of the same forward pass over every
        cross-attention layer for the phrases naming one of ``parts`` (``None`` without masks).
        Needs a phrase-encoding text encoder: only then does each word's context position belong
        to one phrase."""
        t = torch.randint(0, self.scheduler.config.num_train_timesteps, (images.shape[0],), generator=generator)
        noise = torch.randn(images.shape, generator=generator)
        noisy = self.scheduler.add_noise(images, noise, t)
        context = self.encode(prompts)
        maps: list[tuple[Tensor, int]] = []
        if masks is not None:
            if text_encoding_of(self.text_encoder.config) != "phrases":
                raise ValueError("masks: attention supervision needs a teacher whose text encoder encodes phrases "
                                 "(TeacherConfig(text_encoding='phrases'))")
            restore = self._record_cross_attention(maps)
        try:
            prediction = self.unet(noisy.to(self.device), t.to(self.device), encoder_hidden_states=context).sample
        finally:
            if masks is not None:
                self.unet.set_attn_processor(restore)
        per_sample = (prediction - noise.to(self.device)).square().mean(dim=(1, 2, 3))
        if snr_gamma is None:
            denoising = per_sample.mean()
        else:
            alpha_bar = self.scheduler.alphas_cumprod[t]
            snr = alpha_bar / (1 - alpha_bar)
            denoising = (per_sample * (snr.clamp(max=snr_gamma) / snr).to(per_sample)).mean()
        if masks is None:
            return denoising, None
        regions = token_regions(self.tokenizer, self.text_encoder.config, prompts, context.shape[1], parts)
        regions = regions.to(self.device)
        return denoising, attention_region_loss(maps, regions, masks.to(self.device), terms)

    def _record_cross_attention(self, maps: list) -> dict:
        """Route every cross-attention layer of the UNet through diffusers' plain ``AttnProcessor``,
        appending its probabilities to ``maps``; returns the processors to restore."""
        from diffusers.models.attention_processor import AttnProcessor

        def recording(attention, *args, **kwargs):
            return AttnProcessor()(_RecordingAttention(attention, maps), *args, **kwargs)

        restore = self.unet.attn_processors
        self.unet.set_attn_processor({name: recording if name.endswith("attn2.processor") else processor
                                      for name, processor in restore.items()})
        return restore

    @torch.no_grad()
    def sample(self, prompts: list[str], steps: int = 50, guidance_scale: float = 3.0,
               generator: torch.Generator | None = None) -> Tensor:
        """DDIM samples ``(N, 3, R, R)`` in [-1, 1] with classifier-free guidance."""
        from diffusers import DDIMScheduler

        scheduler = DDIMScheduler.from_config(self.scheduler.config)
        scheduler.set_timesteps(steps)
        size = self.unet.config.sample_size
        x = torch.randn(len(prompts), 3, size, size, generator=generator).to(self.device)
        context = torch.cat([self.encode(list(prompts)), self.encode([""] * len(prompts))])
        for t in scheduler.timesteps:
            eps = self.unet(torch.cat([x, x]), t, encoder_hidden_states=context).sample
            conditional, unconditional = eps.chunk(2)
            x = scheduler.step(unconditional + guidance_scale * (conditional - unconditional), t, x).prev_sample
        return x.clamp(-1, 1)

    def save(self) -> None:
        self.unet.save_pretrained(self.directory / "unet")
        self.text_encoder.save_pretrained(self.directory / "text_encoder")


def learning_rate(step: int, steps: int, peak: float, warmup: int = 100) -> float:
    """Linear warm-up to ``peak``, then cosine decay to 0 at ``steps``: a short CPU schedule ends
    on small steps, which does for sample quality what a weight EMA does in long runs."""
    if step < warmup:
        return peak * (step + 1) / warmup
    return 0.5 * peak * (1 + math.cos(math.pi * (step - warmup) / max(steps - warmup, 1)))


def train_teacher(teacher: Teacher, data: WorldSamples, steps: int, batch_size: int = 64, lr: float = 5e-4,
                  caption_dropout: float = 0.1, snr_gamma: float | None = 5.0, seed: int = 0,
                  checkpoint_every: int = 500, progress: bool = True, attention_weight: float = 0.0,
                  attention_parts: Collection[str] = tuple(MASK_PARTS),
                  attention_terms: Collection[str] = ATTENTION_TERMS) -> list[float]:
    """Train the UNet and the text encoder jointly on ``data`` (captions dropped to "" with
    probability ``caption_dropout``, for classifier-free guidance; Min-SNR-``snr_gamma`` loss
    weighting, see :meth:`Teacher.denoising_loss`) at :func:`learning_rate`, plus
    ``attention_weight`` times :func:`attention_region_loss` (its ``attention_terms``) over the
    phrases naming one of ``attention_parts`` (which needs ``data.masks``);
    resumes from and saves to ``teacher.directory/training_state.pt`` every ``checkpoint_every``
    steps. Returns the total losses."""
    if attention_weight < 0:
        raise ValueError(f"attention_weight must be >= 0, got {attention_weight}")
    if attention_weight > 0 and data.masks is None:
        raise ValueError("data: attention supervision (attention_weight > 0) needs part masks; "
                         "render the dataset with part_masks=True")
    part_indices(attention_parts)
    check_attention_terms(attention_terms)
    state_path = teacher.directory / "training_state.pt"
    parameters = list(teacher.unet.parameters()) + list(teacher.text_encoder.parameters())
    optimiser = torch.optim.AdamW(parameters, lr=lr, weight_decay=1e-4)
    generator, rng, step = torch.Generator().manual_seed(seed), random.Random(seed), 0
    if state_path.is_file():
        state = torch.load(state_path, weights_only=True)
        optimiser.load_state_dict(state["optimiser"])
        generator.set_state(state["generator"])
        rng.setstate(state["rng"])
        step = state["step"]
    images, losses = data.float_images(), []
    teacher.unet.train()
    teacher.text_encoder.train()
    with tqdm(total=steps, initial=step, desc="training the teacher", disable=not progress) as bar:
        while step < steps:
            index = torch.randint(len(data), (batch_size,), generator=generator)
            prompts = ["" if rng.random() < caption_dropout else data.captions[int(i)] for i in index]
            masks = data.masks[index].float() / 255 if attention_weight > 0 else None
            denoising, attention = teacher.training_losses(images[index], prompts, generator, snr_gamma, masks,
                                                           attention_parts, attention_terms)
            loss = denoising if attention is None else denoising + attention_weight * attention
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            for group in optimiser.param_groups:
                group["lr"] = learning_rate(step, steps, lr)
            torch.nn.utils.clip_grad_norm_(parameters, 1.0)
            optimiser.step()
            losses.append(loss.item())
            step += 1
            bar.update(1)
            bar.set_postfix(loss=f"{denoising.item():.4f}",
                            **({} if attention is None else {"attention": f"{attention.item():.3f}"}))
            if step % checkpoint_every == 0 or step == steps:
                teacher.save()
                with atomic_path(state_path) as temporary:
                    torch.save({"optimiser": optimiser.state_dict(), "generator": generator.get_state(),
                                "rng": rng.getstate(), "step": step}, temporary)
    teacher.unet.eval()
    teacher.text_encoder.eval()
    return losses


@torch.no_grad()
def judge_teacher(teacher: Teacher, judge, heads: list, samples_per_head: int = 2, steps: int = 50,
                  guidance_scale: float = 3.0, seed: int = 0, batch_size: int = 128,
                  captions: Sequence[str] | None = None) -> tuple[dict[str, float], Tensor]:
    """How often the judge finds each attribute of the prompt in the teacher's samples: DDIM + CFG
    samples of a caption of each of ``heads`` (``samples_per_head`` each): ``captions[i]`` for
    ``heads[i]`` (e.g. the held-out paraphrases), by default each head's canonical caption. Returns
    the per-attribute accuracy and the samples ``(len(heads) * samples_per_head, 3, R, R)``, grouped
    by head."""
    from .attributes import caption
    from .dataset import ATTRIBUTE_CLASSES, attribute_indices

    if captions is not None and len(captions) != len(heads):
        raise ValueError(f"captions: one per head expected ({len(heads)}), got {len(captions)}")
    texts = [caption(head, 0) for head in heads] if captions is None else list(captions)
    prompts = [text for text in texts for _ in range(samples_per_head)]
    expected = attribute_indices([head for head in heads for _ in range(samples_per_head)])
    generator = torch.Generator().manual_seed(seed)
    images = torch.cat([teacher.sample(prompts[i:i + batch_size], steps, guidance_scale, generator).cpu()
                        for i in range(0, len(prompts), batch_size)])
    correct = (judge.predict(images) == expected).float().mean(0)
    return {name: correct[i].item() for i, name in enumerate(ATTRIBUTE_CLASSES)}, images
