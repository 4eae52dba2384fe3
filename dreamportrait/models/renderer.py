"""EG3D's neural renderer on DreamPortrait's ops: the OSG decoder and the two-pass importance renderer.

Every sample is decoded from the mean of its three tri-plane features (``sample_and_decode``, which
samples, averages and runs the decoder's MLP in one op; a decoder of another structure, or one with
hooks, gets ``triplane_sample``'s features); the
coarse pass (stratified depths) and the fine pass (depths drawn where the coarse pass put its
weight) are merged and composited with ``eg3d_ray_march`` (``composite_rays``).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor, nn

from ..integrations._eg3d_fused import effective_weights, osg_decoder_layers
from ..ops import EG3D_AXES, ORTHOGONAL_AXES, sample_and_decode, triplane_sample
from ..rendering import eg3d_ray_march, importance_depths, merge_samples, stratified_depths
from .layers import FullyConnectedLayer

FUSED_DTYPES = (torch.float32, torch.float64)

TRIPLANE_AXES = {"eg3d": EG3D_AXES, "orthogonal": ORTHOGONAL_AXES}
"""``rendering_kwargs['triplane_axes']``: EG3D's projections (default; what its weights need) or three
distinct planes for new models."""


class OSGDecoder(nn.Module):
    """Tri-plane features ``(N, M, C)`` -> raw density ``sigma`` ``(N, M, 1)`` and ``rgb`` ``(N, M,
    output_dim)``: FC(C, 64), softplus, FC(64, 1 + output_dim); colours through MipNeRF's widened
    sigmoid ``sigmoid(x) * 1.002 - 0.001``."""

    def __init__(self, n_features: int, options: Mapping):
        super().__init__()
        self.hidden_dim = 64
        lr_multiplier = options["decoder_lr_mul"]
        self.net = nn.Sequential(
            FullyConnectedLayer(n_features, self.hidden_dim, lr_multiplier=lr_multiplier),
            nn.Softplus(),
            FullyConnectedLayer(self.hidden_dim, 1 + options["decoder_output_dim"], lr_multiplier=lr_multiplier),
        )

    def forward(self, features: Tensor) -> dict[str, Tensor]:
        batch, points, channels = features.shape
        x = self.net(features.reshape(batch * points, channels)).reshape(batch, points, -1)
        return {"rgb": torch.sigmoid(x[..., 1:]) * (1 + 2 * 0.001) - 0.001, "sigma": x[..., 0:1]}


def triplane_axes(options: Mapping) -> tuple[int, ...]:
    name = options.get("triplane_axes", "eg3d")
    if name not in TRIPLANE_AXES:
        raise ValueError(f"rendering_kwargs['triplane_axes'] must be one of {sorted(TRIPLANE_AXES)}, got {name!r}")
    return TRIPLANE_AXES[name]


def density_prior(points: Tensor, prior: Mapping) -> Tensor:
    """A ball of density added to the decoder's raw density at ``points`` ``(N, M, 3)`` -> ``(N, M, 1)``:
    ``strength * (1 - |p| / radius)``, positive inside the ball around the origin, negative outside.

    Ours, not EG3D's (``rendering_kwargs["density_prior"] = {"radius": r, "strength": s}``): a
    generator whose density starts as a solid ball is rendered as a 3D object from the first step,
    where one starting from the decoder's near-uniform density can settle on a fog or a flat card
    that a low-resolution discriminator does not reject (docs/notes/experiments.md, *The 3D GAN*)."""
    radius, strength = prior.get("radius"), prior.get("strength")
    for name, value in (("radius", radius), ("strength", strength)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
            raise ValueError(f"rendering_kwargs['density_prior']['{name}'] must be a positive number, got {value!r}")
    return strength * (1 - points.norm(dim=-1, keepdim=True) / radius)


class ImportanceRenderer(nn.Module):
    """Renders rays through tri-planes with a decoder (EG3D's ``ImportanceRenderer``).

    ``backend`` selects the ops' implementation (None: by device; ``"reference"`` for the
    pure-PyTorch specification). Rendering options (EG3D's ``rendering_kwargs``): ``ray_start``,
    ``ray_end``, ``depth_resolution``, ``depth_resolution_importance``, ``box_warp``,
    ``disparity_space_sampling``, ``clamp_mode``, ``white_back`` (or our ``background``), ``density_noise``,
    ``triplane_axes``, ``deterministic_sampling`` (evenly spaced coarse depths and evenly
    spaced quantiles for the fine pass: the same image every call) and our ``density_prior``
    (:func:`density_prior`).
    """

    def __init__(self, backend: str | None = None):
        super().__init__()
        self.backend = backend

    def forward(self, planes: Tensor, decoder: nn.Module, ray_origins: Tensor, ray_directions: Tensor,
                options: Mapping) -> tuple[Tensor, Tensor, Tensor]:
        """planes ``(N, 3, C, H, W)``, rays ``(N, R, 3)`` -> features ``(N, R, output_dim)``, depth ``(N, R,
        1)`` and opacity ``(N, R, 1)``."""
        if options["ray_start"] == "auto" or options["ray_end"] == "auto":
            raise ValueError("rendering_kwargs: ray_start/ray_end 'auto' (ray-box limits) is not supported; "
                             "give numbers")
        deterministic = bool(options.get("deterministic_sampling", False))
        batch, rays, _ = ray_origins.shape
        depths = stratified_depths(batch, rays, options["ray_start"], options["ray_end"], options["depth_resolution"],
                                   jitter=not deterministic, disparity_space=options.get("disparity_space_sampling", False),
                                   device=ray_origins.device, dtype=ray_origins.dtype)
        colors, densities = self._decode_along_rays(planes, decoder, ray_origins, ray_directions, depths, options)
        if options["depth_resolution_importance"] > 0:
            _, _, weights = eg3d_ray_march(colors, densities, depths, options, backend=self.backend)
            fine_depths = importance_depths(depths, weights, options["depth_resolution_importance"],
                                            deterministic=deterministic)
            fine_colors, fine_densities = self._decode_along_rays(planes, decoder, ray_origins, ray_directions,
                                                                  fine_depths, options)
            depths, colors, densities = merge_samples(depths, colors, densities, fine_depths, fine_colors, fine_densities)
        rgb, depth, weights = eg3d_ray_march(colors, densities, depths, options, backend=self.backend)
        return rgb, depth, weights.sum(2)

    def run_model(self, planes: Tensor, decoder: nn.Module, points: Tensor, options: Mapping) -> dict[str, Tensor]:
        """Decode the tri-planes at ``points`` ``(N, M, 3)``: ``{"rgb": (N, M, ·), "sigma": (N, M, 1)}``."""
        layers = osg_decoder_layers(decoder, planes.shape[2]) if planes.dtype in FUSED_DTYPES else None
        if layers is not None:  # sampled, averaged and decoded in one op
            (weight1, bias1), (weight2, bias2) = (effective_weights(layer, planes.dtype) for layer in layers)
            decoded = sample_and_decode(planes, points, options["box_warp"], weight1, bias1, weight2, bias2,
                                        triplane_axes(options), backend=self.backend)
            out = {"rgb": decoded[..., 1:], "sigma": decoded[..., 0:1]}
        else:
            features = triplane_sample(planes, points, options["box_warp"], triplane_axes(options), "mean",
                                       backend=self.backend)
            out = decoder(features)
        if options.get("density_prior") is not None:
            out["sigma"] = out["sigma"] + density_prior(points, options["density_prior"])
        if options.get("density_noise", 0) > 0:
            out["sigma"] = out["sigma"] + torch.randn_like(out["sigma"]) * options["density_noise"]
        return out

    def _decode_along_rays(self, planes, decoder, origins, directions, depths, options) -> tuple[Tensor, Tensor]:
        batch, rays, samples, _ = depths.shape
        points = (origins.unsqueeze(-2) + depths * directions.unsqueeze(-2)).reshape(batch, rays * samples, 3)
        out = self.run_model(planes, decoder, points, options)
        return out["rgb"].reshape(batch, rays, samples, -1), out["sigma"].reshape(batch, rays, samples, 1)
