"""DreamPortrait vs the per-prompt SDS baseline, and where a training step's time goes.

    python -m pytest benchmarks/test_training.py --benchmark-only

Tiny preset on CPU, same renderer, same guidance model: a tiny latent Stable Diffusion built from
configs (the tests' ``write_tiny_stable_diffusion``; 32² images, 16² latents), so the numbers time
the pipeline, not image quality.

- **generation**: one prompt -> one forward pass (text encoding, mapping, tri-planes) and 4 views.
- **baseline**: the per-prompt SDS optimisation for its default number of steps.
- **training step**: one SDS-D step (batch 4, GAN regulariser on), with the rendering ops' kernels
  and with the reference ops; **renderer fwd+bwd**: the renderer alone at the step's shapes (both
  passes, decoder, compositing), whose ratio to the step is the renderer's share.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))

PROMPT = "a portrait of a woman with red hair and glasses"


@pytest.fixture(scope="module")
def guidance_dir(tmp_path_factory):
    from tiny_models import write_tiny_stable_diffusion

    return write_tiny_stable_diffusion(tmp_path_factory.mktemp("sd"))


def make_trainer(guidance_dir, out_dir, backend):
    from dreamportrait.training import Trainer, load_config

    config = load_config(None, [f"guidance.source={guidance_dir}", f"out_dir={out_dir}", f"prompts=[{PROMPT!r}]",
                                "batch_size=4", "device=cpu", "log.tensorboard=false", f"model.backend={backend}",
                                "model.neural_rendering_resolution=32"])
    return Trainer(config)


def test_generation_per_prompt(benchmark, record, guidance_dir, tmp_path):
    from dreamportrait.generation import render_views, sample
    from dreamportrait.models import view_cameras

    trainer = make_trainer(guidance_dir, tmp_path, "cpu")
    generator = trainer.generator_ema
    cameras = view_cameras(4, 0.6, 2.7, (0, 0, 0.2), 18.837)
    seeds = iter(range(10**6))

    @torch.no_grad()
    def generate_one():  # a new prompt each time: the text encoder's cache does not help
        seed = next(seeds)
        ws, sr_ws, planes = sample(generator, f"{PROMPT} {seed}", seed)
        return render_views(generator, ws, sr_ws, planes, cameras)

    benchmark.pedantic(generate_one, rounds=10, warmup_rounds=2, iterations=1)
    record("per prompt: generation (4 views) vs per-prompt SDS", "dreamportrait", benchmark)


def test_per_prompt_baseline_default_run(benchmark, record, guidance_dir):
    from dreamportrait.baselines import DEFAULT_STEPS, optimise_scene
    from dreamportrait.guidance import StableDiffusionGuidance

    guidance = StableDiffusionGuidance(guidance_dir)
    result = {}

    def run():
        result["run"] = optimise_scene(guidance, PROMPT, steps=DEFAULT_STEPS, render_resolution=32, progress=False)

    benchmark.pedantic(run, rounds=1, iterations=1)
    record("per prompt: generation (4 views) vs per-prompt SDS", "baseline", benchmark, steps=DEFAULT_STEPS,
           seconds_per_step=result["run"].seconds / DEFAULT_STEPS)


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_training_step(benchmark, record, guidance_dir, tmp_path, backend):
    trainer = make_trainer(guidance_dir, tmp_path, backend)
    breakdown = {"render": [], "guidance": [], "backward": [], "discriminator": []}
    guidance_call = trainer.guidance.sds_loss
    generator_forward = trainer.g_module.forward

    def timed(name, function):
        def wrapper(*args, **kwargs):
            start = time.perf_counter()
            out = function(*args, **kwargs)
            breakdown[name].append(time.perf_counter() - start)
            return out
        return wrapper

    trainer.guidance.sds_loss = timed("guidance", guidance_call)
    trainer.g_module.forward = timed("render", generator_forward)
    trainer.discriminator_loss = timed("discriminator", trainer.discriminator_loss)

    def step():
        start = time.perf_counter()
        trainer.train_step()
        total = time.perf_counter() - start
        breakdown["backward"].append(total - breakdown["render"][-1] - breakdown["guidance"][-1]
                                     - breakdown["discriminator"][-1])

    benchmark.pedantic(step, rounds=5, warmup_rounds=1, iterations=1)
    parts = {f"{name}_ms": 1e3 * min(values) for name, values in breakdown.items()}
    record("tiny SDS-D training step (batch 4, 32² renders)", backend, benchmark, **parts)


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_renderer_in_training_step(benchmark, record, guidance_dir, tmp_path, backend):
    """The renderer's forward+backward alone, at a training step's shapes."""
    from dreamportrait.models import camera_rays, split_camera_labels

    trainer = make_trainer(guidance_dir, tmp_path, backend)
    base = trainer.generator.base
    batch = trainer.sample_batch()
    with torch.no_grad():
        planes = base.planes(base.mapping(batch.z, batch.c))
    planes.requires_grad_(True)
    origins, directions = camera_rays(*split_camera_labels(batch.c), base.neural_rendering_resolution)

    def render():
        features, depth, _ = base.renderer(planes, base.decoder, origins, directions, base.rendering_kwargs)
        (features.sum() + depth.sum()).backward()

    benchmark.pedantic(render, rounds=5, warmup_rounds=1, iterations=1)
    record("tiny renderer fwd+bwd at a training step's shapes", backend, benchmark)


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_ops_in_training_step(benchmark, record, guidance_dir, tmp_path, backend, monkeypatch):
    """The rendering ops alone (every triplane_sample and composite_rays call of one training
    step's render, forward+backward), on the inputs they received."""
    from dreamportrait.models import camera_rays, split_camera_labels
    from dreamportrait.models import renderer as renderer_module
    from dreamportrait.ops import composite_rays, triplane_sample
    from dreamportrait.rendering import ray_marcher

    trainer = make_trainer(guidance_dir, tmp_path, backend)
    base = trainer.generator.base
    batch = trainer.sample_batch()
    calls = []

    def recorder(op):
        def wrapper(*args, **kwargs):
            calls.append((op, [a.detach().clone() if isinstance(a, torch.Tensor) else a for a in args]))
            return op(*args, **kwargs)
        return wrapper

    monkeypatch.setattr(renderer_module, "triplane_sample", recorder(triplane_sample))
    monkeypatch.setattr(ray_marcher, "composite_rays", recorder(composite_rays))
    with torch.no_grad():
        planes = base.planes(base.mapping(batch.z, batch.c))
        base.renderer(planes, base.decoder, *camera_rays(*split_camera_labels(batch.c), base.neural_rendering_resolution),
                      base.rendering_kwargs)
    assert len(calls) == 4  # two passes of sampling, two of compositing
    for _, args in calls:
        for a in args:
            if isinstance(a, torch.Tensor) and a.is_floating_point():
                a.requires_grad_(True)

    def run_ops():
        for op, args in calls:
            out = op(*args, backend=backend)
            outputs = out if isinstance(out, tuple) else (out,)
            sum(o.sum() for o in outputs).backward()

    benchmark.pedantic(run_ops, rounds=5, warmup_rounds=1, iterations=1)
    record("tiny rendering ops fwd+bwd in a training step", backend, benchmark)
