"""Training configuration: YAML files (``configs/``) with ``key=value`` overrides.

Every key is declared here with its default; an unknown key, a missing required one or a value of
the wrong type is an error that names it.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from ..models.cameras import FFHQ_FOV_DEGREES, FFHQ_PIVOT, FFHQ_RADIUS


@dataclass
class ModelConfig:
    preset: str = "tiny"
    """Generator/discriminator preset used when ``pretrained`` is null (random initialisation)."""
    pretrained: str | None = None
    """Directory of a pretrained tri-plane GAN (``import-eg3d`` / ``save_pretrained``: G and D)."""
    neural_rendering_resolution: int | None = None
    """Rendering resolution while training (null: the generator's)."""
    attention_resolutions: list[int] = field(default_factory=lambda: [16, 32])
    attention_heads: int = 4
    attention_head_dim: int = 32
    adapter_boundaries: list[int] = field(default_factory=lambda: [16, 64])
    use_adapters: bool = True
    use_cross_attention: bool = True
    backend: str | None = None
    """Rendering ops backend (null: by device)."""


@dataclass
class GuidanceConfig:
    source: str = ""
    """Diffusers model directory or hub id (required)."""
    guidance_scale: float = 7.5
    t_min: float = 0.02
    t_max: float = 0.98
    t_max_final: float | None = None
    """Where t_max is annealed to, linearly over the first ``anneal_steps`` steps (null: no annealing)."""
    anneal_steps: int | None = None
    """The training step at which t_max reaches t_max_final, after which it stays there (null: the
    run's ``steps``). Setting it to a finished run's length and raising ``steps`` continues that
    run at its final noise levels, as an uninterrupted run of the longer length would. The
    per-prompt baseline, which reads this section too, anneals over its own steps."""
    weighting: str = "sds"
    grad_clip: float | None = None
    view_dependent_prompts: bool = True
    attention_slicing: bool = False
    channels_last: bool = False
    weight: float = 1.0
    """Multiplier of the SDS loss."""


@dataclass
class CameraConfig:
    yaw_range_degrees: float = 45.0
    pitch_range_degrees: float = 20.0
    radius: float = FFHQ_RADIUS
    fov_degrees: float = FFHQ_FOV_DEGREES
    pivot: list[float] = field(default_factory=lambda: list(FFHQ_PIVOT))
    conditioning: str = "frontal"
    """The camera the generator's mapping is conditioned on while training. "frontal": the camera
    generation conditions on (:func:`dreamportrait.generation.frontal_camera`), so SDS judges
    tri-planes built as generation builds them, from every training view; "render": the camera
    each view is rendered from (EG3D's labels without pose swapping), which shows the teacher the
    frontal-conditioned tri-planes only from near the front. In the world, over two seeds,
    frontal made the glasses agree across views more often, not the joint multi-view consistency
    (docs/notes/experiments.md, *Training the generator*)."""


@dataclass
class RegulariserConfig:
    """The ``gan`` section: the SDS trainer's GAN regulariser (the text-free 3D GAN trainer of
    ``dreamportrait world train`` has its own settings, :class:`dreamportrait.training.gan.GanConfig`)."""

    weight: float = 0.1
    """λ_gan: weight of the generator's adversarial loss; 0 disables the GAN regulariser."""
    real: str = "pretrained"
    """"pretrained": samples of the frozen initial generator are real; "images": image_dir is."""
    image_dir: str | None = None
    group_size: int = 1
    """Latents per prompt in a batch. Above 1, each prompt (with one camera) is drawn for this
    many latents, and the discriminator's minibatch-std layer measures the spread within such a
    group against real groups (image_dir's dataset.json ``groups``: one attribute combination seen
    from one camera with the world's small variations). An unconditional discriminator that sees
    one sample per prompt cannot tell a generator that draws the same head for every latent of a
    prompt; this one can. 1 (the default): every sample has its own prompt and camera. Without
    the regulariser (``weight`` 0) it changes nothing."""
    spread_weight: float = 0.0
    """Weight of a diversity-sensitive term on each group of ``group_size`` renders (one prompt, one
    camera): ``max(0, τ - d)``, d the mean absolute difference between the group's raw renders
    (the volume render before super-resolution, so the variety is the 3D head's and shows alike from
    every view) average-pooled to 16x16, τ the same spread of the real groups' raw images (measured
    once, at start). It pushes a prompt's heads apart until they vary as much as real heads of one
    combination, and no further (DSGAN's bounded mode-seeking term). Needs ``group_size`` above 1;
    0 (the default): off."""
    r1_gamma: float = 1.0
    r1_interval: int = 16
    lr: float = 0.002
    betas: list[float] = field(default_factory=lambda: [0.0, 0.99])

    @property
    def real_image_dir(self) -> str | None:
        """The image folder the regulariser reads as real portraits; None when it is off (weight 0)
        or takes the frozen generator's samples as real."""
        return self.image_dir if self.weight > 0 and self.real == "images" else None


@dataclass
class OptimConfig:
    lr_adapters: float = 1e-3
    lr_cross_attention: float = 1e-3
    lr_base: float = 1e-4
    """Learning rate of the pretrained generator's own parameters (0 freezes them)."""
    betas: list[float] = field(default_factory=lambda: [0.0, 0.99])
    ema_half_life_steps: float = 100.0
    """Half-life of the generator's exponential moving average, in steps (0: no EMA)."""
    amp: bool = True
    """Mixed precision on CUDA (bfloat16 autocast); ignored on CPU."""


@dataclass
class LogConfig:
    every: int = 10
    image_every: int = 100
    tensorboard: bool = True


@dataclass
class TrainConfig:
    out_dir: str = "runs/dreamportrait"
    steps: int = 1000
    batch_size: int = 4
    """Per process."""
    seed: int = 0
    device: str = "auto"
    """"auto" (CUDA when available), "cpu" or "cuda"."""
    prompts: list[str] = field(default_factory=list)
    prompt_file: str | None = None
    """A text file with one prompt per line, added to ``prompts``."""
    checkpoint_every: int = 100
    keep_checkpoints: int = 3
    max_bad_steps: int = 5
    """Consecutive steps with a non-finite loss or gradient after which training stops."""
    resume: bool = True
    """Continue from the newest checkpoint in out_dir when there is one."""
    model: ModelConfig = field(default_factory=ModelConfig)
    guidance: GuidanceConfig = field(default_factory=GuidanceConfig)
    cameras: CameraConfig = field(default_factory=CameraConfig)
    gan: RegulariserConfig = field(default_factory=RegulariserConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    log: LogConfig = field(default_factory=LogConfig)

    def all_prompts(self) -> list[str]:
        prompts = list(self.prompts)
        if self.prompt_file:
            path = Path(self.prompt_file)
            if not path.is_file():
                raise FileNotFoundError(f"prompt_file {path} does not exist")
            prompts += [line.strip() for line in path.read_text().splitlines() if line.strip()]
        if not prompts:
            raise ValueError("the prompt list is empty: set prompts (a list) or prompt_file")
        if any(not prompt.strip() for prompt in prompts):
            raise ValueError("config key 'prompts' holds an empty prompt; every prompt must have words "
                             "(the empty one is guidance's unconditional prompt)")
        return prompts

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _convert(value, annotation, key: str):
    """``value`` checked against the dataclass field type ``annotation``."""
    origin, arguments = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in arguments:
            return None
        annotation = next(a for a in arguments if a is not type(None))
        origin, arguments = typing.get_origin(annotation), typing.get_args(annotation)
    if dataclasses.is_dataclass(annotation):
        if not isinstance(value, dict):
            raise ValueError(f"config key {key!r} must be a mapping, got {value!r}")
        return _build(annotation, value, key + ".")
    if origin is list:
        if not isinstance(value, list):
            raise ValueError(f"config key {key!r} must be a list, got {value!r}")
        return [_convert(item, arguments[0], f"{key}[{i}]") for i, item in enumerate(value)]
    if annotation is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if annotation in (int, float, str, bool) and not (isinstance(value, annotation) and
                                                     not (annotation is int and isinstance(value, bool))):
        raise ValueError(f"config key {key!r} must be {annotation.__name__}, got {value!r}")
    return value


def _build(cls, values: dict, prefix: str = ""):
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise ValueError(f"unknown config key {prefix + unknown[0]!r}; known keys under "
                         f"{prefix.rstrip('.') or 'the top level'}: {', '.join(sorted(fields))}")
    hints = typing.get_type_hints(cls)
    kwargs = {name: _convert(value, hints[name], prefix + name) for name, value in values.items()}
    return cls(**kwargs)


def apply_override(values: dict, override: str) -> None:
    """Apply ``"a.b.c=value"`` (value parsed as YAML) to nested ``values`` in place."""
    if "=" not in override:
        raise ValueError(f"override {override!r} must look like key=value (e.g. optim.lr_base=0)")
    key, raw = override.split("=", 1)
    parts = key.strip().split(".")
    target = values
    for part in parts[:-1]:
        target = target.setdefault(part, {})
        if not isinstance(target, dict):
            raise ValueError(f"override {override!r}: {part!r} is not a section")
    target[parts[-1]] = yaml.safe_load(raw)


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> TrainConfig:
    """A :class:`TrainConfig` from a YAML file (or the defaults) and ``key=value`` overrides."""
    values: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"config file {path} does not exist")
        values = yaml.safe_load(path.read_text()) or {}
        if not isinstance(values, dict):
            raise ValueError(f"{path}: the top level must be a mapping of config keys")
    for override in overrides:
        apply_override(values, override)
    config = _build(TrainConfig, values)
    if not config.guidance.source:
        raise ValueError("config key 'guidance.source' is required: a diffusers model directory or hub id")
    if config.gan.real not in ("pretrained", "images"):
        raise ValueError(f"config key 'gan.real' must be 'pretrained' or 'images', got {config.gan.real!r}")
    if config.gan.real == "images" and not config.gan.image_dir:
        raise ValueError("config key 'gan.image_dir' is required when gan.real is 'images'")
    if config.gan.group_size < 1 or config.batch_size % config.gan.group_size:
        raise ValueError(f"config key 'gan.group_size' must be >= 1 and divide batch_size ({config.batch_size}), "
                         f"got {config.gan.group_size!r}")
    if config.gan.group_size > 1 and config.gan.weight > 0 and config.gan.real != "images":
        raise ValueError("config key 'gan.group_size' above 1 needs gan.real: images (real groups of one attribute "
                         "combination seen from one camera); the pretrained generator's samples have no such groups")
    if config.gan.spread_weight < 0 or (config.gan.spread_weight > 0 and config.gan.group_size < 2):
        raise ValueError(f"config key 'gan.spread_weight' must be >= 0 and, above 0, needs gan.group_size >= 2 "
                         f"(it compares the renders of one prompt's group), got {config.gan.spread_weight!r} with "
                         f"group_size {config.gan.group_size}")
    if config.cameras.conditioning not in ("frontal", "render"):
        raise ValueError(f"config key 'cameras.conditioning' must be 'frontal' or 'render', "
                         f"got {config.cameras.conditioning!r}")
    if config.guidance.anneal_steps is not None and config.guidance.anneal_steps < 1:
        raise ValueError(f"config key 'guidance.anneal_steps' must be >= 1 or null, got {config.guidance.anneal_steps!r}")
    if config.batch_size < 1 or config.steps < 0:
        raise ValueError("config keys 'batch_size' must be >= 1 and 'steps' >= 0")
    return config
