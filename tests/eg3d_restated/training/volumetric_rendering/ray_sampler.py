"""EG3D's ray sampler: one ray per pixel centre of a ``resolution``² image, from the camera's
position through the pixel lifted with the intrinsics (OpenCV convention), directions normalised."""

import torch


class RaySampler(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.ray_origins_h = self.ray_directions = self.depths = self.image_coords = self.rendering_options = None

    def forward(self, cam2world_matrix, intrinsics, resolution):
        batch, count = cam2world_matrix.shape[0], resolution ** 2
        device = cam2world_matrix.device
        origin = cam2world_matrix[:, :3, 3]
        fx, fy = intrinsics[:, 0, 0, None], intrinsics[:, 1, 1, None]
        cx, cy, skew = intrinsics[:, 0, 2, None], intrinsics[:, 1, 2, None], intrinsics[:, 0, 1, None]
        grid = torch.arange(resolution, dtype=torch.float32, device=device)
        uv = torch.stack(torch.meshgrid(grid, grid, indexing="ij")) * (1.0 / resolution) + 0.5 / resolution
        uv = uv.flip(0).reshape(2, -1).transpose(1, 0).unsqueeze(0).repeat(batch, 1, 1)
        x_cam, y_cam = uv[:, :, 0].view(batch, -1), uv[:, :, 1].view(batch, -1)
        z_cam = torch.ones((batch, count), device=device)
        x_lift = (x_cam - cx + cy * skew / fy - skew * y_cam / fy) / fx * z_cam
        y_lift = (y_cam - cy) / fy * z_cam
        camera_points = torch.stack((x_lift, y_lift, z_cam, torch.ones_like(z_cam)), dim=-1)
        world_points = torch.bmm(cam2world_matrix, camera_points.permute(0, 2, 1)).permute(0, 2, 1)[:, :, :3]
        directions = torch.nn.functional.normalize(world_points - origin[:, None, :], dim=2)
        return origin.unsqueeze(1).repeat(1, directions.shape[1], 1), directions
