"""The evaluation harness: any prompt -> 3D method, measured in the synthetic world by the judge.

A *method* maps (prompt, seed) to its renders from the fixed evaluation cameras
(:func:`evaluation_cameras`): a dict with ``image``, V views ``(V, 3, R, R)`` in [-1, 1], and, for
a method that has a 3D shape, ``depth`` ``(V, 1, r, r)`` (distance along each camera ray, any
resolution r). For a prompt set and seeds it reports:

- **text alignment**: per attribute, the fraction of views whose judged attribute is the prompt's;
- **multi-view consistency**: the fraction of samples whose views are all judged alike (all six
  attributes), and per attribute (which attribute changes with the view);
- **diversity**: the mean pairwise distance of judge features between seeds of a prompt (frontal
  view), averaged over prompts;
- **appearance diversity**: how much the heads of one prompt differ in what its attributes leave
  free (:data:`APPEARANCE_FEATURES`: the silhouette, i.e. head size and shape and the hair's and
  the hat's outline, and the skin's shade), as a fraction of how much the world's own heads of
  that prompt differ at the same seeds (:func:`appearance_spread`); the world itself scores 1,
  heads that are all alike 0. The judge's features, which the diversity above reads, are trained
  to see attributes, and within a prompt those are fixed;
- **world-FID**: the Fréchet distance between judge features of all views and of real renders;
- **seconds per prompt**: wall-clock of the method for one (prompt, seed);
- **view turn** (two or more views): how far the picture changes between the outermost views
  (yaw −30° and +30°), as the mean absolute pixel difference (``view_change``) and the same after
  mirroring one of them (``view_mirror_residual``). The world's heads and the cameras are
  left-right symmetric, so a head that turns as a 3D object has a residual near 0; the judge's
  consistency cannot see a head that does not turn at all (RESULTS.md, *The held-out table*);
- **depth error** (methods that return depth): the mean absolute difference between the method's
  depth and the depth of the prompt's own world head (the head :func:`world_method` renders for
  that seed) over the pixels that head covers, in world units (the camera orbits at 2.7; the
  heads are about 0.4 wide and deep). The world gives every prompt its true shape, so this is EG3D's depth
  metric (there measured against depth estimated from the image) with the ground truth known: a
  flat card through the orbit's pivot scores 0.127 on the held-out prompts, the world's own
  renders 0.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import torch
from torch import Tensor
from tqdm.auto import tqdm

from ..generation import TRUNCATION_PSI
from ..models import view_cameras
from ..outputs import grid, slug, to_uint8, write_image
from .attributes import HeadAttributes, parse_caption
from .dataset import ATTRIBUTE_CLASSES, WorldSamples, attribute_indices
from .heads import BACKGROUND, MASK_PARTS, WORLD_CAMERAS, HeadBatch, render_heads, render_heads_and_masks
from .judge import AttributeJudge

Method = Callable[[str, int], dict[str, Tensor]]

FOREGROUND_OPACITY = 0.5
"""A pixel belongs to the world head where the head's opacity along the ray exceeds this."""


def evaluation_cameras(views: int) -> Tensor:
    """``views`` camera labels ``(V, 25)`` sweeping yaw over ±30° in the world's orbit; the middle
    one (or the one nearest it) is the frontal view."""
    cams = WORLD_CAMERAS
    return view_cameras(views, math.radians(30), cams["radius"], cams["pivot"], cams["fov_degrees"])


def view_turn(views: Tensor) -> tuple[float, float]:
    """Views ``(V, C, H, W)`` ordered by yaw -> the mean absolute difference between the outermost
    two, and the same after mirroring one of them (≈ 0 for a symmetric head turning in 3D)."""
    left, right = views[0], views[-1]
    return (left - right).abs().mean().item(), (left - right.flip(-1)).abs().mean().item()


def world_head(prompt: str | HeadAttributes, seed: int) -> HeadBatch:
    """The prompt's own world head (a canonical caption, parsed, or the prompt's attributes), its
    small random variations drawn from ``seed``."""
    head = prompt if isinstance(prompt, HeadAttributes) else parse_caption(prompt)
    return HeadBatch.from_attributes([head], torch.Generator().manual_seed(seed))


def depth_error(depth: Tensor, prompt: str | HeadAttributes, seed: int) -> float:
    """Depth ``(V, 1, r, r)`` from the V evaluation cameras -> the mean absolute difference from the
    depth of the prompt's world head (:func:`world_head`, rendered at r²) over the pixels the
    head covers; what the method renders elsewhere does not count."""
    views, resolution = depth.shape[0], depth.shape[-1]
    _, truth, opacity = render_heads(world_head(prompt, seed).repeat_interleave(views), evaluation_cameras(views),
                                     resolution)
    covered = opacity > FOREGROUND_OPACITY
    return (depth.float() - truth).abs()[covered].mean().item()


APPEARANCE_FEATURES = ("silhouette", "skin_shade")
"""What :func:`appearance_features` reads from a frontal view: what a person sees differ between
heads that have the same attributes."""

SILHOUETTE_SIZE = 32
"""Silhouettes are compared at 32², the world's rendering resolution (the 64² images are upsampled)."""

SILHOUETTE_RAMP = (0.05, 0.15)
"""A pixel is background where no channel differs from the world's grey by more than 0.05 (in
[-1, 1]) and head from 0.15 on, linearly between: generated backgrounds are not exactly grey, and
the lightest hair (white, 0.94 against the grey's 0.85, i.e. 0.18 apart) must still count."""

SKIN_COVERAGE = 0.9
"""A pixel is the prompt's skin where the skin region covers at least this much of it in every
one of the prompt's world heads (:func:`prompt_skin`)."""


def silhouettes(images: Tensor) -> Tensor:
    """Images ``(N, 3, R, R)`` in [-1, 1] -> silhouettes ``(N, S, S)`` in [0, 1] at
    :data:`SILHOUETTE_SIZE` (area-averaged): how far each pixel is from the world's grey background
    (:data:`SILHOUETTE_RAMP`)."""
    distance = (images.float() - (2 * BACKGROUND - 1)).abs().amax(1, keepdim=True)  # (N, 1, R, R)
    low, high = SILHOUETTE_RAMP
    mask = ((distance - low) / (high - low)).clamp(0, 1)
    return torch.nn.functional.adaptive_avg_pool2d(mask, SILHOUETTE_SIZE)[:, 0]


def prompt_skin(masks: Tensor) -> Tensor:
    """Part masks ``(N, len(MASK_PARTS), R, R)`` of one prompt's world heads (frontal view, one per
    seed) -> ``(R, R)`` bool: the pixels that are skin in every one of them."""
    return (masks[:, list(MASK_PARTS).index("skin")] >= SKIN_COVERAGE).all(0)


def appearance_features(images: Tensor, skin: Tensor) -> dict[str, Tensor]:
    """Frontal views ``(N, 3, R, R)`` in [-1, 1] of heads of one prompt and that prompt's skin
    pixels ``(R, R)`` bool (:func:`prompt_skin`) -> ``{"silhouette": (N, S²), "skin_shade": (N, 3)}``:
    the silhouette (:func:`silhouettes`) and the mean colour in [0, 1] over the skin pixels (NaN
    where the prompt has none)."""
    colours = (images.float() + 1) / 2
    shade = colours[:, :, skin].mean(-1) if skin.any() else torch.full((images.shape[0], 3), float("nan"))
    return {"silhouette": silhouettes(images).flatten(1), "skin_shade": shade}


def mean_pairwise_distance(features: Tensor, p: float) -> float:
    """Features ``(N, D)`` -> the mean over ordered pairs of distinct rows of their L``p`` distance
    (divided by D for ``p=1``: the mean absolute difference); NaN below two rows."""
    count = features.shape[0]
    if count < 2:
        return float("nan")
    distances = torch.cdist(features.double()[None], features.double()[None], p=p)[0]
    if p == 1:
        distances = distances / features.shape[1]
    return (distances.sum() / (count * (count - 1))).item()


def appearance_spread(images: Tensor, skin: Tensor) -> dict[str, float]:
    """How much heads of one prompt differ (frontal views ``(N, 3, R, R)``, skin pixels ``(R, R)``):
    per :data:`APPEARANCE_FEATURES`, the mean pairwise distance of :func:`appearance_features`
    (silhouettes: the mean absolute difference, i.e. the share of the frame whose outline
    differs; skin shades: the Euclidean distance of their RGB in [0, 1])."""
    features = appearance_features(images, skin)
    return {"silhouette": mean_pairwise_distance(features["silhouette"], 1),
            "skin_shade": mean_pairwise_distance(features["skin_shade"], 2)}


def appearance_diversity(spreads: Sequence[dict[str, float]], world_spreads: Sequence[dict[str, float]]
                         ) -> tuple[float, dict[str, float]]:
    """Per-prompt spreads of a method's heads and of the world's heads of the same prompts and
    seeds (:func:`appearance_spread`) -> the mean over :data:`APPEARANCE_FEATURES` of each
    feature's ratio (its spread summed over prompts, over the world's), and those ratios. Prompts
    where a feature is NaN (no skin pixel) leave that feature's sums."""
    ratios = {}
    for feature in APPEARANCE_FEATURES:
        pairs = [(a[feature], b[feature]) for a, b in zip(spreads, world_spreads)
                 if not (math.isnan(a[feature]) or math.isnan(b[feature]))]
        world = sum(b for _, b in pairs)
        ratios[feature] = sum(a for a, _ in pairs) / world if pairs and world > 0 else float("nan")
    return sum(ratios.values()) / len(ratios), ratios


def world_reference(head: HeadAttributes, seeds: Sequence[int], views: int,
                    resolution: int) -> tuple[Tensor, Tensor]:
    """The world's own heads of one prompt at ``seeds`` as :func:`world_method` renders them, seen
    from the frontal one of ``views`` evaluation cameras: their views ``(len(seeds), 3, R, R)`` and
    part masks ``(len(seeds), P, R, R)``. Each ray is rendered on its own, so rendering the frontal
    camera alone gives the frontal view of all ``views`` bit for bit (the tests check it), in a
    ``views``-th of the time."""
    frontal = evaluation_cameras(views)[views // 2:views // 2 + 1]
    images, masks = [], []
    for seed in seeds:
        image, _, _, mask = render_heads_and_masks(world_head(head, seed), frontal, resolution)
        images.append(image[0])
        masks.append(mask[0])
    return torch.stack(images), torch.stack(masks)


def frechet_distance(a: Tensor, b: Tensor) -> float:
    """Fréchet distance between Gaussians fitted to feature sets a ``(N, D)`` and b ``(M, D)``."""
    a, b = a.double(), b.double()
    mean_a, mean_b = a.mean(0), b.mean(0)
    cov_a, cov_b = torch.atleast_2d(torch.cov(a.T)), torch.atleast_2d(torch.cov(b.T))

    def sqrt_psd(matrix: Tensor) -> Tensor:
        values, vectors = torch.linalg.eigh((matrix + matrix.T) / 2)
        return vectors @ torch.diag(values.clamp_min(0).sqrt()) @ vectors.T

    root_a = sqrt_psd(cov_a)
    cross = sqrt_psd(root_a @ cov_b @ root_a)
    return float((mean_a - mean_b).square().sum() + torch.trace(cov_a + cov_b - 2 * cross))


@torch.no_grad()
def evaluate(method: Method, prompts: Sequence[str], seeds: Sequence[int], judge: AttributeJudge, real: WorldSamples,
             name: str = "method", out_dir: str | Path | None = None, progress: bool = True,
             attributes: Sequence[HeadAttributes] | None = None) -> dict:
    """Measure ``method`` (module docstring) on ``prompts``, each describing the head of the same
    index in ``attributes`` (default: each prompt, a canonical caption, parsed); with ``out_dir``,
    write a grid per prompt (rows: seeds, columns: views) under ``out_dir/<name>/``. Returns the
    metrics."""
    if not prompts or not seeds:
        raise ValueError("evaluate needs at least one prompt and one seed")
    if attributes is None:
        attributes = [parse_caption(p) for p in prompts]
    elif len(attributes) != len(prompts):
        raise ValueError(f"attributes: expected one per prompt ({len(prompts)}), got {len(attributes)}")
    judge.eval()
    expected = attribute_indices(attributes)  # (P, 6)
    correct = torch.zeros(len(ATTRIBUTE_CLASSES))
    consistent_per_attribute = torch.zeros(len(ATTRIBUTE_CLASSES))
    judged_views = consistent = 0
    samples = len(prompts) * len(seeds)
    features, seconds, diversity, view_change, mirror_residual, depth_errors = [], [], [], [], [], []
    spreads, world_spreads = [], []
    for p, prompt in enumerate(tqdm(prompts, desc=f"evaluating {name}", disable=not progress)):
        frontal_features, rows = [], []
        for seed in seeds:
            start = time.perf_counter()
            rendered = method(prompt, seed)
            seconds.append(time.perf_counter() - start)
            views = rendered["image"]
            if "depth" in rendered:
                depth_errors.append(depth_error(rendered["depth"], attributes[p], seed))
            if views.shape[0] > 1:
                change, residual = view_turn(views)
                view_change.append(change)
                mirror_residual.append(residual)
            predicted = judge.predict(views)  # (V, 6)
            correct += (predicted == expected[p]).float().sum(0)
            judged_views += views.shape[0]
            alike = (predicted == predicted[0]).all(0)  # (6,): this attribute is judged alike in every view
            consistent_per_attribute += alike.float()
            consistent += int(alike.all())
            view_features = judge.features(views)
            features.append(view_features)
            frontal_features.append(view_features[views.shape[0] // 2])
            rows.append(views)
        if len(seeds) > 1:
            stacked = torch.stack(frontal_features)
            distances = torch.cdist(stacked, stacked)
            diversity.append((distances.sum() / (len(seeds) * (len(seeds) - 1))).item())
            frontal = torch.stack([row[row.shape[0] // 2] for row in rows])
            world_images, world_masks = world_reference(attributes[p], seeds, rows[0].shape[0], frontal.shape[-1])
            skin = prompt_skin(world_masks)
            spreads.append(appearance_spread(frontal, skin))
            world_spreads.append(appearance_spread(world_images, skin))
        if out_dir is not None:
            write_image(Path(out_dir) / slug(name) / f"{slug(prompt)}.png", to_uint8(grid(torch.cat(rows), rows[0].shape[0])))
    real_features = torch.cat([judge.features(chunk) for chunk in real.float_images().split(256)])
    geometry = {"view_change": sum(view_change) / len(view_change),
                "view_mirror_residual": sum(mirror_residual) / len(mirror_residual)} if view_change else {}
    if depth_errors:
        geometry["depth_error"] = sum(depth_errors) / len(depth_errors)
    appearance = {}
    if spreads:
        ratio, ratios = appearance_diversity(spreads, world_spreads)
        appearance = {"appearance_diversity": ratio, "appearance_diversity_per_feature": ratios,
                      "appearance_spread": {f: _mean([s[f] for s in spreads]) for f in APPEARANCE_FEATURES},
                      "world_appearance_spread": {f: _mean([s[f] for s in world_spreads])
                                                  for f in APPEARANCE_FEATURES}}
    return {
        "method": name,
        "text_alignment": {attr: (correct[i] / judged_views).item() for i, attr in enumerate(ATTRIBUTE_CLASSES)},
        "multi_view_consistency": consistent / samples,
        "consistency_per_attribute": {attr: (consistent_per_attribute[i] / samples).item()
                                      for i, attr in enumerate(ATTRIBUTE_CLASSES)},
        "diversity": sum(diversity) / len(diversity) if diversity else float("nan"),
        "world_fid": frechet_distance(torch.cat(features), real_features),
        "seconds_per_prompt": sum(seconds) / len(seconds),
        **geometry,
        **appearance,
    }


def _mean(values: Sequence[float]) -> float:
    """The mean of the values that are not NaN (NaN when none is)."""
    kept = [v for v in values if not math.isnan(v)]
    return sum(kept) / len(kept) if kept else float("nan")


def _percent(fraction: float) -> str:
    return f"{100 * fraction:.1f} %"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]], title: str | None = None) -> str:
    """A Markdown table (``title`` and a blank line above it when given)."""
    lines = [title, ""] if title else []
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cells) + " |" for cells in rows]
    return "\n".join(lines) + "\n"


def markdown_table(results: Sequence[dict]) -> str:
    """One row per method: alignment per attribute, consistency, diversity, world-FID, seconds."""
    attributes = list(ATTRIBUTE_CLASSES)
    return _table(["method", *attributes, "consistency", "diversity", "world-FID", "s / prompt"],
                  [[result["method"], *(_percent(result["text_alignment"][a]) for a in attributes),
                    _percent(result["multi_view_consistency"]), f"{result['diversity']:.3f}",
                    f"{result['world_fid']:.2f}", f"{result['seconds_per_prompt']:.3g}"] for result in results])


def consistency_table(results: Sequence[dict]) -> str:
    """Multi-view consistency per attribute, one row per method that reports it."""
    attributes = list(ATTRIBUTE_CLASSES)
    return _table(["method", *attributes, "all"],
                  [[result["method"], *(_percent(result["consistency_per_attribute"][a]) for a in attributes),
                    _percent(result["multi_view_consistency"])]
                   for result in results if "consistency_per_attribute" in result],
                  title="multi-view consistency per attribute (samples whose views all agree on it)")


def diversity_table(results: Sequence[dict]) -> str:
    """Both diversity measures and the prompt set, one row per method that reports the
    appearance diversity (measured with two or more seeds)."""
    return _table(["method", "prompts", "diversity", "appearance diversity", "silhouette", "skin shade",
                   "spread (silhouette, skin shade)", "world's spread"],
                  [[result["method"], result.get("prompt_set", "–"), f"{result['diversity']:.3f}",
                    f"{result['appearance_diversity']:.2f}",
                    *(f"{result['appearance_diversity_per_feature'][f]:.2f}" for f in APPEARANCE_FEATURES),
                    ", ".join(f"{result['appearance_spread'][f]:.4f}" for f in APPEARANCE_FEATURES),
                    ", ".join(f"{result['world_appearance_spread'][f]:.4f}" for f in APPEARANCE_FEATURES)]
                   for result in results if "appearance_diversity" in result],
                  title="diversity within a prompt: judge features (diversity), and the spread of the heads' "
                        "silhouettes and skin shades as a fraction of the world's own heads' at the same seeds "
                        "(appearance diversity: the mean of the two fractions; the world scores 1)")


def view_turn_table(results: Sequence[dict]) -> str:
    """How far the views turn and how far the depth is from the world head's, one row per method
    that reports the turn (two or more views); "–" for a method without depth or measured before
    the depth error existed."""
    return _table(["method", "view change", "mirror residual", "depth error"],
                  [[result["method"], f"{result['view_change']:.3f}", f"{result['view_mirror_residual']:.3f}",
                    f"{result['depth_error']:.3f}" if "depth_error" in result else "–"]
                   for result in results if "view_change" in result],
                  title="how far the views turn between yaw −30° and +30° (mean |Δpixel| in [−1, 1]; "
                        "mirror residual ≈ 0 for a symmetric head turning in 3D) and the depth error "
                        "(mean |Δdepth| from the prompt's world head where it covers the frame, world units)")


def progress_table(result: dict) -> str:
    """The per-prompt baseline's progress (:func:`baseline_progress`) as a Markdown table."""
    attributes = list(ATTRIBUTE_CLASSES)
    return _table(["steps", *attributes, "mean", "s / prompt"],
                  [[str(row["steps"]), *(_percent(row["text_alignment"][a]) for a in attributes),
                    _percent(row["mean_alignment"]), f"{row['seconds_per_prompt']:.3g}"] for row in result["progress"]],
                  title=f"{result['method']}: text alignment after N optimisation steps")


def spread(items: Sequence, count: int) -> list:
    """``count`` items evenly spread over ``items`` (all of them when count >= len)."""
    if count >= len(items):
        return list(items)
    return [items[(i * len(items)) // count] for i in range(count)]


def generator_method(generator, views: int, truncation_psi: float = TRUNCATION_PSI) -> Method:
    """DreamPortrait: one forward pass per (prompt, seed), then the views."""
    from ..generation import render_views, sample

    device = next(generator.parameters()).device
    cameras, frontal = evaluation_cameras(views).to(device), evaluation_cameras(1).to(device)

    def run(prompt: str, seed: int) -> dict[str, Tensor]:
        ws, sr_ws, planes = sample(generator, prompt, seed, truncation_psi, frontal)
        return _image_and_depth(render_views(generator, ws, sr_ws, planes, cameras))

    return run


def gan_method(generator, views: int, truncation_psi: float = TRUNCATION_PSI) -> Method:
    """A text-free 3D GAN (the pretrained generator): the prompt is ignored, the seed picks z."""
    device = next(generator.parameters()).device
    cameras, frontal = evaluation_cameras(views).to(device), evaluation_cameras(1).to(device)

    def run(prompt: str, seed: int) -> dict[str, Tensor]:
        z = torch.randn(1, generator.z_dim, generator=torch.Generator().manual_seed(seed)).to(device)
        ws = generator.mapping(z, frontal, truncation_psi=truncation_psi).expand(views, -1, -1)
        return _image_and_depth(generator.synthesis(ws, cameras, noise_mode="const", deterministic_sampling=True))

    return run


def _image_and_depth(rendered: dict[str, Tensor]) -> dict[str, Tensor]:
    """A generator's (or scene's) outputs -> a method's result, on the CPU in float32."""
    return {"image": rendered["image"].float().cpu(), "depth": rendered["image_depth"].float().cpu()}


def world_method(views: int, resolution: int = 64, attributes: Mapping[str, HeadAttributes] | None = None) -> Method:
    """The world itself: the prompt's own head (its small random variations drawn from the seed)
    rendered from the evaluation cameras. What a perfect prompt -> 3D method would return, so its
    row is the ceiling of every metric (the judge's own errors included). A prompt's head has the
    prompt's ``attributes`` (default: the prompt, a canonical caption, parsed)."""
    cameras = evaluation_cameras(views)
    attributes = attributes or {}

    def run(prompt: str, seed: int) -> dict[str, Tensor]:
        head = attributes.get(prompt) or parse_caption(prompt)
        image, depth, _ = render_heads(world_head(head, seed).repeat_interleave(views), cameras, resolution)
        return {"image": image, "depth": depth}

    return run


def baseline_method(guidance, views: int, steps: int, resolution: int = 32, checkpoints: Sequence[int] = ()) -> Method:
    """The per-prompt SDS baseline: one scene optimised for ``steps`` per (prompt, seed), from the
    world's camera prior. After each step count in ``checkpoints`` the views are also rendered and
    kept, with the optimisation seconds so far, in ``method.snapshots[step]`` as
    ``(prompt, seconds, views)`` (for :func:`baseline_progress`)."""
    from ..baselines import optimise_scene

    if any(step < 1 or step > steps for step in checkpoints):
        raise ValueError(f"checkpoints must lie in [1, {steps}] (the baseline's steps), got {list(checkpoints)}")
    cameras = evaluation_cameras(views).to(guidance.device)
    snapshots: dict[int, list] = {step: [] for step in sorted(set(checkpoints))}

    def run(prompt: str, seed: int) -> dict[str, Tensor]:
        start, rendering = time.perf_counter(), 0.0

        def snapshot(step: int, scene) -> None:
            nonlocal rendering
            if step + 1 in snapshots:
                begin = time.perf_counter()
                with torch.no_grad():
                    images = scene(cameras, resolution)["image"].float().cpu()
                snapshots[step + 1].append((prompt, begin - start - rendering, images))
                rendering += time.perf_counter() - begin

        with torch.enable_grad():
            scene = optimise_scene(guidance, prompt, steps=steps, render_resolution=resolution, seed=seed,
                                   progress=False, callback=snapshot, **world_orbit()).scene
        return _image_and_depth(scene(cameras, resolution))

    run.snapshots = snapshots
    return run


def world_orbit() -> dict:
    """:func:`~dreamportrait.baselines.optimise_scene`'s camera keyword arguments for the world's
    pose prior (:data:`~dreamportrait.world.heads.WORLD_CAMERAS`): the per-prompt baseline sees
    the same views DreamPortrait is trained on."""
    cams = WORLD_CAMERAS
    return {"radius": cams["radius"], "pivot": cams["pivot"], "fov_degrees": cams["fov_degrees"],
            "yaw_range_degrees": cams["yaw_range_degrees"], "pitch_range_degrees": cams["pitch_range_degrees"]}


@torch.no_grad()
def baseline_progress(snapshots: dict[int, list], judge: AttributeJudge,
                      attributes: Mapping[str, HeadAttributes] | None = None) -> list[dict]:
    """The baseline's text alignment after each checkpoint of :func:`baseline_method` and the
    optimisation seconds it took to get there (snapshot rendering excluded), against each prompt's
    ``attributes`` (default: the prompt, a canonical caption, parsed). One row per
    checkpoint: ``{"steps", "seconds_per_prompt", "text_alignment": {attribute: accuracy},
    "mean_alignment"}``."""
    rows = []
    for step, entries in sorted(snapshots.items()):
        if not entries:
            continue
        correct, views = torch.zeros(len(ATTRIBUTE_CLASSES)), 0
        for prompt, _, images in entries:
            expected = attribute_indices([(attributes or {}).get(prompt) or parse_caption(prompt)])[0]
            correct += (judge.predict(images) == expected).float().sum(0)
            views += images.shape[0]
        alignment = correct / views
        rows.append({"steps": step, "seconds_per_prompt": sum(e[1] for e in entries) / len(entries),
                     "text_alignment": {a: alignment[i].item() for i, a in enumerate(ATTRIBUTE_CLASSES)},
                     "mean_alignment": alignment.mean().item()})
    return rows
