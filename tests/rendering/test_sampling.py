"""Stratified and importance sampling, and merging sample sets."""

import pytest
import torch

from dreamportrait.rendering import eg3d_ray_march, importance_depths, merge_samples, sample_pdf, stratified_depths


def test_stratified_depths_cover_the_range_in_order():
    depths = stratified_depths(2, 100, 2.25, 3.3, 48)
    assert depths.shape == (2, 100, 48, 1)
    spacing = (3.3 - 2.25) / 47
    grid = torch.linspace(2.25, 3.3, 48).reshape(1, 1, 48, 1)
    offset = depths - grid
    assert (offset >= 0).all() and (offset <= spacing + 1e-6).all()
    assert offset.std() > spacing / 5, "jitter should move samples"
    torch.testing.assert_close(stratified_depths(2, 100, 2.25, 3.3, 48, jitter=False), grid.expand(2, 100, 48, 1))


def test_stratified_depths_per_ray_bounds_and_disparity():
    start = torch.rand(1, 6, 1) + 1
    end = start + torch.rand(1, 6, 1) + 0.5
    depths = stratified_depths(1, 6, start, end, 9, jitter=False, disparity_space=True)
    torch.testing.assert_close(depths[:, :, 0], start)
    torch.testing.assert_close(depths[:, :, -1], end)
    disparity = 1 / depths
    torch.testing.assert_close(disparity.diff(dim=2), disparity.diff(dim=2)[:, :, :1].expand_as(disparity.diff(dim=2)))


def test_sample_pdf_follows_the_weights():
    bins = torch.linspace(0, 10, 11).expand(4, 11)
    weights = torch.full((4, 10), 1e-3)
    weights[:, 7] = 1.0  # nearly all mass in [7, 8]
    drawn = sample_pdf(bins, weights, 2000)
    assert drawn.shape == (4, 2000)
    assert ((drawn >= 7) & (drawn <= 8)).float().mean() > 0.95
    assert (drawn >= 0).all() and (drawn <= 10).all()
    quantiles = sample_pdf(bins, torch.ones(4, 10), 11, deterministic=True)
    torch.testing.assert_close(quantiles, bins, atol=1e-4, rtol=0)  # uniform mass: quantiles = bin edges


def test_importance_depths_concentrate_where_the_coarse_pass_hit():
    batch, rays, samples = 1, 64, 48
    depths = stratified_depths(batch, rays, 2.0, 4.0, samples, jitter=False)
    densities = torch.full((batch, rays, samples, 1), -30.0)
    densities[:, :, 30:] = 40.0  # a surface at depth ~3.28
    colors = torch.rand(batch, rays, samples, 3)
    _, _, weights = eg3d_ray_march(colors, densities, depths, {"clamp_mode": "softplus"})
    fine = importance_depths(depths, weights, 48)
    assert fine.shape == (batch, rays, 48, 1) and not fine.requires_grad
    surface = depths[0, 0, 29:31, 0]
    near_surface = ((fine >= surface[0] - 0.05) & (fine <= surface[1] + 0.05)).float().mean()
    assert near_surface > 0.5
    assert (fine >= depths.min()).all() and (fine <= depths.max()).all()
    torch.testing.assert_close(
        importance_depths(depths, weights, 16, deterministic=True), importance_depths(depths, weights, 16, deterministic=True)
    )


def test_merge_samples_sorts_everything_by_depth():
    depths_a, depths_b = torch.rand(2, 5, 7, 1), torch.rand(2, 5, 4, 1)
    colors_a, colors_b = depths_a.expand(-1, -1, -1, 3) * 2, depths_b.expand(-1, -1, -1, 3) * 2
    densities_a, densities_b = -depths_a, -depths_b
    depths, colors, densities = merge_samples(depths_a, colors_a, densities_a, depths_b, colors_b, densities_b)
    assert depths.shape == (2, 5, 11, 1) and colors.shape == (2, 5, 11, 3)
    assert (depths.diff(dim=2) >= 0).all()
    torch.testing.assert_close(colors, depths.expand(-1, -1, -1, 3) * 2)  # colours moved with their depths
    torch.testing.assert_close(densities, -depths)
    torch.testing.assert_close(depths.sort(dim=2).values, torch.cat([depths_a, depths_b], 2).sort(dim=2).values)


def test_stratified_needs_two_samples():
    with pytest.raises(ValueError, match="samples must be at least 2"):
        stratified_depths(1, 1, 0.0, 1.0, 1)
