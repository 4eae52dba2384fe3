"""The synthetic portrait world: attributes, captions, held-out combinations and renders."""

import math

import pytest
import torch

from dreamportrait.models import build_generator, camera_labels, fov_to_intrinsics, orbit_poses
from dreamportrait.models.cameras import camera_rays, split_camera_labels
from dreamportrait.world import (ATTRIBUTES, HELD_OUT_RULES, HeadAttributes, HeadBatch, all_combinations, caption,
                                 held_out_combinations, is_held_out, parse_caption, render_heads,
                                 sample_world_cameras, training_combinations)
from dreamportrait.world.attributes import PHRASINGS
from dreamportrait.world.heads import BACKGROUND, MASK_PARTS, render_part_masks


def frontal(count):
    yaws = torch.full((count,), math.pi / 2)
    return camera_labels(orbit_poses(yaws, yaws.clone(), 2.7, (0, 0, 0)), fov_to_intrinsics(18.837))


def render(heads, seed=0, resolution=32):
    batch = HeadBatch.from_attributes(heads, torch.Generator().manual_seed(seed))
    return render_heads(batch, frontal(len(heads)), resolution)[0]


def test_captions_round_trip_in_every_phrasing():
    for head in all_combinations():
        for phrasing in range(len(PHRASINGS)):
            assert parse_caption(caption(head, phrasing)) == head
    with pytest.raises(ValueError, match="no skin tone"):
        parse_caption("a person with short red hair")


def test_held_out_combinations_are_disjoint_and_cover_every_rule():
    training, held_out = set(training_combinations()), set(held_out_combinations())
    assert not training & held_out and training | held_out == set(all_combinations())
    for rule in HELD_OUT_RULES:
        assert any(all(getattr(h, k) == v for k, v in rule.items()) for h in held_out)
    for name, values in ATTRIBUTES.items():  # training still sees every value of every attribute
        seen = {getattr(h, name) for h in training}
        assert set(values) <= seen, name
    assert is_held_out(HeadAttributes("red", "light", "short", "no", "no", "blue"))
    with pytest.raises(ValueError, match="hair_color is 'none' exactly when"):
        HeadAttributes("none", "light", "short", "no", "no", "none")
    with pytest.raises(ValueError, match="hat must be one of"):
        HeadAttributes("red", "light", "short", "no", "no", "green")


def test_renders_are_deterministic_given_a_seed():
    heads = training_combinations()[:3]
    first, second = render(heads, seed=5), render(heads, seed=5)
    assert torch.equal(first, second)
    assert not torch.equal(first, render(heads, seed=6))  # shape and colour variations
    generator = torch.Generator().manual_seed(1)
    c1, yaws = sample_world_cameras(64, generator)
    assert c1.shape == (64, 25)
    assert (yaws - math.pi / 2).abs().max() <= math.radians(45) + 1e-6


def test_a_repeated_head_batch_renders_each_head_again():
    heads = training_combinations()[:2]
    batch = HeadBatch.from_attributes(heads, torch.Generator().manual_seed(int(torch.randint(1 << 30, ()))))
    repeated = batch.repeat_interleave(3)
    assert repeated.radii.shape == (6, 3) and repeated.hat.shape == (6,)
    images = render_heads(repeated, frontal(6), 32)[0]
    once = render_heads(batch, frontal(2), 32)[0]
    torch.testing.assert_close(images, once.repeat_interleave(3, dim=0), rtol=0, atol=1e-6)


def test_attributes_change_the_expected_pixels():
    base = HeadAttributes("black", "medium", "short", "no", "no", "none")
    variants = {
        "red hair": HeadAttributes("red", "medium", "short", "no", "no", "none"),
        "glasses": HeadAttributes("black", "medium", "short", "no", "yes", "none"),
        "blue hat": HeadAttributes("black", "medium", "short", "no", "no", "blue"),
        "dark skin": HeadAttributes("black", "dark", "short", "no", "no", "none"),
        "beard": HeadAttributes("black", "medium", "short", "yes", "no", "none"),
        "bald": HeadAttributes("none", "medium", "bald", "no", "no", "none"),
    }
    # Each head alone with the same seed: the same random variations, only the attribute differs.
    reference = render([base], seed=0)[0]
    changed = {name: render([head], seed=0)[0] for name, head in variants.items()}
    top, eyes, face, chin = (slice(4, 8), slice(12, 20)), (slice(9, 13), slice(12, 20)), \
        (slice(15, 19), slice(12, 20)), (slice(21, 25), slice(12, 20))

    def mean(image, region):
        return image[:, region[0], region[1]].mean(dim=(1, 2))  # RGB

    hair_red = mean(changed["red hair"], top) - mean(reference, top)
    assert hair_red[0] > 0.5 and hair_red[0] > hair_red[2] + 0.3  # the hair turns red
    assert (mean(changed["red hair"], chin) - mean(reference, chin)).abs().max() < 0.05  # not the chin
    assert mean(changed["glasses"], eyes).mean() < mean(reference, eyes).mean() - 0.2  # dark frames and lenses
    hat = mean(changed["blue hat"], top) - mean(reference, top)
    assert hat[2] > 0.5 and hat[2] > hat[0] + 0.3
    assert mean(changed["dark skin"], face).mean() < mean(reference, face).mean() - 0.4
    assert mean(changed["beard"], chin).mean() < mean(reference, chin).mean() - 0.3  # black beard on the chin
    assert mean(changed["bald"], top).mean() > mean(reference, top).mean() + 0.5  # skin instead of black hair


def test_the_world_preset_renders_empty_space_as_the_world_background():
    """The world's 3D GAN sees the world's background where its rays leave the volume (a generator
    that had to paint it would fill the frustum with a grey card)."""
    generator = build_generator("world").eval()
    assert generator.rendering_kwargs["background"] == BACKGROUND
    corner = render([all_combinations()[0]])[0][:, 0, 0]  # the world's own render leaves its corner empty
    torch.testing.assert_close(corner, torch.full((3,), 2 * BACKGROUND - 1), rtol=0, atol=1e-6)
    with torch.no_grad():  # an empty volume: every raw pixel is the background
        generator.decoder.net[-1].bias.fill_(-100.0)
        planes = torch.randn(1, 3, 32, 64, 64)
        origins, directions = camera_rays(*split_camera_labels(frontal(1)), 8)
        features, _, _ = generator.renderer(planes, generator.decoder, origins, directions, generator.rendering_kwargs)
    torch.testing.assert_close(features[..., :3], torch.full_like(features[..., :3], 2 * BACKGROUND - 1),
                               rtol=0, atol=1e-5)


def test_part_masks_cover_the_pixels_of_each_part_and_sum_to_the_opacity():
    heads = [HeadAttributes("red", "light", "long", "yes", "yes", "blue"), HeadAttributes("none", "dark", "bald", "no", "no", "none")]
    batch = HeadBatch.from_attributes(heads, torch.Generator().manual_seed(int(torch.randint(1 << 30, ()))))
    image, _, opacity = render_heads(batch, frontal(2), 64)  # 64²: the glasses' frames are thin
    masks = render_part_masks(batch, frontal(2), 64)
    assert masks.shape == (2, len(MASK_PARTS), 64, 64) and masks.min() >= 0 and masks.max() <= 1
    torch.testing.assert_close(masks.sum(1, keepdim=True), opacity, rtol=0, atol=1e-5)
    region = {name: index for index, name in enumerate(MASK_PARTS)}
    for name in ("hair", "beard", "glasses", "hat"):  # none of them on a bald, beardless, bare head
        assert masks[1, region[name]].max() < 1e-3, name
    torch.testing.assert_close(masks[1, region["skin"]], opacity[1, 0], rtol=0, atol=1e-5)
    red, blue = image[0, 0], image[0, 2]
    for name in ("skin", "hair", "beard", "glasses", "hat"):
        assert (masks[0, region[name]] > 0.5).sum() >= 4, name  # every part of the first head is seen (the lenses are half clear)
    assert (blue > red)[masks[0, region["hat"]] > 0.9].all()  # the blue hat's pixels
    assert (red > blue + 0.5)[masks[0, region["hair"]] > 0.9].all()  # the red hair's
    rows = torch.arange(64.0)[:, None].expand(64, 64)
    centre = lambda name: (rows * masks[0, region[name]]).sum() / masks[0, region[name]].sum()  # noqa: E731
    assert centre("hat") < centre("glasses") < centre("beard")  # top to bottom (image rows grow downwards)
