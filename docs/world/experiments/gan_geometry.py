"""What shape a text-free 3D GAN learned (docs/notes/experiments.md, *The 3D GAN*): for seeds 0-15 at
truncation 0.7, how far its pictures and depth maps change between yaw -30 and +30 degrees (mean
|difference|, and after mirroring one view: ~0 for a symmetric head that turns in 3D), and along
the frontal view's middle column of rays how opaque it is and how spread its rendering weights are
(a solid head: opaque, weights within a few hundredths of a unit; a fog: neither). Writes
OUT.png: four seeds, each row of pictures over yaw -45..45 degrees followed by its depth (nearest
white over the ray range, so a flat card is one grey).

    python docs/world/experiments/gan_geometry.py [GAN_DIRECTORY] OUT   # default: the packaged 3D GAN
"""
import math
import sys

import torch
import torch.nn.functional as F

from dreamportrait.models import load_pretrained, view_cameras
from dreamportrait.models.cameras import camera_rays, split_camera_labels
from dreamportrait.outputs import depth_grey, grid, to_uint8, write_image
from dreamportrait.rendering import eg3d_ray_march
from dreamportrait.world.assets import asset_dir
from dreamportrait.world.evaluate import view_turn
from dreamportrait.world.heads import WORLD_CAMERAS

directory, out = (sys.argv[1], sys.argv[2]) if len(sys.argv) > 2 else (asset_dir("gan"), sys.argv[1])
torch.set_grad_enabled(False)
gan = load_pretrained(directory)[0].eval()
options = gan.rendering_kwargs
near, far = options["ray_start"], options["ray_end"]


def cameras(views: int, yaw_degrees: float):
    return view_cameras(views, math.radians(yaw_degrees), WORLD_CAMERAS["radius"], WORLD_CAMERAS["pivot"],
                        WORLD_CAMERAS["fov_degrees"])


def render(seed: int, views):
    z = torch.randn(1, gan.z_dim, generator=torch.Generator().manual_seed(seed))
    ws = gan.mapping(z, cameras(1, 0), truncation_psi=0.7).expand(len(views), -1, -1)
    return ws, gan.synthesis(ws, views, noise_mode="const", deterministic_sampling=True)


def ray_column(ws):
    """Opacity and weight spread along the frontal view's middle column, 96 evenly spaced samples."""
    origins, directions = camera_rays(*split_camera_labels(cameras(1, 0)), gan.neural_rendering_resolution)
    middle = torch.arange(gan.neural_rendering_resolution) * gan.neural_rendering_resolution + \
        gan.neural_rendering_resolution // 2
    origins, directions = origins[:, middle], directions[:, middle]
    depths = torch.linspace(near, far, 96).view(1, 1, 96, 1).expand(1, len(middle), 96, 1)
    points = (origins.unsqueeze(-2) + depths * directions.unsqueeze(-2)).reshape(1, -1, 3)
    decoded = gan.sample_mixed(points, ws[:1], noise_mode="const")
    _, _, weights = eg3d_ray_march(decoded["rgb"].view(1, len(middle), 96, -1), decoded["sigma"].view(1, len(middle), 96, 1),
                                   depths, options)
    weights = weights[0, ..., 0]
    mids = (depths[0, 0, 1:, 0] + depths[0, 0, :-1, 0]) / 2
    opacity = weights.sum(1)
    mean = (weights * mids).sum(1) / opacity.clamp_min(1e-6)
    spread = ((weights * (mids - mean[:, None]) ** 2).sum(1) / opacity.clamp_min(1e-6)).sqrt()
    solid = opacity > 0.5  # rays that hit something
    return opacity.mean().item(), (spread[solid].mean().item() if solid.any() else float("nan"))


seeds = range(16)
change = {key: [0.0, 0.0] for key in ("image", "image_raw", "image_depth")}
column = [0.0, 0.0]
for seed in seeds:
    ws, rendered = render(seed, cameras(4, 30))
    for key in change:
        difference, mirrored = view_turn(rendered[key])
        change[key][0] += difference / len(seeds)
        change[key][1] += mirrored / len(seeds)
    opacity, spread = ray_column(ws)
    column[0] += opacity / len(seeds)
    column[1] += spread / len(seeds)
for key, (difference, mirrored) in change.items():
    print(f"{key:12s} view change {difference:.3f}  mirror residual {mirrored:.3f}")
print(f"middle column: mean opacity {column[0]:.2f}, weight spread of the rays that hit {column[1]:.3f}")

rows = []
for seed in range(4):
    _, rendered = render(seed, cameras(5, 45))
    image = rendered["image"]
    rows += [image, depth_grey(F.interpolate(rendered["image_depth"], size=image.shape[-2:], mode="nearest"), near, far)]
write_image(f"{out}.png", to_uint8(grid(torch.cat(rows), 5)))
