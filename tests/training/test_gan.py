"""EG3D-style 3D GAN training (training.gan) on a few world renders."""

import pytest
import torch

from dreamportrait.models import load_pretrained
from dreamportrait.training.gan import GanConfig, GanTrainer
from dreamportrait.training.losses import discriminator_loss, generator_adversarial_loss
from dreamportrait.world import training_combinations
from dreamportrait.world.dataset import render_samples


@pytest.fixture(scope="module")
def renders():
    return render_samples(training_combinations(), 8, 64, seed=int(torch.randint(1 << 30, ())))


def config(**changes):
    return GanConfig(**{"preset": "world", "steps": 4, "batch_size": 2, "r1_interval": 2, "checkpoint_every": 2,
                        "seed": int(torch.randint(1 << 30, ())), **changes})


def test_real_images_have_the_discriminators_shapes(renders):
    real, labels = renders.sample(3, torch.Generator().manual_seed(0))
    assert real["image"].shape == (3, 3, 64, 64) and real["image_raw"].shape == (3, 3, 32, 32)
    assert labels.shape == (3, 25) and real["image"].min() >= -1 and real["image"].max() <= 1


def test_each_network_improves_its_objective_on_a_fixed_batch(renders, tmp_path):
    trainer = GanTrainer(config(lr_g=1e-4, lr_d=1e-4, r1_gamma=0.0), renders, tmp_path)  # small: a first-order step
    G, D = trainer.generator, trainer.discriminator
    real, c = renders.sample(2, torch.Generator().manual_seed(1))
    z = torch.randn(2, G.z_dim)

    def fake():
        torch.manual_seed(0)  # the same rendering jitter every time
        return G.synthesis(G.mapping(z, c), c, noise_mode="const")

    def objectives():
        with torch.no_grad():
            images = fake()
            return generator_adversarial_loss(D(images, c)).item(), discriminator_loss(D(images, c), D(real, c)).item()

    g_before, _ = objectives()
    torch.manual_seed(0)
    trainer.generator_step(z, c, c)
    g_after, d_before = objectives()
    assert g_after < g_before  # G fools this D more
    with torch.no_grad():
        images = {key: value for key, value in fake().items() if key in ("image", "image_raw")}
    trainer.discriminator_step(images, real, c)
    _, d_after = objectives()
    assert d_after < d_before  # D separates these reals from these fakes better


def test_resume_gives_the_uninterrupted_state(renders, tmp_path):
    settings = config()
    straight = GanTrainer(settings, renders, tmp_path / "straight")
    straight.train(progress=False)
    interrupted = GanTrainer(settings, renders, tmp_path / "interrupted")
    interrupted.config = GanConfig(**{**vars(settings), "steps": 2})
    interrupted.train(progress=False)
    del interrupted
    resumed = GanTrainer(settings, renders, tmp_path / "interrupted")
    assert resumed.resume() and resumed.step == 2
    final = resumed.train(progress=False)
    for name in ("generator", "generator_ema", "discriminator"):
        expected, actual = getattr(straight, name).state_dict(), getattr(resumed, name).state_dict()
        for key in expected:
            assert torch.equal(actual[key], expected[key]), f"{name}.{key}"
    generator, discriminator = load_pretrained(final)
    assert discriminator is not None and generator.rendering_kwargs["avg_camera_pivot"] == [0, 0, 0]
    for key, value in straight.generator_ema.state_dict().items():
        assert torch.equal(generator.state_dict()[key], value)
