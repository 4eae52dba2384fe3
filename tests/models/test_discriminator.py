"""The dual discriminator on real and generated batches."""

import pytest
import torch
import torch.nn.functional as F

from dreamportrait.models import build_discriminator, build_generator, camera_labels, fov_to_intrinsics
from dreamportrait.models import sample_orbit_poses
from dreamportrait.models.discriminator import resize_raw_image


def cameras(batch):
    return camera_labels(sample_orbit_poses(batch), fov_to_intrinsics(18.837))


def test_scores_real_and_generated_batches_with_gradients():
    generator, discriminator = build_generator("tiny"), build_discriminator("tiny")
    c = cameras(4)
    fake = generator(torch.randn(4, generator.z_dim), c)
    real = {"image": torch.rand(4, 3, 64, 64) * 2 - 1, "image_raw": torch.rand(4, 3, 32, 32) * 2 - 1}
    real["image"].requires_grad_(True)
    logits_fake, logits_real = discriminator(fake, c), discriminator(real, c)
    assert logits_fake.shape == logits_real.shape == (4, 1)
    assert torch.isfinite(logits_fake).all() and not torch.allclose(logits_fake, logits_real)
    (F.softplus(logits_fake) + F.softplus(-logits_real)).mean().backward()
    assert real["image"].grad.abs().sum() > 0  # what R1 needs
    assert all(p.grad is not None for p in discriminator.parameters())
    assert next(generator.backbone.parameters()).grad.abs().sum() > 0


def test_raw_image_and_camera_both_matter():
    discriminator = build_discriminator("tiny").eval()
    c = cameras(2)
    img = {"image": torch.randn(2, 3, 64, 64), "image_raw": torch.randn(2, 3, 32, 32)}
    base = discriminator(img, c)
    assert not torch.allclose(discriminator({**img, "image_raw": torch.randn(2, 3, 32, 32)}, c), base)
    assert not torch.allclose(discriminator(img, cameras(2)), base)
    # The raw image is resized with antialiased bilinear filtering to the image size.
    raw = torch.randn(2, 3, 16, 16)
    torch.testing.assert_close(resize_raw_image(raw, 64), F.interpolate(raw, size=(64, 64), mode="bilinear",
                                                                         align_corners=False, antialias=True))


def test_bad_input_is_named():
    discriminator = build_discriminator("tiny")
    c = cameras(2)
    img = {"image": torch.randn(2, 3, 64, 64), "image_raw": torch.randn(2, 3, 32, 32)}
    with pytest.raises(ValueError, match=r"c must have shape \(2, 25\)"):
        discriminator(img, c[:, :24])
    with pytest.raises(ValueError, match=r"img\['image'\] must have shape"):
        discriminator({**img, "image": torch.randn(2, 3, 32, 32)}, c)
    with pytest.raises(ValueError, match=r"img\['image_raw'\]"):
        discriminator({**img, "image_raw": torch.randn(3, 3, 32, 32)}, c)
    with pytest.raises(ValueError, match="'image' and 'image_raw'"):
        discriminator(img["image"], c)
    with pytest.raises(ValueError, match="multiple of the group size"):
        discriminator({"image": torch.randn(6, 3, 64, 64), "image_raw": torch.randn(6, 3, 32, 32)}, cameras(6))
