"""EG3D's published formulation written out from its equations, independently of the package:
what tests compare the package's renderer pieces with."""

import torch
import torch.nn.functional as F

# EG3D's generate_planes(): each plane's three axis vectors; points project through the inverse.
EG3D_PLANE_AXES = torch.tensor([[[1, 0, 0], [0, 1, 0], [0, 0, 1]],
                                [[1, 0, 0], [0, 0, 1], [0, 1, 0]],
                                [[0, 0, 1], [1, 0, 0], [0, 1, 0]]], dtype=torch.float32)


def published_ray_march(colors, densities, depths, options):
    """EG3D's formulation (cumprod transmittance with its 1e-10 term), written from its equations."""
    deltas = depths[:, :, 1:] - depths[:, :, :-1]
    colors_mid = (colors[:, :, :-1] + colors[:, :, 1:]) / 2
    densities_mid = F.softplus((densities[:, :, :-1] + densities[:, :, 1:]) / 2 - 1)
    depths_mid = (depths[:, :, :-1] + depths[:, :, 1:]) / 2
    alpha = 1 - torch.exp(-densities_mid * deltas)
    shifted = torch.cat([torch.ones_like(alpha[:, :, :1]), 1 - alpha + 1e-10], -2)
    weights = alpha * torch.cumprod(shifted, -2)[:, :, :-1]
    rgb = (weights * colors_mid).sum(-2)
    total = weights.sum(2)
    depth = torch.nan_to_num((weights * depths_mid).sum(-2) / total, float("inf"))
    depth = torch.clamp(depth, depths.min(), depths.max())
    if options.get("white_back", False):
        rgb = rgb + 1 - total
    return rgb * 2 - 1, depth, weights


def eg3d_rays(c, resolution):
    cam2world, intrinsics = c[:, :16].view(-1, 4, 4), c[:, 16:25].view(-1, 3, 3)
    batch = c.shape[0]
    uv = torch.stack(torch.meshgrid(torch.arange(resolution, dtype=torch.float32),
                                    torch.arange(resolution, dtype=torch.float32), indexing="ij")) / resolution + 0.5 / resolution
    uv = uv.flip(0).reshape(2, -1).transpose(1, 0).unsqueeze(0).repeat(batch, 1, 1)
    x_cam, y_cam = uv[..., 0], uv[..., 1]
    fx, fy, cx, cy, sk = (intrinsics[:, i, j, None] for i, j in ((0, 0), (1, 1), (0, 2), (1, 2), (0, 1)))
    x_lift = (x_cam - cx + cy * sk / fy - sk * y_cam / fy) / fx
    y_lift = (y_cam - cy) / fy
    points = torch.stack((x_lift, y_lift, torch.ones_like(x_lift), torch.ones_like(x_lift)), dim=-1)
    world = torch.bmm(cam2world, points.permute(0, 2, 1)).permute(0, 2, 1)[:, :, :3]
    directions = F.normalize(world - cam2world[:, None, :3, 3], dim=2)
    return cam2world[:, None, :3, 3].repeat(1, directions.shape[1], 1), directions


def eg3d_decode(generator, planes, points, box_warp):
    batch, _, channels, height, width = planes.shape
    projected = (2 / box_warp * points)[:, None] @ torch.linalg.inv(EG3D_PLANE_AXES)  # (N, 3, M, 3)
    sampled = F.grid_sample(planes.reshape(batch * 3, channels, height, width),
                            projected[..., :2].reshape(batch * 3, 1, -1, 2), align_corners=False)
    features = sampled.reshape(batch, 3, channels, -1).permute(0, 1, 3, 2).mean(1)
    x = generator.decoder.net(features.reshape(-1, channels)).reshape(batch, features.shape[1], -1)
    return torch.sigmoid(x[..., 1:]) * 1.002 - 0.001, x[..., :1]
