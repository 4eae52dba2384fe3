"""What the trainers feed their networks and losses, pinned with stand-ins of known outputs: which
camera each discriminator call sees, where the "real" samples come from, the cameras the mapping
is conditioned on, the device every input is moved to, the logged values, the optimisers' settings
and the EMA copy. Expected values are closed forms computed with numpy, never with the trainers."""

import contextlib
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

from dreamportrait.training.gan import GanConfig, GanTrainer
from dreamportrait.training.trainer import Batch, Trainer


def softplus(x):
    return np.log1p(np.exp(x))


def sigmoid(x):
    return 1 / (1 + np.exp(-x))


class CameraLinearDiscriminator(nn.Module):
    """D(x, c) = w Σ x_image + v Σ x_raw + u Σ c per sample: the camera moves the logit (so a call with
    another sample's camera, or none, shows), the input gradient is w (v) in every pixel."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.rand((), dtype=torch.float64) + 0.5)
        self.v = nn.Parameter(torch.rand((), dtype=torch.float64) - 1.5)
        self.u = 0.3

    def forward(self, inputs, c):
        return (self.w * inputs["image"].flatten(1).sum(1) + self.v * inputs["image_raw"].flatten(1).sum(1)
                + self.u * c.double().flatten(1).sum(1))


def logit(D, x, c):
    """D's logit in numpy."""
    sums = {key: np.asarray(value.detach().double()).reshape(len(value), -1).sum(1) for key, value in x.items()}
    return D.w.item() * sums["image"] + D.v.item() * sums["image_raw"] + D.u * np.asarray(c.double()).sum(1)


def images(batch):
    return {"image": torch.randn(batch, 3, 4, 4, dtype=torch.float64) * 0.1,
            "image_raw": torch.randn(batch, 3, 2, 2, dtype=torch.float64) * 0.1}


def cameras(batch):
    return torch.rand(batch, 25, dtype=torch.float64) * 0.2


# --- the DreamPortrait trainer's discriminator loss --------------------------------------------------------


def discriminator_trainer(gamma=1.0, interval=2, group_size=2):
    trainer = Trainer.__new__(Trainer)
    trainer.config = SimpleNamespace(batch_size=4, gan=SimpleNamespace(r1_gamma=gamma, r1_interval=interval,
                                                                       group_size=group_size))
    trainer.device, trainer.real_images, trainer.step = torch.device("cpu"), None, 0
    trainer.sampler = torch.Generator().manual_seed(5)
    trainer.discriminator = CameraLinearDiscriminator()
    return trainer


def frozen_generator(z, c):
    """A stand-in for the frozen pretrained generator: images that are a known function of (z, c)."""
    image = (z[:, :1, None, None] + c[:, :1, None, None]).expand(-1, 3, 4, 4)
    return {"image": image.float(), "image_raw": (z[:, 1:2, None, None] * 2).expand(-1, 3, 2, 2).float(),
            "image_depth": torch.zeros(len(z), 1, 2, 2)}


@pytest.mark.parametrize("step", [0, 1])
def test_the_discriminator_sees_fakes_with_their_cameras_and_the_frozen_generators_samples_with_theirs(step):
    trainer = discriminator_trainer(gamma=0.8, interval=2)
    trainer.step = step
    calls = []
    trainer.frozen = lambda z, c: calls.append((z, c)) or frozen_generator(z, c)
    batch = SimpleNamespace(c=cameras(4), real_c=cameras(4) + 0.5, real_z=torch.randn(4, 3, dtype=torch.float64))
    fake = images(4)
    loss, logs = trainer.discriminator_loss(batch, fake)
    assert len(calls) == 1 and torch.equal(calls[0][0], batch.real_z) and torch.equal(calls[0][1], batch.real_c)
    D = trainer.discriminator
    real = {key: value.float() for key, value in frozen_generator(batch.real_z, batch.real_c).items()}
    f, r = logit(D, fake, batch.c), logit(D, real, batch.real_c)
    adversarial = softplus(f).mean() + softplus(-r).mean()
    n_image, n_raw = 3 * 4 * 4, 3 * 2 * 2
    penalty = D.w.item() ** 2 * n_image + D.v.item() ** 2 * n_raw  # |∇_x D|² per sample, whatever the camera
    lazy = step % 2 == 0
    assert loss.item() == pytest.approx(adversarial + lazy * penalty * 0.8 / 2 * 2, rel=1e-5)
    assert set(logs) == ({"loss/d", "loss/r1"} if lazy else {"loss/d"})
    assert logs["loss/d"] == pytest.approx(adversarial, rel=1e-5)
    if lazy:
        assert logs["loss/r1"] == pytest.approx(penalty, rel=1e-5)


def test_an_image_folder_gives_the_real_samples_drawn_with_the_trainers_sampler_in_groups():
    trainer = discriminator_trainer(gamma=0.0, group_size=2)
    real, real_c = images(4), cameras(4) + 1.0
    draws = []

    def sample(count, generator, group_size):
        draws.append((count, generator, group_size))
        return real, real_c

    trainer.real_images = SimpleNamespace(sample=sample)
    trainer.frozen = None
    batch = SimpleNamespace(c=cameras(4), real_c=cameras(4), real_z=None)
    fake = images(4)
    loss, logs = trainer.discriminator_loss(batch, fake)
    assert draws == [(4, trainer.sampler, 2)] and draws[0][1] is trainer.sampler
    D = trainer.discriminator
    expected = softplus(logit(D, fake, batch.c)).mean() + softplus(-logit(D, real, real_c)).mean()
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    assert set(logs) == {"loss/d"}  # r1_gamma 0: no R1 term, even on a lazy step


# --- the DreamPortrait trainer's generator loss ------------------------------------------------------------


def generator_trainer(conditioning="render", weight=0.4, spread_weight=1.5, tau=0.8):
    trainer = Trainer.__new__(Trainer)
    trainer.config = SimpleNamespace(guidance=SimpleNamespace(weight=0.6),
                                     gan=SimpleNamespace(weight=weight, spread_weight=spread_weight, group_size=2),
                                     cameras=SimpleNamespace(conditioning=conditioning),
                                     optim=SimpleNamespace(amp=False))
    trainer.device = torch.device("cpu")
    trainer.spread_target = tau
    trainer.discriminator = CameraLinearDiscriminator()
    trainer.generator = SimpleNamespace(encode=lambda prompts: ("encoded", tuple(prompts)),
                                        base=SimpleNamespace(rendering_kwargs={"avg_camera_radius": 2.0,
                                                                               "avg_camera_pivot": (0.0, 0.1, 0.0)}))
    return trainer


class Recorder:
    """Stand-ins for the generator's forward and the SDS guidance that keep what they were given."""

    def __init__(self, out, sds_value, sds_grad):
        self.out, self.sds_value, self.sds_grad = out, sds_value, sds_grad
        self.forward, self.sds = [], []

    def g_module(self, z, c, *, text, conditioning):
        self.forward.append(SimpleNamespace(z=z, c=c, text=text, conditioning=conditioning))
        return self.out

    def sds_loss(self, images, prompts, *, yaws, t, noise):
        self.sds.append(SimpleNamespace(images=images, prompts=prompts, yaws=yaws, t=t, noise=noise))
        return SimpleNamespace(loss=self.sds_value, grad=self.sds_grad)


def generator_batch():
    return Batch(z=torch.randn(4, 5), c=cameras(4), yaws=torch.rand(4), prompts=["a", "b", "a", "b"],
                 t=torch.tensor([20, 300, 500, 980]), noise=torch.randn(4, 3, 2, 2), real_z=None, real_c=None)


def test_the_generator_loss_feeds_the_batch_to_the_generator_guidance_and_discriminator():
    trainer = generator_trainer()
    out = {key: value.requires_grad_(True) for key, value in images(4).items()}
    sds_grad = torch.randn(4, 3, 2, 2)
    recorder = Recorder(out, torch.tensor(0.37, dtype=torch.float64), sds_grad)
    trainer.g_module, trainer.guidance = recorder.g_module, SimpleNamespace(sds_loss=recorder.sds_loss)
    batch = generator_batch()
    loss, logs, returned = trainer.generator_loss(batch)
    assert returned is out
    (call,) = recorder.forward
    assert torch.equal(call.z, batch.z) and torch.equal(call.c, batch.c) and torch.equal(call.conditioning, batch.c)
    assert call.text == ("encoded", ("a", "b", "a", "b"))
    (sds,) = recorder.sds
    assert sds.images.dtype == torch.float32 and torch.equal(sds.images, out["image"].float())
    assert sds.prompts == batch.prompts and sds.yaws is batch.yaws and sds.t is batch.t and sds.noise is batch.noise
    # The discriminator judges the renders with their own cameras.
    D = trainer.discriminator
    f = logit(D, {key: value.float() for key, value in out.items()}, batch.c)
    raw = out["image_raw"].detach().float().numpy()
    spread = np.array([np.abs(raw[g] - raw[g + 2]).mean() for g in range(2)])
    hinge = np.maximum(0, 0.8 - spread).mean()
    assert loss.item() == pytest.approx(0.6 * 0.37 + 0.4 * softplus(-f).mean() + 1.5 * hinge, rel=1e-5)
    grad_norm = np.linalg.norm(sds_grad.numpy().reshape(4, -1), axis=1).mean()  # per sample, then averaged
    assert set(logs) == {"loss/sds", "sds/grad_norm", "loss/g_adversarial", "loss/spread", "gan/group_spread"}
    assert logs["loss/sds"] == pytest.approx(0.37) and logs["sds/grad_norm"] == pytest.approx(grad_norm, rel=1e-5)
    assert logs["loss/g_adversarial"] == pytest.approx(softplus(-f).mean(), rel=1e-5)
    assert logs["loss/spread"] == pytest.approx(hinge, rel=1e-5)
    assert logs["gan/group_spread"] == pytest.approx(spread.mean(), rel=1e-5)
    # Only the generator learns from this loss: the discriminator gets no gradient, and can learn again after.
    loss.backward()
    assert D.w.grad is None and D.v.grad is None and D.w.requires_grad and D.v.requires_grad
    assert out["image"].grad is not None


def test_the_mapping_is_conditioned_on_the_frontal_camera_of_the_generators_orbit():
    trainer = generator_trainer(conditioning="frontal", weight=0.0)
    c = cameras(3)
    conditioning = trainer._conditioning(c)
    assert conditioning.shape == (3, 25) and conditioning.dtype == torch.float64
    # EG3D's frontal camera on the orbit of radius 2 about the world origin, looking at the pivot (0, 0.1, 0),
    # with FFHQ's focal length 1 / (tan(18.837° / 2) · 1.414).
    forward = np.array([0.0, 0.1, -2.0]) / np.linalg.norm([0.0, 0.1, -2.0])
    focal = 1 / (math.tan(math.radians(18.837) / 2) * 1.414)
    for row in conditioning:
        cam2world = row[:16].view(4, 4)
        assert np.allclose(cam2world[:3, 3], [0, 0, 2], atol=1e-5)
        assert np.allclose(cam2world[:3, 2], forward, atol=1e-5)
        assert np.allclose(row[16:].view(3, 3), [[focal, 0, 0.5], [0, focal, 0.5], [0, 0, 1]], atol=1e-5)
    assert generator_trainer(conditioning="render")._conditioning(c) is c
    # The generator loss conditions the mapping on it.
    recorder = Recorder(images(3), torch.tensor(0.0), torch.zeros(3, 3, 2, 2))
    trainer.g_module, trainer.guidance = recorder.g_module, SimpleNamespace(sds_loss=recorder.sds_loss)
    batch = Batch(z=torch.zeros(3, 5), c=c, yaws=torch.zeros(3), prompts=["a"] * 3, t=None, noise=None,
                  real_z=None, real_c=None)
    trainer.generator_loss(batch)
    assert torch.equal(recorder.forward[0].conditioning, conditioning) and torch.equal(recorder.forward[0].c, c)


class DeviceRecorder(nn.Module):
    """A discriminator that notes the devices of what it is given (and returns CPU logits)."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.ones(()))
        self.devices = []

    def forward(self, inputs, c):
        self.devices.append((inputs["image"].device.type, inputs["image_raw"].device.type, c.device.type))
        return self.w * torch.ones(len(c))


def test_every_input_is_moved_to_the_trainers_device():
    """A trainer on the "meta" device with its batch on the CPU: what reaches the networks is on meta."""
    trainer = generator_trainer(spread_weight=0.0)
    trainer.device, trainer.spread_target = torch.device("meta"), None
    trainer.discriminator = DeviceRecorder()
    out = {"image": torch.zeros(2, 3, 4, 4, device="meta"), "image_raw": torch.zeros(2, 3, 2, 2, device="meta")}
    recorder = Recorder(out, torch.tensor(0.5), torch.zeros(2, 3, 2, 2))
    trainer.g_module, trainer.guidance = recorder.g_module, SimpleNamespace(sds_loss=recorder.sds_loss)
    batch = Batch(z=torch.zeros(2, 5), c=cameras(2), yaws=torch.zeros(2), prompts=["a"] * 2, t=None, noise=None,
                  real_z=torch.zeros(2, 3), real_c=cameras(2))
    trainer.generator_loss(batch)
    call = recorder.forward[0]
    assert (call.z.device.type, call.c.device.type, call.conditioning.device.type) == ("meta", "meta", "meta")
    assert trainer.discriminator.devices == [("meta", "meta", "meta")]
    # The discriminator's loss: the frozen generator's inputs, the real samples and both cameras.
    trainer.config.batch_size = 2
    trainer.config.gan.r1_gamma, trainer.config.gan.r1_interval = 0.0, 1
    trainer.real_images, trainer.step = None, 0
    seen = []
    trainer.frozen = lambda z, c: seen.append((z.device.type, c.device.type)) or {
        "image": torch.zeros(2, 3, 4, 4), "image_raw": torch.zeros(2, 3, 2, 2)}
    trainer.discriminator.devices.clear()
    trainer.discriminator_loss(batch, out)
    assert seen == [("meta", "meta")]
    assert trainer.discriminator.devices == [("meta", "meta", "meta"), ("meta", "meta", "meta")]


def test_mixed_precision_is_bfloat16_autocast_on_cuda_with_amp_only():
    def autocast(device, amp):
        trainer = Trainer.__new__(Trainer)
        trainer.device, trainer.config = torch.device(device), SimpleNamespace(optim=SimpleNamespace(amp=amp))
        return trainer._autocast()

    for device, amp in (("cpu", True), ("cpu", False), ("cuda", False)):
        assert isinstance(autocast(device, amp), contextlib.nullcontext), (device, amp)
    with pytest.warns(UserWarning) if not torch.cuda.is_available() else contextlib.nullcontext():
        context = autocast("cuda", True)
    assert isinstance(context, torch.autocast) and context.device == "cuda" and context.fast_dtype == torch.bfloat16


# --- the 3D GAN trainer ------------------------------------------------------------------------------------


def test_gan_trainer_builds_its_optimisers_ema_and_sampler_from_the_config(tmp_path):
    config = GanConfig(preset="tiny", seed=7, lr_g=0.0123, lr_d=0.0045, betas=(0.1, 0.7), ema_half_life_steps=0.5)
    trainer = GanTrainer(config, None, tmp_path, backend="reference")
    assert trainer.generator.renderer.backend == "reference"
    assert trainer.step == 0 and trainer.sampler.initial_seed() == 7
    assert trainer.ema_beta == pytest.approx(0.25, rel=1e-12)  # 0.5 ** (1 / half-life)
    for optimizer, network, lr in ((trainer.g_optimizer, trainer.generator, 0.0123),
                                   (trainer.d_optimizer, trainer.discriminator, 0.0045)):
        assert isinstance(optimizer, torch.optim.Adam) and len(optimizer.param_groups) == 1
        group = optimizer.param_groups[0]
        assert group["lr"] == lr and tuple(group["betas"]) == (0.1, 0.7) and group["eps"] == 1e-8
        assert [id(p) for p in group["params"]] == [id(p) for p in network.parameters()]
    assert trainer.generator.training and trainer.discriminator.training and not trainer.generator_ema.training
    pairs = list(zip(trainer.generator_ema.parameters(), trainer.generator.parameters(), strict=True))
    for average, value in pairs:  # a separate, frozen copy with the same weights
        assert average is not value and torch.equal(average, value)
        assert value.requires_grad and not average.requires_grad


class CameraGenerator(nn.Module):
    """mapping(z, c_pose) = a (z + c_pose[:, :4]); synthesis(ws, c) shows ws + c[:, 4:8] (column j of
    the image is ws_j, the raw image the first two): what the pose conditioning and the rendering
    camera each change is known."""

    z_dim = 4

    def __init__(self):
        super().__init__()
        self.a = nn.Parameter(torch.rand((), dtype=torch.float64) + 0.5)

    def mapping(self, z, c):
        return self.a * (z + c[:, :4])

    def synthesis(self, ws, c, **kwargs):
        shown = ws + c[:, 4:8]
        return {"image": shown[:, None, :, None].expand(-1, 3, 4, 4),
                "image_raw": shown[:, None, :2, None].expand(-1, 3, 2, 2)}


def test_gan_trainer_renders_fakes_from_c_with_the_pose_conditioning_c_pose_and_judges_them_with_c():
    trainer = GanTrainer.__new__(GanTrainer)
    trainer.generator, trainer.generator_ema = CameraGenerator(), CameraGenerator()
    trainer.discriminator = D = CameraLinearDiscriminator()
    trainer.g_optimizer = torch.optim.SGD(trainer.generator.parameters(), lr=0.01)
    trainer.ema_beta = 0.5
    z, c_pose, c = torch.randn(3, 4, dtype=torch.float64), cameras(3), cameras(3) + 1.0
    a, w, v = trainer.generator.a.item(), D.w.item(), D.v.item()
    zs, p, q, cs = z.numpy(), c_pose.numpy()[:, :4], c.numpy()[:, 4:8], c.numpy()
    shown = a * (zs + p) + q
    logits = 12 * w * shown.sum(1) + 6 * v * shown[:, :2].sum(1) + D.u * cs.sum(1)
    d_shown_da = zs + p
    d_logits_da = 12 * w * d_shown_da.sum(1) + 6 * v * d_shown_da[:, :2].sum(1)
    loss, fake = trainer.generator_step(z, c_pose, c)
    assert loss == pytest.approx(softplus(-logits).mean(), rel=1e-9)
    grad_a = (-sigmoid(-logits) * d_logits_da).mean()
    assert trainer.generator.a.item() == pytest.approx(a - 0.01 * grad_a, rel=1e-9)
    assert np.allclose(fake["image"][:, 0, :, 0].numpy(), shown, rtol=1e-12)


def test_gan_trainer_discriminator_step_judges_fakes_and_reals_with_the_cameras_they_were_seen_from():
    trainer = GanTrainer.__new__(GanTrainer)
    trainer.config = GanConfig(r1_gamma=0.6, r1_interval=3)
    trainer.discriminator = D = CameraLinearDiscriminator()
    trainer.d_optimizer = torch.optim.SGD(D.parameters(), lr=0.0)
    fake, real, c = images(3), images(3), cameras(3) + 0.7
    for step in (0, 1):
        trainer.step = step
        D.zero_grad()
        logs = trainer.discriminator_step(fake, real, c)
        f, r = logit(D, fake, c), logit(D, real, c)
        assert logs["d"] == pytest.approx(softplus(f).mean() + softplus(-r).mean(), rel=1e-9)
        n_image, n_raw = 3 * 4 * 4, 3 * 2 * 2
        sums_f, sums_r = fake["image"].flatten(1).sum(1).numpy(), real["image"].flatten(1).sum(1).numpy()
        grad_w = (sigmoid(f) * sums_f).mean() - (sigmoid(-r) * sums_r).mean()
        if step == 0:
            assert logs["r1"] == pytest.approx(D.w.item() ** 2 * n_image + D.v.item() ** 2 * n_raw, rel=1e-9)
            grad_w += 0.6 * 3 * D.w.item() * n_image
        else:
            assert "r1" not in logs
        assert D.w.grad.item() == pytest.approx(grad_w, rel=1e-9)
