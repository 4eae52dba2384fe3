"""EG3D's ray marcher (``MipRayMarcher2``): composites per-sample colours and densities.

Adjacent samples form intervals with midpoint colour, density and depth; the density passes
through ``softplus(x - 1)``; ``alpha = 1 - exp(-sigma * delta)`` and the weights are ``alpha``
times the running product of ``1 - alpha + 1e-10`` over the earlier intervals. The depth is the
weighted mean depth (NaN -> inf) clamped to the range of all depths; ``white_back`` adds the
missing opacity to the colour, which is finally mapped to [-1, 1].
"""

import torch
import torch.nn.functional as F


class MipRayMarcher2(torch.nn.Module):
    def __init__(self):
        super().__init__()

    def run_forward(self, colors, densities, depths, rendering_options):
        deltas = depths[:, :, 1:] - depths[:, :, :-1]
        mid_colors = (colors[:, :, :-1] + colors[:, :, 1:]) / 2
        mid_densities = (densities[:, :, :-1] + densities[:, :, 1:]) / 2
        mid_depths = (depths[:, :, :-1] + depths[:, :, 1:]) / 2
        if rendering_options["clamp_mode"] != "softplus":
            raise AssertionError("MipRayMarcher only supports `clamp_mode`=`softplus`!")
        mid_densities = F.softplus(mid_densities - 1)
        alpha = 1 - torch.exp(-(mid_densities * deltas))
        passed = torch.cat([torch.ones_like(alpha[:, :, :1]), 1 - alpha + 1e-10], -2)
        weights = alpha * torch.cumprod(passed, -2)[:, :, :-1]
        rgb = torch.sum(weights * mid_colors, -2)
        opacity = weights.sum(2)
        depth = torch.sum(weights * mid_depths, -2) / opacity
        depth = torch.clamp(torch.nan_to_num(depth, float("inf")), torch.min(depths), torch.max(depths))
        if rendering_options.get("white_back", False):
            rgb = rgb + 1 - opacity
        return rgb * 2 - 1, depth, weights

    def forward(self, colors, densities, depths, rendering_options):
        rgb, depth, weights = self.run_forward(colors, densities, depths, rendering_options)
        return rgb, depth, weights
