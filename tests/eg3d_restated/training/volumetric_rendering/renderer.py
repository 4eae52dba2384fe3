"""EG3D's importance renderer, re-stated.

Tri-plane sampling: a point is scaled by ``2 / box_warp`` and expressed in each plane's basis
(multiplied by the inverse of the plane's 3x3 axes matrix); the first two coordinates sample that
plane with ``grid_sample`` (bilinear, zero padding, ``align_corners=False``). The renderer samples
each ray at stratified depths (``torch.rand_like`` jitter), decodes, composites with the ray
marcher, draws ``depth_resolution_importance`` more depths by inverse-CDF sampling of the smoothed
coarse weights (``torch.rand``), decodes those, merges both sets sorted by depth and composites
again. ``ray_start = ray_end = 'auto'`` (ray-box limits) is not re-stated.
"""

import torch
from training.volumetric_rendering.ray_marcher import MipRayMarcher2


def generate_planes():
    """Each plane's three axis vectors (rows): (x, y, z), (x, z, y), (z, x, y)."""
    return torch.tensor([[[1, 0, 0], [0, 1, 0], [0, 0, 1]],
                         [[1, 0, 0], [0, 0, 1], [0, 1, 0]],
                         [[0, 0, 1], [1, 0, 0], [0, 1, 0]]], dtype=torch.float32)


def project_onto_planes(planes, coordinates):
    """(n_planes, 3, 3) axes, (N, M, 3) points -> (N * n_planes, M, 2) in-plane coordinates."""
    batch, count, _ = coordinates.shape
    n_planes = planes.shape[0]
    points = coordinates.unsqueeze(1).expand(-1, n_planes, -1, -1).reshape(batch * n_planes, count, 3)
    inverse = torch.linalg.inv(planes).unsqueeze(0).expand(batch, -1, -1, -1).reshape(batch * n_planes, 3, 3)
    return torch.bmm(points, inverse)[..., :2]


def sample_from_planes(plane_axes, plane_features, coordinates, mode="bilinear", padding_mode="zeros", box_warp=None):
    assert padding_mode == "zeros"
    batch, n_planes, channels, height, width = plane_features.shape
    count = coordinates.shape[1]
    flat = plane_features.view(batch * n_planes, channels, height, width)
    projected = project_onto_planes(plane_axes, (2 / box_warp) * coordinates).unsqueeze(1)
    sampled = torch.nn.functional.grid_sample(flat, projected.float(), mode=mode, padding_mode=padding_mode,
                                              align_corners=False)
    return sampled.permute(0, 3, 2, 1).reshape(batch, n_planes, count, channels)


class ImportanceRenderer(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.ray_marcher = MipRayMarcher2()
        self.plane_axes = generate_planes()

    def forward(self, planes, decoder, ray_origins, ray_directions, rendering_options):
        self.plane_axes = self.plane_axes.to(ray_origins.device)
        if rendering_options["ray_start"] == rendering_options["ray_end"] == "auto":
            raise NotImplementedError("ray-box limits are not part of this re-statement")
        depths = self.sample_stratified(ray_origins, rendering_options["ray_start"], rendering_options["ray_end"],
                                        rendering_options["depth_resolution"],
                                        rendering_options["disparity_space_sampling"])
        batch, rays, samples, _ = depths.shape
        points = (ray_origins.unsqueeze(-2) + depths * ray_directions.unsqueeze(-2)).reshape(batch, -1, 3)
        directions = ray_directions.unsqueeze(-2).expand(-1, -1, samples, -1).reshape(batch, -1, 3)
        out = self.run_model(planes, decoder, points, directions, rendering_options)
        colors = out["rgb"].reshape(batch, rays, samples, out["rgb"].shape[-1])
        densities = out["sigma"].reshape(batch, rays, samples, 1)
        fine = rendering_options["depth_resolution_importance"]
        if fine > 0:
            _, _, weights = self.ray_marcher(colors, densities, depths, rendering_options)
            fine_depths = self.sample_importance(depths, weights, fine)
            directions = ray_directions.unsqueeze(-2).expand(-1, -1, fine, -1).reshape(batch, -1, 3)
            points = (ray_origins.unsqueeze(-2) + fine_depths * ray_directions.unsqueeze(-2)).reshape(batch, -1, 3)
            out = self.run_model(planes, decoder, points, directions, rendering_options)
            fine_colors = out["rgb"].reshape(batch, rays, fine, out["rgb"].shape[-1])
            fine_densities = out["sigma"].reshape(batch, rays, fine, 1)
            depths, colors, densities = self.unify_samples(depths, colors, densities,
                                                           fine_depths, fine_colors, fine_densities)
        rgb, depth, weights = self.ray_marcher(colors, densities, depths, rendering_options)
        return rgb, depth, weights.sum(2)

    def run_model(self, planes, decoder, sample_coordinates, sample_directions, options):
        features = sample_from_planes(self.plane_axes, planes, sample_coordinates, padding_mode="zeros",
                                      box_warp=options["box_warp"])
        out = decoder(features, sample_directions)
        if options.get("density_noise", 0) > 0:
            out["sigma"] += torch.randn_like(out["sigma"]) * options["density_noise"]
        return out

    def sort_samples(self, all_depths, all_colors, all_densities):
        _, order = torch.sort(all_depths, dim=-2)
        return (torch.gather(all_depths, -2, order),
                torch.gather(all_colors, -2, order.expand(-1, -1, -1, all_colors.shape[-1])),
                torch.gather(all_densities, -2, order.expand(-1, -1, -1, 1)))

    def unify_samples(self, depths1, colors1, densities1, depths2, colors2, densities2):
        return self.sort_samples(torch.cat([depths1, depths2], dim=-2), torch.cat([colors1, colors2], dim=-2),
                                 torch.cat([densities1, densities2], dim=-2))

    def sample_stratified(self, ray_origins, ray_start, ray_end, depth_resolution, disparity_space_sampling=False):
        batch, rays, _ = ray_origins.shape
        if disparity_space_sampling:
            depths = torch.linspace(0, 1, depth_resolution, device=ray_origins.device)
            depths = depths.reshape(1, 1, depth_resolution, 1).repeat(batch, rays, 1, 1)
            depths += torch.rand_like(depths) * (1 / (depth_resolution - 1))
            return 1.0 / (1.0 / ray_start * (1.0 - depths) + 1.0 / ray_end * depths)
        if isinstance(ray_start, torch.Tensor):
            raise NotImplementedError("per-ray limits are not part of this re-statement")
        depths = torch.linspace(ray_start, ray_end, depth_resolution, device=ray_origins.device)
        depths = depths.reshape(1, 1, depth_resolution, 1).repeat(batch, rays, 1, 1)
        depths += torch.rand_like(depths) * ((ray_end - ray_start) / (depth_resolution - 1))
        return depths

    def sample_importance(self, z_vals, weights, N_importance):
        with torch.no_grad():
            batch, rays, samples, _ = z_vals.shape
            z_vals = z_vals.reshape(batch * rays, samples)
            weights = weights.reshape(batch * rays, -1)
            weights = torch.nn.functional.max_pool1d(weights.unsqueeze(1).float(), 2, 1, padding=1)
            weights = torch.nn.functional.avg_pool1d(weights, 2, 1).squeeze() + 0.01
            midpoints = 0.5 * (z_vals[:, :-1] + z_vals[:, 1:])
            drawn = self.sample_pdf(midpoints, weights[:, 1:-1], N_importance)
            return drawn.detach().reshape(batch, rays, N_importance, 1)

    def sample_pdf(self, bins, weights, N_importance, det=False, eps=1e-5):
        rows, bin_count = weights.shape
        weights = weights + eps
        cdf = torch.cumsum(weights / torch.sum(weights, -1, keepdim=True), -1)
        cdf = torch.cat([torch.zeros_like(cdf[:, :1]), cdf], -1)
        if det:
            u = torch.linspace(0, 1, N_importance, device=bins.device).expand(rows, N_importance)
        else:
            u = torch.rand(rows, N_importance, device=bins.device)
        u = u.contiguous()
        index = torch.searchsorted(cdf, u, right=True)
        around = torch.stack([torch.clamp_min(index - 1, 0), torch.clamp_max(index, bin_count)], -1)
        around = around.view(rows, 2 * N_importance)
        cdf_pair = torch.gather(cdf, 1, around).view(rows, N_importance, 2)
        bins_pair = torch.gather(bins, 1, around).view(rows, N_importance, 2)
        span = cdf_pair[..., 1] - cdf_pair[..., 0]
        span[span < eps] = 1
        return bins_pair[..., 0] + (u - cdf_pair[..., 0]) / span * (bins_pair[..., 1] - bins_pair[..., 0])
