"""``dreamportrait world train``: the whole method in the synthetic world, resumable.

Stages, each continuing where an interrupted run stopped::

    OUT/data/gan-train      64² renders of training combinations with camera labels
    OUT/data/gan-train-images
                            the same renders as an EG3D image folder: the GAN regulariser's
                            "real" portraits (``--gan-real renders``, the default)
    OUT/data/gan-groups, OUT/data/gan-groups-images
                            with ``gan.group_size`` above 1 instead: renders in groups of
                            :data:`REAL_GROUP_SIZE` heads of one combination seen from one camera
    OUT/gan/                the 3D GAN (no text) trained adversarially on them, EG3D-style;
                            OUT/gan/final is its pretrained directory (EMA G + D); skipped when
                            a pretrained GAN is given (e.g. the packaged one, ``asset_dir("gan")``)
    OUT/prompts.txt         captions of the training combinations, every phrasing
                            (OUT/prompts-paraphrase.txt with ``captions="paraphrase"``: those and
                            :data:`PARAPHRASES_PER_COMBINATION` paraphrases of each combination)
    OUT/dreamportrait/      DreamPortrait trained from OUT/gan/final by SDS with the teacher + GAN
                            regulariser (a ``dreamportrait train`` run: checkpoints, TensorBoard)

The held-out combinations (:mod:`~dreamportrait.world.attributes`) appear in no stage.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path

from .._atomic import atomic_path
from ..training.gan import GanConfig, GanTrainer
from .attributes import PHRASINGS, caption, training_combinations
from .captions import check_captions, paraphrase
from .dataset import WorldSamples, build_dataset, export_image_folder


@dataclass
class WorldTrainSetting:
    gan_images: int = 4096
    gan: GanConfig = field(default_factory=lambda: GanConfig(preset="world", steps=3000))
    overrides: tuple[str, ...] = ()
    """Overrides of the DreamPortrait config applied before the user's."""


SETTINGS = {
    "default": WorldTrainSetting(),
    "tiny": WorldTrainSetting(gan_images=16, gan=GanConfig(preset="world", steps=2, batch_size=4, checkpoint_every=1),
                              overrides=("steps=2", "guidance.anneal_steps=1", "batch_size=2", "checkpoint_every=1",
                                         "log.image_every=1")),
}


PARAPHRASES_PER_COMBINATION = 9
"""Paraphrases per training combination in ``"paraphrase"`` prompts: with its three canonical
phrasings, a quarter of the prompts stay canonical (as :data:`~dreamportrait.world.captions.CANONICAL_SHARE`
of the teacher's captions)."""


def training_prompts(captions: str = "canonical") -> list[str]:
    """Every phrasing of every training combination's caption, and with ``captions="paraphrase"``
    :data:`PARAPHRASES_PER_COMBINATION` paraphrases of each
    (:func:`~dreamportrait.world.captions.paraphrase`, a fixed draw)."""
    check_captions(captions)
    prompts = [caption(head, phrasing) for head in training_combinations() for phrasing in range(len(PHRASINGS))]
    if captions == "paraphrase":
        rng = random.Random(0)
        prompts += [paraphrase(head, rng).text for head in training_combinations()
                    for _ in range(PARAPHRASES_PER_COMBINATION)]
    return prompts


def gan_data(out_dir: str | Path, setting: WorldTrainSetting, seed: int = 0, progress: bool = True) -> WorldSamples:
    """The 64² renders of training combinations the 3D GAN learns from (``OUT/data/gan-train``)."""
    return build_dataset(Path(out_dir) / "data/gan-train", training_combinations(), setting.gan_images, 64,
                         seed=seed * 10 + 4, progress=progress)


REAL_GROUP_SIZE = 4
"""Heads per group of the grouped real portraits: the largest ``gan.group_size`` they serve."""


def real_images_dir(out_dir: str | Path) -> Path:
    return Path(out_dir) / "data/gan-train-images"


def real_images_stage(out_dir: str | Path, setting: WorldTrainSetting, seed: int = 0, progress: bool = True,
                      group_size: int = 1) -> Path:
    """The regulariser's real portraits as the EG3D image folder ``gan.real: images`` reads; returns it.
    For ``group_size`` 1 (``gan.group_size``), the GAN's data (``OUT/data/gan-train-images``); above
    1, as many 64² renders of training combinations in groups of :data:`REAL_GROUP_SIZE`, one
    combination and one camera per group, listed in dataset.json's ``groups``
    (``OUT/data/gan-groups-images``)."""
    if group_size == 1:
        return export_image_folder(gan_data(out_dir, setting, seed, progress), real_images_dir(out_dir), progress)
    if group_size > REAL_GROUP_SIZE:
        raise ValueError(f"gan.group_size={group_size} is larger than the groups of {REAL_GROUP_SIZE} heads that "
                         f"world train renders")
    out = Path(out_dir)
    samples = build_dataset(out / "data/gan-groups", training_combinations(), setting.gan_images, 64,
                            seed=seed * 10 + 5, progress=progress, group_size=REAL_GROUP_SIZE)
    return export_image_folder(samples, out / "data/gan-groups-images", progress, group_size=REAL_GROUP_SIZE)


def train_gan_stage(out_dir: str | Path, setting: WorldTrainSetting, seed: int = 0, progress: bool = True) -> Path:
    """Render the GAN's data and train the 3D GAN; returns its pretrained directory."""
    out = Path(out_dir)
    data = gan_data(out, setting, seed, progress)
    final = out / "gan/final"
    if (final / "config.json").is_file():
        return final
    trainer = GanTrainer(setting.gan, data, out / "gan")
    trainer.resume()
    return trainer.train(progress=progress)


def dreamportrait_overrides(out_dir: str | Path, teacher: str | Path, setting: WorldTrainSetting,
                            overrides: list[str] | tuple[str, ...] = (), gan: str | Path | None = None,
                            gan_real: str = "renders", captions: str = "canonical") -> list[str]:
    """Write ``OUT/prompts.txt`` (``OUT/prompts-paraphrase.txt`` for ``captions="paraphrase"``,
    :func:`training_prompts`) and return the config overrides that point the DreamPortrait run at
    the GAN (``gan``, default the run's own ``OUT/gan/final``), the teacher, the prompts and the
    regulariser's real portraits (``gan_real``): ``"renders"`` (the world's renders,
    :func:`real_images_stage`) or ``"pretrained"`` (the GAN's samples). The user's ``overrides``
    come last, so they win."""
    out = Path(out_dir)
    gan = Path(gan) if gan is not None else out / "gan/final"
    prompts = out / ("prompts.txt" if captions == "canonical" else f"prompts-{captions}.txt")
    if not prompts.is_file():
        with atomic_path(prompts) as temporary:
            temporary.write_text("\n".join(training_prompts(captions)) + "\n")
    real = {"pretrained": ["gan.real=pretrained"],
            "renders": ["gan.real=images", f"gan.image_dir={real_images_dir(out)}"]}[gan_real]
    return [f"out_dir={out / 'dreamportrait'}", f"model.pretrained={gan}", f"guidance.source={teacher}",
            f"prompt_file={prompts}", *real, *setting.overrides, *overrides]


def prepare_run(out_dir: str | Path, config: str | Path, teacher: str | Path | None = None,
                gan: str | Path | None = None, gan_steps: int | None = None, gan_real: str = "renders",
                setting: str = "default", overrides: list[str] | tuple[str, ...] = (), seed: int = 0,
                captions: str = "canonical"):
    """Every stage of ``dreamportrait world train`` before DreamPortrait's own training, in order;
    returns the DreamPortrait run's :class:`~dreamportrait.training.TrainConfig` (``config`` with
    :func:`dreamportrait_overrides` and the user's ``overrides``). ``teacher``: default the packaged
    one; ``gan``: a pretrained 3D GAN directory or ``"packaged"``, which skips the GAN stage (default:
    train one, for ``gan_steps`` steps if given); ``gan_real``: see :func:`dreamportrait_overrides`;
    ``captions``: the training prompts (:func:`training_prompts`), whose words the teacher's
    tokenizer must hold. Raises ValueError for arguments that do not fit together."""
    import dataclasses

    from ..training import load_config
    from .assets import asset_dir
    from .teacher import check_vocabulary

    if gan is not None and gan_steps is not None:
        raise ValueError("--gan-steps trains a GAN and --gan skips that stage: give one of them")
    chosen = SETTINGS[setting]
    if gan_steps is not None:
        chosen = dataclasses.replace(chosen, gan=dataclasses.replace(chosen.gan, steps=gan_steps))
    teacher = teacher or asset_dir("teacher")
    if check_captions(captions) != "canonical":  # every world teacher holds the canonical words
        check_vocabulary(teacher, captions, "--teacher")
    pretrained = asset_dir("gan") if gan == "packaged" else gan
    if pretrained is not None and not Path(pretrained, "config.json").is_file():
        raise ValueError(f"--gan must be a pretrained 3D GAN directory (with config.json) or 'packaged', got {gan!r}")
    run_config = load_config(config, dreamportrait_overrides(out_dir, teacher, chosen, overrides, pretrained,
                                                             gan_real=gan_real, captions=captions))
    if pretrained is None:
        train_gan_stage(out_dir, chosen, seed=seed)
    real = run_config.gan.real_image_dir  # None when the regulariser is off or reads no images
    if real is not None and Path(real) == real_images_dir(out_dir):  # not when overrides point elsewhere
        run_config.gan.image_dir = str(real_images_stage(out_dir, chosen, seed=seed,
                                                         group_size=run_config.gan.group_size))
    return run_config
