"""Ray sampling and the ray marcher's edges pinned to closed forms: stratified depths and inverse-CDF
draws from the given random generator at the requested dtype and device, the eps of the
piecewise-constant density, an empty ray's depth, and the messages of refused inputs."""

import re

import numpy as np
import pytest
import torch

from dreamportrait.rendering import eg3d_ray_march
from dreamportrait.rendering.sampling import sample_pdf, stratified_depths


def test_stratified_depths_are_evenly_spaced_and_jittered_by_the_given_generator_within_each_step():
    assert torch.equal(stratified_depths(1, 1, 2.0, 3.0, 2, jitter=False).view(-1), torch.tensor([2.0, 3.0]))
    batch, rays, samples = 2, 3, 5
    depths = stratified_depths(batch, rays, 1.0, 3.0, samples, dtype=torch.float64,
                               generator=torch.Generator().manual_seed(11))
    assert depths.shape == (batch, rays, samples, 1) and depths.dtype == torch.float64
    # step k at k / (S - 1) plus a uniform fraction of one step, drawn in float64 from that generator
    u = torch.rand(batch, rays, samples, 1, dtype=torch.float64, generator=torch.Generator().manual_seed(11)).numpy()
    steps = np.arange(samples).reshape(1, 1, samples, 1) / (samples - 1) + u / (samples - 1)
    np.testing.assert_allclose(depths.numpy(), 1.0 + 2.0 * steps, rtol=1e-15, atol=0)
    even = stratified_depths(1, 1, 0.0, 1.0, 7, jitter=False, dtype=torch.float64)
    np.testing.assert_allclose(even.view(-1).numpy(), np.arange(7) / 6, rtol=1e-15, atol=1e-17)
    assert even.dtype == torch.float64


def test_stratified_depths_are_made_on_the_requested_device():
    for jitter in (False, True):
        assert stratified_depths(1, 2, 0.5, 1.0, 3, jitter=jitter, device="meta").device.type == "meta"


def inverse_cdf(bins, weights, u, eps):
    """numpy: piecewise-constant density with mass ∝ weights + eps per bin, inverted at u."""
    mass = np.asarray(weights, dtype=np.float64) + eps
    cdf = np.concatenate([[0.0], np.cumsum(mass / mass.sum())])
    return np.interp(u, cdf, bins)


def test_sample_pdf_inverts_the_cdf_of_weights_plus_eps():
    bins = torch.tensor([[0.0, 1.0, 3.0, 4.0]], dtype=torch.float64)
    weights = torch.tensor([[1.0, 0.0, 3.0]], dtype=torch.float64)
    for eps in (1e-5, 0.25):
        drawn = sample_pdf(bins, weights, 7, deterministic=True, eps=eps)
        assert drawn.dtype == torch.float64
        expected = inverse_cdf(bins[0].numpy(), weights[0].numpy(), np.linspace(0, 1, 7), eps)
        np.testing.assert_allclose(drawn[0].numpy(), expected, rtol=1e-12, atol=1e-12)
    # Random quantiles by default, uniform draws in the cdf's dtype from the given generator.
    drawn = sample_pdf(bins, weights, 6, generator=torch.Generator().manual_seed(3))
    u = torch.rand(1, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(3)).numpy()[0]
    np.testing.assert_allclose(drawn[0].numpy(), inverse_cdf(bins[0].numpy(), weights[0].numpy(), u, 1e-5),
                               rtol=1e-12, atol=1e-12)


def test_sample_pdf_treats_a_bin_of_mass_eps_as_a_bin():
    # Two empty bins of mass eps = 0.5 each: the density is uniform over [0, 2].
    drawn = sample_pdf(torch.tensor([[0.0, 1.0, 2.0]]), torch.zeros(1, 2), 5, deterministic=True, eps=0.5)
    torch.testing.assert_close(drawn, torch.tensor([[0.0, 0.5, 1.0, 1.5, 2.0]]))


def test_sample_pdf_draws_on_the_bins_device():
    bins, weights = torch.zeros(2, 4, device="meta"), torch.zeros(2, 3, device="meta")
    for deterministic in (False, True):
        assert sample_pdf(bins, weights, 5, deterministic=deterministic).device.type == "meta"


def test_an_empty_ray_ends_at_the_farthest_depth():
    depths = torch.tensor([2.0, 2.5, 3.0, 4.0]).view(1, 1, 4, 1).expand(1, 2, 4, 1).contiguous()
    densities = torch.full((1, 2, 4, 1), -1000.0)  # softplus(-1001) is 0 in float32: nothing on the ray
    densities[0, 1] = 1000.0  # an opaque ray: its depth is its first interval's midpoint
    colors = torch.rand(1, 2, 4, 3)
    rgb, depth, weights = eg3d_ray_march(colors, densities, depths, {"clamp_mode": "softplus"})
    assert weights[0, 0].sum() == 0 and depth[0, 0, 0] == 4.0  # 0 / 0 -> inf, clamped to the farthest sample
    assert depth[0, 1, 0] == pytest.approx(2.25)
    assert torch.equal(rgb[0, 0], torch.full((3,), -1.0))  # black


@pytest.mark.parametrize("background", [0, 0.0, 1, 1.0])
def test_the_ends_of_the_background_range_are_allowed(background):
    depths = torch.tensor([2.0, 3.0]).view(1, 1, 2, 1)
    rgb, _, _ = eg3d_ray_march(torch.rand(1, 1, 2, 3), torch.full((1, 1, 2, 1), -1000.0), depths,
                               {"clamp_mode": "softplus", "background": background})
    assert torch.equal(rgb, torch.full((1, 1, 3), 2.0 * background - 1))


def test_refusals_name_the_input_and_the_shape_it_needs():
    colors, densities, depths = torch.rand(2, 3, 4, 5), torch.rand(2, 3, 4, 1), torch.rand(2, 3, 4, 1)
    with pytest.raises(ValueError, match=r"^eg3d_ray_march: options\['clamp_mode'\] must be 'softplus', got 'relu'$"):
        eg3d_ray_march(colors, densities, depths, {"clamp_mode": "relu"})
    bad = {"a sample more": torch.rand(2, 3, 5, 1), "another batch": torch.rand(1, 3, 4, 1),
           "a dimension more": torch.rand(2, 3, 4, 1, 1), "channels": torch.rand(2, 3, 4, 2)}
    for case, tensor in bad.items():
        for name in ("densities", "depths"):
            inputs = {"densities": densities, "depths": depths, name: tensor}
            message = "^" + re.escape(f"eg3d_ray_march: {name} must have shape (2, 3, 4, 1), got {tuple(tensor.shape)}")
            with pytest.raises(ValueError, match=message):
                eg3d_ray_march(colors, inputs["densities"], inputs["depths"], {"clamp_mode": "softplus"})
    with pytest.raises(ValueError, match=r"^eg3d_ray_march: give options\['white_back'\] or options\['background'\], "
                                         r"not both$"):
        eg3d_ray_march(colors, densities, depths, {"clamp_mode": "softplus", "white_back": True, "background": 0.5})


def test_the_backend_reaches_the_compositing_op():
    colors, densities = torch.rand(1, 2, 4, 3), torch.rand(1, 2, 4, 1)
    depths = torch.sort(torch.rand(1, 2, 4, 1), dim=2).values
    eg3d_ray_march(colors, densities, depths, {"clamp_mode": "softplus"}, backend="reference")
    with pytest.raises(ValueError, match="no-such-backend"):
        eg3d_ray_march(colors, densities, depths, {"clamp_mode": "softplus"}, backend="no-such-backend")
