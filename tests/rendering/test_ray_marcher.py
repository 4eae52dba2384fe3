"""eg3d_ray_march against EG3D's published MipRayMarcher2 formulation."""

import pytest
import torch
from eg3d_formulation import published_ray_march
from support import kernel_backends

from dreamportrait.rendering import eg3d_ray_march


def make_samples(batch=2, rays=50, samples=24, channels=32, dtype=torch.float64, device="cpu"):
    colors = torch.rand(batch, rays, samples, channels, dtype=dtype, device=device)
    densities = torch.randn(batch, rays, samples, 1, dtype=dtype, device=device) * 4
    depths = torch.sort(torch.rand(batch, rays, samples, 1, dtype=dtype, device=device) + 2.25, dim=2).values
    return colors, densities, depths


@pytest.mark.parametrize("backend,device", [pytest.param("reference", "cpu", id="reference"), *kernel_backends()])
@pytest.mark.parametrize("white_back", [False, True])
def test_matches_published_formulation(backend, device, white_back):
    colors, densities, depths = make_samples(device=device)
    densities[0, :5] = -20  # nearly empty rays: total weight ~0, depth falls back to the clamp
    options = {"clamp_mode": "softplus", "white_back": white_back}
    ours = eg3d_ray_march(colors, densities, depths, options, backend=backend)
    theirs = published_ray_march(colors, densities, depths, options)
    for a, b in zip(ours, theirs):
        assert a.shape == b.shape
        torch.testing.assert_close(a, b, rtol=1e-7, atol=1e-8)  # the 1e-10 term, summed over samples


def test_background_fills_what_the_rays_leave_empty():
    colors, densities, depths = make_samples()
    densities[0, :5] = -20  # nearly empty rays show the background alone
    background = torch.rand(()).item()
    rgb, depth, weights = eg3d_ray_march(colors, densities, depths, {"clamp_mode": "softplus", "background": background})
    rgb_black, depth_black, weights_black = published_ray_march(colors, densities, depths, {"clamp_mode": "softplus"})
    torch.testing.assert_close(rgb, rgb_black + 2 * background * (1 - weights_black.sum(2)), rtol=1e-7, atol=1e-8)
    torch.testing.assert_close(depth, depth_black, rtol=1e-7, atol=1e-8)
    torch.testing.assert_close(weights, weights_black, rtol=1e-7, atol=1e-8)
    torch.testing.assert_close(rgb[0, :5], torch.full_like(rgb[0, :5], 2 * background - 1), rtol=0, atol=1e-6)


@pytest.mark.parametrize("options,message", [
    ({"background": 0.5, "white_back": True}, "not both"),
    ({"background": 1.5}, r"background'\] must be a number in \[0, 1\], got 1.5"),
    ({"background": True}, "must be a number"),
    ({"background": "grey"}, "must be a number"),
])
def test_rejects_bad_backgrounds(options, message):
    colors, densities, depths = make_samples(batch=1, rays=2, samples=4, channels=3)
    with pytest.raises(ValueError, match=message):
        eg3d_ray_march(colors, densities, depths, {"clamp_mode": "softplus", **options})


def test_gradients_match_published_formulation():
    colors, densities, depths = make_samples(batch=1, rays=8, samples=10, channels=3)
    options = {"clamp_mode": "softplus"}
    inputs_a = [x.clone().requires_grad_() for x in (colors, densities)]
    inputs_b = [x.clone().requires_grad_() for x in (colors, densities)]
    rgb, depth, weights = eg3d_ray_march(*inputs_a, depths, options)
    rgb_p, depth_p, weights_p = published_ray_march(*inputs_b, depths, options)
    (rgb.square().sum() + depth.sum() + weights.square().sum()).backward()
    (rgb_p.square().sum() + depth_p.sum() + weights_p.square().sum()).backward()
    for a, b in zip(inputs_a, inputs_b):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-6, atol=1e-8)
    assert torch.autograd.gradcheck(
        lambda c, s: eg3d_ray_march(c, s, depths, options)[0], [x.detach().requires_grad_() for x in inputs_a]
    )


def test_rejects_other_clamp_modes_and_bad_shapes():
    colors, densities, depths = make_samples(batch=1, rays=2, samples=4, channels=3)
    with pytest.raises(ValueError, match="clamp_mode"):
        eg3d_ray_march(colors, densities, depths, {"clamp_mode": "relu"})
    with pytest.raises(ValueError, match="densities must have shape"):
        eg3d_ray_march(colors, densities[..., 0], depths, {"clamp_mode": "softplus"})
