"""EG3D's tri-plane generator: StyleGAN2 backbone -> three feature planes -> neural rendering ->
super-resolution."""

from __future__ import annotations

import copy
from collections.abc import Mapping

from torch import Tensor, nn

from .cameras import check_camera_labels, camera_rays, split_camera_labels
from .renderer import ImportanceRenderer, OSGDecoder
from .stylegan2 import BlockHook, StyleGAN2Backbone, check_noise_mode
from .superresolution import superresolution_class

PLANE_CHANNELS = 32


class TriPlaneGenerator(nn.Module):
    """``G(z, c)`` -> ``{"image", "image_raw", "image_depth"}``, with EG3D's constructor arguments,
    parameter names and results.

    Args (EG3D's): z_dim, c_dim (25 for camera labels), w_dim, img_resolution (final image),
        img_channels (3), sr_num_fp16_res, mapping_kwargs, rendering_kwargs (see
        :class:`~dreamportrait.models.renderer.ImportanceRenderer`, plus ``superresolution_module``,
        ``sr_antialias``, ``superresolution_noise_mode``, ``c_gen_conditioning_zero``, ``c_scale``,
        ``decoder_lr_mul``), sr_kwargs, and synthesis kwargs (channel_base, channel_max,
        num_fp16_res, conv_clamp, ...).
    Added here: ``neural_rendering_resolution`` (EG3D sets the attribute after construction),
        ``triplane_resolution`` (EG3D: always 256) and ``backend`` for the rendering ops.

    The tri-plane image is ``(N, 96, triplane_resolution, triplane_resolution)``, viewed as three
    32-channel planes.
    """

    def __init__(self, z_dim: int, c_dim: int, w_dim: int, img_resolution: int, img_channels: int,
                 sr_num_fp16_res: int = 0, mapping_kwargs: Mapping | None = None,
                 rendering_kwargs: Mapping | None = None, sr_kwargs: Mapping | None = None,
                 neural_rendering_resolution: int = 64, triplane_resolution: int = 256, backend: str | None = None,
                 **synthesis_kwargs):
        if img_channels != 3:
            raise ValueError(f"TriPlaneGenerator: img_channels must be 3, got {img_channels}")
        super().__init__()
        rendering_kwargs = copy.deepcopy(dict(rendering_kwargs or {}))
        self.init_kwargs = copy.deepcopy(dict(
            z_dim=z_dim, c_dim=c_dim, w_dim=w_dim, img_resolution=img_resolution, img_channels=img_channels,
            sr_num_fp16_res=sr_num_fp16_res, mapping_kwargs=dict(mapping_kwargs or {}), rendering_kwargs=rendering_kwargs,
            sr_kwargs=dict(sr_kwargs or {}), neural_rendering_resolution=neural_rendering_resolution,
            triplane_resolution=triplane_resolution, **synthesis_kwargs))
        """The constructor's arguments (without ``backend``): what a saved checkpoint records."""
        missing = [key for key in ("superresolution_module", "sr_antialias", "ray_start", "ray_end", "box_warp",
                                   "depth_resolution", "depth_resolution_importance", "clamp_mode")
                   if key not in rendering_kwargs]
        if missing:
            raise ValueError(f"TriPlaneGenerator: rendering_kwargs is missing {', '.join(missing)}")
        self.z_dim, self.c_dim, self.w_dim = z_dim, c_dim, w_dim
        self.img_resolution, self.img_channels = img_resolution, img_channels
        self.renderer = ImportanceRenderer(backend)
        self.backbone = StyleGAN2Backbone(z_dim, c_dim, w_dim, img_resolution=triplane_resolution,
                                          img_channels=3 * PLANE_CHANNELS, mapping_kwargs=dict(mapping_kwargs or {}),
                                          **synthesis_kwargs)
        sr_class = superresolution_class(rendering_kwargs["superresolution_module"])
        self.superresolution = sr_class(channels=PLANE_CHANNELS, img_resolution=img_resolution,
                                        sr_num_fp16_res=sr_num_fp16_res, sr_antialias=rendering_kwargs["sr_antialias"],
                                        w_dim=w_dim, **dict(sr_kwargs or {}))
        self.decoder = OSGDecoder(PLANE_CHANNELS, {"decoder_lr_mul": rendering_kwargs.get("decoder_lr_mul", 1),
                                                   "decoder_output_dim": PLANE_CHANNELS})
        self.neural_rendering_resolution = neural_rendering_resolution
        self.rendering_kwargs = rendering_kwargs

    @property
    def num_ws(self) -> int:
        return self.backbone.num_ws

    def mapping(self, z: Tensor, c: Tensor, truncation_psi: float = 1.0, truncation_cutoff: int | None = None,
                update_emas: bool = False) -> Tensor:
        """z ``(N, z_dim)``, camera labels c ``(N, 25)`` -> ws ``(N, num_ws, w_dim)``."""
        check_camera_labels("c", c, z.shape[0] if isinstance(z, Tensor) and z.dim() == 2 else None)
        if self.rendering_kwargs.get("c_gen_conditioning_zero", False):
            c = c.new_zeros(c.shape)
        return self.backbone.mapping(z, c * self.rendering_kwargs.get("c_scale", 0), truncation_psi=truncation_psi,
                                     truncation_cutoff=truncation_cutoff, update_emas=update_emas)

    def planes(self, ws: Tensor, noise_mode: str = "random", block_hook: BlockHook | None = None) -> Tensor:
        """ws -> tri-planes ``(N, 3, 32, H, W)``; ``block_hook``: see :class:`SynthesisNetwork`."""
        planes = self.backbone.synthesis(ws, noise_mode=noise_mode, block_hook=block_hook)
        return planes.view(len(planes), 3, PLANE_CHANNELS, planes.shape[-2], planes.shape[-1])

    def synthesis(self, ws: Tensor, c: Tensor, neural_rendering_resolution: int | None = None,
                  noise_mode: str = "random", deterministic_sampling: bool | None = None,
                  planes: Tensor | None = None, block_hook: BlockHook | None = None,
                  sr_ws: Tensor | None = None) -> dict[str, Tensor]:
        """Render ws ``(N, num_ws, w_dim)`` from cameras c ``(N, 25)``.

        Returns ``image`` ``(N, 3, img_resolution, img_resolution)``, ``image_raw`` ``(N, 3, r, r)`` and
        ``image_depth`` ``(N, 1, r, r)`` with ``r = neural_rendering_resolution`` (default: the
        generator's; giving one makes it the generator's, as in EG3D), plus ``planes``. Precomputed
        ``planes`` skip the backbone (several views of one sample). ``deterministic_sampling``
        overrides the rendering option of that name. ``block_hook`` runs after each backbone block
        (:class:`SynthesisNetwork`); ``sr_ws`` replaces ws for the super-resolution (it uses the last w).
        """
        check_noise_mode(noise_mode)
        check_camera_labels("c", c, ws.shape[0])
        if neural_rendering_resolution is None:
            neural_rendering_resolution = self.neural_rendering_resolution
        else:
            self.neural_rendering_resolution = neural_rendering_resolution
        resolution = neural_rendering_resolution
        cam2world, intrinsics = split_camera_labels(c)
        ray_origins, ray_directions = camera_rays(cam2world, intrinsics, resolution)
        if planes is None:
            planes = self.planes(ws, noise_mode, block_hook)
        options = self.rendering_kwargs
        if deterministic_sampling is not None:
            options = {**options, "deterministic_sampling": deterministic_sampling}
        features, depth, _ = self.renderer(planes, self.decoder, ray_origins, ray_directions, options)
        batch = ws.shape[0]
        feature_image = features.permute(0, 2, 1).reshape(batch, features.shape[-1], resolution, resolution)
        depth_image = depth.permute(0, 2, 1).reshape(batch, 1, resolution, resolution)
        rgb_image = feature_image[:, :3]
        sr_noise_mode = self.rendering_kwargs.get("superresolution_noise_mode", "none")
        image = self.superresolution(rgb_image, feature_image.contiguous(), ws if sr_ws is None else sr_ws,
                                     noise_mode=sr_noise_mode)
        return {"image": image, "image_raw": rgb_image, "image_depth": depth_image, "planes": planes}

    def sample(self, coordinates: Tensor, z: Tensor, c: Tensor, truncation_psi: float = 1.0,
               truncation_cutoff: int | None = None, noise_mode: str = "random") -> dict[str, Tensor]:
        """Density and colour features at ``coordinates`` ``(N, M, 3)`` of the samples of z, c:
        ``{"sigma": (N, M, 1), "rgb": (N, M, 32)}`` (for shape extraction)."""
        ws = self.mapping(z, c, truncation_psi=truncation_psi, truncation_cutoff=truncation_cutoff)
        return self.sample_mixed(coordinates, ws, noise_mode=noise_mode)

    def sample_mixed(self, coordinates: Tensor, ws: Tensor, noise_mode: str = "random",
                     planes: Tensor | None = None) -> dict[str, Tensor]:
        """As :meth:`sample`, from ws ``(N, num_ws, w_dim)`` (or their precomputed ``planes``)."""
        if coordinates.dim() != 3 or coordinates.shape[-1] != 3 or coordinates.shape[0] != ws.shape[0]:
            raise ValueError(f"coordinates must have shape ({ws.shape[0]}, M, 3), got {tuple(coordinates.shape)}")
        if planes is None:
            planes = self.planes(ws, noise_mode)
        return self.renderer.run_model(planes, self.decoder, coordinates, self.rendering_kwargs)

    def forward(self, z: Tensor, c: Tensor, truncation_psi: float = 1.0, truncation_cutoff: int | None = None,
                neural_rendering_resolution: int | None = None, update_emas: bool = False,
                noise_mode: str = "random", deterministic_sampling: bool | None = None) -> dict[str, Tensor]:
        """z ``(N, z_dim)``, camera labels c ``(N, 25)`` -> images; see :meth:`synthesis`."""
        ws = self.mapping(z, c, truncation_psi=truncation_psi, truncation_cutoff=truncation_cutoff,
                          update_emas=update_emas)
        return self.synthesis(ws, c, neural_rendering_resolution=neural_rendering_resolution, noise_mode=noise_mode,
                              deterministic_sampling=deterministic_sampling)
