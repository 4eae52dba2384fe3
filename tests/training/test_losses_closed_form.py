"""The GAN regulariser's losses, the EMA and the R1 term's scale, pinned to closed forms computed
with numpy on small random inputs (never with the functions under test)."""

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

from dreamportrait.training import losses
from dreamportrait.training.gan import GanConfig, GanTrainer
from dreamportrait.training.losses import (discriminator_loss, generator_adversarial_loss, r1_penalty, spread_loss,
                                           update_ema)
from dreamportrait.training.trainer import Batch, Trainer


def softplus(x):
    return np.log1p(np.exp(x))


def sigmoid(x):
    return 1 / (1 + np.exp(-x))


def logits(*shape):
    return (torch.randn(*shape, dtype=torch.float64) * 2).requires_grad_(True)


# --- the logistic losses and their signs --------------------------------------------------------------------


def test_generator_loss_is_the_non_saturating_softplus_of_minus_the_fake_logits():
    fake = logits(5, 1)
    loss = generator_adversarial_loss(fake)
    x = fake.detach().numpy()
    assert loss.item() == pytest.approx(np.mean(np.log(1 + np.exp(-x))), rel=1e-12)
    loss.backward()  # d/dx softplus(-x) = -sigmoid(-x): raising a fake's logit lowers the loss
    assert np.allclose(fake.grad.numpy(), -sigmoid(-x) / x.size, rtol=1e-12)
    assert (fake.grad < 0).all()
    # Fakes the discriminator calls real (large logits) cost the generator almost nothing, and the
    # reverse: the sign a flipped loss would get wrong.
    assert generator_adversarial_loss(torch.full((3,), 20.0)).item() < 1e-8
    assert generator_adversarial_loss(torch.full((3,), -20.0)).item() == pytest.approx(20.0, rel=1e-6)


def test_discriminator_loss_is_softplus_of_fake_plus_softplus_of_minus_real():
    fake, real = logits(4), logits(6)  # batches of different sizes: each term is averaged on its own
    loss = discriminator_loss(fake, real)
    f, r = fake.detach().numpy(), real.detach().numpy()
    assert loss.item() == pytest.approx(softplus(f).mean() + softplus(-r).mean(), rel=1e-12)
    loss.backward()
    assert np.allclose(fake.grad.numpy(), sigmoid(f) / f.size, rtol=1e-12)  # pushes fakes' logits down
    assert np.allclose(real.grad.numpy(), -sigmoid(-r) / r.size, rtol=1e-12)  # and reals' up
    assert discriminator_loss(torch.full((2,), -20.0), torch.full((2,), 20.0)).item() < 1e-8
    assert discriminator_loss(torch.full((2,), 20.0), torch.full((2,), -20.0)).item() == pytest.approx(40, rel=1e-6)


def test_spread_loss_is_the_mean_hinge_below_the_target():
    spread = torch.rand(7, dtype=torch.float64)
    target = 0.5
    expected = np.maximum(0, target - spread.numpy()).mean()
    assert spread_loss(spread, target).item() == pytest.approx(expected, rel=1e-12)
    assert spread_loss(torch.tensor([0.2, 0.9]), 0.5).item() == pytest.approx(0.15)  # (0.3 + 0) / 2


def test_group_spread_pools_only_sides_above_its_size_and_refuses_uneven_ones():
    size = 16
    for height, width in ((32, 16), (16, 32)):  # one side above the size: pooled along it
        base = torch.rand(1, 3, height, width)
        stripes = (torch.arange(height)[:, None] + torch.arange(width)[None]) % 2 * 0.2 - 0.1
        spread = losses.group_spread(torch.cat([base, base + stripes]), 2, size)
        assert spread.item() == pytest.approx(0.0, abs=1e-6), (height, width)  # stripes of 2 average out
    for height, width in ((16, 8), (8, 16), (16, 16)):  # no side above it: compared as they are
        images = torch.rand(2, 3, height, width)
        expected = (images[0] - images[1]).abs().mean().item()
        assert losses.group_spread(images, 2, size).item() == pytest.approx(expected, rel=1e-6)
    for height, width in ((24, 32), (32, 24), (24, 16)):
        with pytest.raises(ValueError, match="do not pool evenly"):
            losses.group_spread(torch.rand(2, 3, height, width), 2, size)


def test_r1_penalty_is_the_squared_gradient_norm_over_every_input_per_sample_averaged():
    # D(x) = sum(a * x_image²) + sum(b * x_raw²) per sample: dD/dx = 2 a x, so |grad|² = 4 Σ a² x² + 4 Σ b² x².
    image, raw = torch.randn(3, 2, 4, 4, dtype=torch.float64), torch.randn(3, 2, 2, 2, dtype=torch.float64)
    a, b = torch.rand(2, 4, 4, dtype=torch.float64), torch.rand(2, 2, 2, dtype=torch.float64)
    a.requires_grad_(True)
    image.requires_grad_(True), raw.requires_grad_(True)
    real_logits = (a * image.square()).flatten(1).sum(1) + (b * raw.square()).flatten(1).sum(1)
    penalty = r1_penalty(real_logits, [image, raw])
    ai, xi, bi, xr = a.detach().numpy(), image.detach().numpy(), b.numpy(), raw.detach().numpy()
    per_sample = 4 * (ai**2 * xi**2).reshape(3, -1).sum(1) + 4 * (bi**2 * xr**2).reshape(3, -1).sum(1)
    assert penalty.item() == pytest.approx(per_sample.mean(), rel=1e-12)
    # Differentiable with respect to the discriminator (create_graph): d/da = 8 a x² averaged over samples.
    penalty.backward()
    assert np.allclose(a.grad.numpy(), (8 * ai * xi**2).mean(0), rtol=1e-10)


# --- the EMA ------------------------------------------------------------------------------------------------


def small_net():
    torch.manual_seed(int(torch.randint(1 << 30, ())))
    return nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4)).double()


def test_ema_moves_by_one_minus_beta_toward_the_current_weights_and_copies_buffers():
    ema, current = small_net(), small_net()
    with torch.no_grad():
        for buffer in current.buffers():
            buffer.copy_(torch.rand_like(buffer.double()).to(buffer.dtype) * 5)
    before = [p.detach().numpy().copy() for p in ema.parameters()]
    beta = 0.9
    update_ema(ema, current, beta)
    for old, average, value in zip(before, ema.parameters(), current.parameters()):
        assert np.allclose(average.detach().numpy(), 0.9 * old + 0.1 * value.detach().numpy(), rtol=1e-12)
    for average, value in zip(ema.buffers(), current.buffers()):
        assert torch.equal(average, value)
    # beta 0: the EMA is the current network; beta 1: it never moves.
    frozen = [p.detach().clone() for p in ema.parameters()]
    update_ema(ema, current, 1.0)
    assert all(torch.equal(p, q) for p, q in zip(ema.parameters(), frozen))
    update_ema(ema, current, 0.0)
    assert all(torch.equal(p, q) for p, q in zip(ema.parameters(), current.parameters()))


@pytest.mark.parametrize("half_life", [3, 10])
def test_the_ema_half_life_halves_the_distance_to_fixed_weights(tmp_path, half_life):
    trainer = GanTrainer(GanConfig(preset="tiny", ema_half_life_steps=half_life), None, tmp_path)
    ema, current = small_net(), small_net()
    start = [(p - q).detach().clone() for p, q in zip(ema.parameters(), current.parameters())]
    for _ in range(half_life):
        update_ema(ema, current, trainer.ema_beta)
    for gap, p, q in zip(start, ema.parameters(), current.parameters()):
        assert torch.allclose(p - q, gap / 2, rtol=1e-9, atol=1e-12)
    assert GanTrainer(GanConfig(preset="tiny", ema_half_life_steps=0), None, tmp_path).ema_beta == 0.0


# --- the trainers' use of the losses: signs, weights and the R1 scale --------------------------------------


class LinearDiscriminator(nn.Module):
    """D(x) = w Σ x_image + v Σ x_raw: its input gradient is w (v) in every pixel, so the R1 penalty
    per sample is w² n_image + v² n_raw."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.rand((), dtype=torch.float64) + 0.5)
        self.v = nn.Parameter(torch.rand((), dtype=torch.float64) - 1.5)

    def forward(self, inputs, c):
        return self.w * inputs["image"].flatten(1).sum(1) + self.v * inputs["image_raw"].flatten(1).sum(1)


def images(batch):
    return {"image": torch.randn(batch, 3, 4, 4, dtype=torch.float64) * 0.1,
            "image_raw": torch.randn(batch, 3, 2, 2, dtype=torch.float64) * 0.1}


def expected_discriminator_objective(D, fake, real, gamma, interval, r1):
    """(value, d value / d w) of softplus(D(fake)) + softplus(-D(real)) + r1 (γ/2) interval mean|∇D(real)|²."""
    w, v = D.w.item(), D.v.item()
    sums = {name: {key: x[key].numpy().reshape(len(x[key]), -1).sum(1) for key in x} for name, x in
            (("fake", fake), ("real", real))}
    f = w * sums["fake"]["image"] + v * sums["fake"]["image_raw"]
    r = w * sums["real"]["image"] + v * sums["real"]["image_raw"]
    n_image, n_raw = fake["image"][0].numel(), fake["image_raw"][0].numel()
    value = softplus(f).mean() + softplus(-r).mean()
    grad_w = (sigmoid(f) * sums["fake"]["image"]).mean() - (sigmoid(-r) * sums["real"]["image"]).mean()
    if r1:
        value += (w**2 * n_image + v**2 * n_raw) * gamma / 2 * interval
        grad_w += gamma * interval * w * n_image
    return value, grad_w


@pytest.mark.parametrize("gamma,interval", [(1.0, 4), (0.3, 16), (2.5, 1)])
def test_gan_trainer_adds_r1_scaled_by_half_gamma_times_the_interval_only_every_interval_steps(gamma, interval):
    trainer = GanTrainer.__new__(GanTrainer)
    trainer.config = GanConfig(r1_gamma=gamma, r1_interval=interval)
    trainer.discriminator = D = LinearDiscriminator()
    trainer.d_optimizer = torch.optim.SGD(D.parameters(), lr=0.0)  # keeps the gradient for inspection
    fake, real, c = images(3), images(3), torch.zeros(3, 25)
    for step in (0, 1, interval, 2 * interval + 1):
        trainer.step = step
        logs = trainer.discriminator_step(fake, real, c)
        lazy = step % interval == 0
        value, grad_w = expected_discriminator_objective(D, fake, real, gamma, interval, lazy)
        assert D.w.grad.item() == pytest.approx(grad_w, rel=1e-9), step
        assert logs["d"] == pytest.approx(expected_discriminator_objective(D, fake, real, 0, 1, False)[0], rel=1e-9)
        assert ("r1" in logs) == lazy
        if lazy:
            n_image, n_raw = fake["image"][0].numel(), fake["image_raw"][0].numel()
            assert logs["r1"] == pytest.approx(D.w.item() ** 2 * n_image + D.v.item() ** 2 * n_raw, rel=1e-9)
    trainer.config = GanConfig(r1_gamma=0.0, r1_interval=interval)
    trainer.step = 0
    assert "r1" not in trainer.discriminator_step(fake, real, c)


@pytest.mark.parametrize("gamma,interval", [(1.0, 4), (0.7, 2)])
def test_dreamportrait_trainer_discriminator_loss_has_the_same_closed_form(gamma, interval):
    trainer = Trainer.__new__(Trainer)
    real = images(2)
    trainer.config = SimpleNamespace(batch_size=2, gan=SimpleNamespace(r1_gamma=gamma, r1_interval=interval,
                                                                       group_size=1))
    trainer.device, trainer.real_images = torch.device("cpu"), None
    trainer.frozen = lambda z, c: {key: value.clone() for key, value in real.items()}
    trainer.discriminator = D = LinearDiscriminator()
    batch = SimpleNamespace(c=torch.zeros(2, 25), real_c=torch.zeros(2, 25), real_z=torch.zeros(2, 4))
    fake = images(2)
    for step in (0, 1, interval):
        trainer.step = step
        D.zero_grad()
        loss, logs = trainer.discriminator_loss(batch, fake)
        lazy = step % interval == 0
        value, grad_w = expected_discriminator_objective(D, fake, real, gamma, interval, lazy)
        assert loss.item() == pytest.approx(value, rel=1e-6)  # the trainer compares in float32
        loss.backward()
        assert D.w.grad.item() == pytest.approx(grad_w, rel=1e-5)
        assert ("loss/r1" in logs) == lazy


class ScaledGenerator(nn.Module):
    """mapping(z) = a z; synthesis returns the images a z (broadcast): dLoss/da is a closed form."""

    z_dim = 4

    def __init__(self):
        super().__init__()
        self.a = nn.Parameter(torch.rand((), dtype=torch.float64) + 0.5)

    def mapping(self, z, c):
        return self.a * z

    def synthesis(self, ws, c, **kwargs):
        return {"image": ws[:, None, :, None].expand(-1, 3, 4, 4),
                "image_raw": ws[:, None, :2, None].expand(-1, 3, 2, 2)}


def test_gan_trainer_generator_step_descends_softplus_of_minus_d_and_updates_the_ema_by_one_minus_beta():
    trainer = GanTrainer.__new__(GanTrainer)
    trainer.generator, trainer.generator_ema = ScaledGenerator(), ScaledGenerator()
    trainer.discriminator = D = LinearDiscriminator()
    trainer.g_optimizer = torch.optim.SGD(trainer.generator.parameters(), lr=0.01)
    trainer.ema_beta = 0.8
    z, c = torch.randn(3, 4, dtype=torch.float64), torch.zeros(3, 25)
    a, w, v, ema_a = trainer.generator.a.item(), D.w.item(), D.v.item(), trainer.generator_ema.a.item()
    # D(G(z)) = a (12 w Σ z + 6 v (z0 + z1)) = a s per sample.
    zs = z.numpy()
    s = 12 * w * zs.sum(1) + 6 * v * zs[:, :2].sum(1)
    loss, fake = trainer.generator_step(z, c, c)
    assert loss == pytest.approx(softplus(-a * s).mean(), rel=1e-9)
    grad_a = (-sigmoid(-a * s) * s).mean()
    assert trainer.generator.a.item() == pytest.approx(a - 0.01 * grad_a, rel=1e-9)
    assert trainer.generator_ema.a.item() == pytest.approx(0.8 * ema_a + 0.2 * trainer.generator.a.item(), rel=1e-9)
    assert D.w.grad is None and D.v.grad is None and D.w.requires_grad  # D is not trained by G's step
    assert set(fake) == {"image", "image_raw"} and not fake["image"].requires_grad


def test_dreamportrait_generator_loss_adds_weighted_sds_adversarial_and_spread_terms():
    trainer = Trainer.__new__(Trainer)
    gw, aw, sw, tau = 0.7, 0.3, 2.0, 0.9
    trainer.config = SimpleNamespace(guidance=SimpleNamespace(weight=gw),
                                     gan=SimpleNamespace(weight=aw, spread_weight=sw, group_size=2),
                                     cameras=SimpleNamespace(conditioning="render"), optim=SimpleNamespace(amp=False))
    trainer.device = torch.device("cpu")
    trainer.spread_target = tau
    trainer.discriminator = D = LinearDiscriminator()
    out = {key: value.requires_grad_(True) for key, value in images(4).items()}
    trainer.generator = SimpleNamespace(encode=lambda prompts: None)
    trainer.g_module = lambda z, c, text, conditioning: out
    sds_value = torch.rand((), dtype=torch.float64)
    trainer.guidance = SimpleNamespace(sds_loss=lambda *args, **kwargs: SimpleNamespace(
        loss=sds_value, grad=torch.ones(4, 3, 2, 2)))
    batch = Batch(z=torch.zeros(4, 4), c=torch.zeros(4, 25), yaws=torch.zeros(4), prompts=["p"] * 4, t=None,
                  noise=None, real_z=None, real_c=None)
    loss, logs, _ = trainer.generator_loss(batch)
    sums = {key: out[key].detach().numpy().reshape(4, -1).sum(1) for key in out}
    f = D.w.item() * sums["image"] + D.v.item() * sums["image_raw"]
    raw = out[losses.SPREAD_RENDER].detach().numpy()
    spread = np.array([np.abs(raw[g] - raw[g + 2]).mean() for g in range(2)])  # member-major: i, i + B/G
    expected = gw * sds_value.item() + aw * softplus(-f).mean() + sw * np.maximum(0, tau - spread).mean()
    assert loss.item() == pytest.approx(expected, rel=1e-6)  # the trainer compares in float32
    assert logs["loss/g_adversarial"] == pytest.approx(softplus(-f).mean(), rel=1e-6)
    assert logs["gan/group_spread"] == pytest.approx(spread.mean(), rel=1e-6)
    assert D.w.requires_grad
    # Without the regulariser the loss is the weighted SDS loss alone.
    trainer.config.gan.weight = 0.0
    loss, logs, _ = trainer.generator_loss(batch)
    assert loss.item() == pytest.approx(gw * sds_value.item(), rel=1e-12) and "loss/g_adversarial" not in logs


def test_the_spread_render_is_the_raw_volume_render():
    assert losses.SPREAD_RENDER == "image_raw" and losses.SPREAD_RESOLUTION == 16
    assert math.isclose(spread_loss(torch.tensor([0.0]), 1.0).item(), 1.0)
