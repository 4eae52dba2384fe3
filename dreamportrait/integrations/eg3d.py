"""Accelerate an EG3D code base (EG3D, its forks) with DreamPortrait's ops.

Two drop-ins with EG3D's own signatures and results, usable on their own:

- :func:`sample_from_planes` (EG3D's ``training.volumetric_rendering.renderer.sample_from_planes``):
  tri-plane sampling through :func:`dreamportrait.ops.triplane_sample`;
- :class:`MipRayMarcher2` (EG3D's ray marcher): compositing through
  :func:`dreamportrait.ops.composite_rays`.

and :func:`install` / :func:`uninstall` (or the :func:`installed` context manager), which make an
unmodified EG3D ``ImportanceRenderer`` use them, instances created before the call included::

    from dreamportrait.integrations import eg3d
    eg3d.install()          # after EG3D's training.* modules are imported

With EG3D's tri-plane decoder (``OSGDecoder``, recognised by its structure), the renderer's
``run_model`` also samples, averages and decodes in one fused op
(:func:`dreamportrait.ops.sample_and_decode`). Everything else of EG3D's renderer (its stratified
and importance sampling, which draw from torch's global generator, sorting, the ray sampler, the
super-resolution) runs unchanged, so the same seed gives the same samples.
"""

from __future__ import annotations

import contextlib
import math
import numbers
import sys
from collections.abc import Iterator, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..ops import triplane_sample
from ..rendering import eg3d_ray_march

EG3D_PLANE_AXES = (((1, 0, 0), (0, 1, 0), (0, 0, 1)),
                   ((1, 0, 0), (0, 0, 1), (0, 1, 0)),
                   ((0, 0, 1), (1, 0, 0), (0, 1, 0)))
"""EG3D's ``generate_planes()``: each plane's three axis vectors (rows)."""

RENDERER_MODULE = "volumetric_rendering.renderer"
RAY_MARCHER_MODULE = "volumetric_rendering.ray_marcher"


def _name_error(function: str, name: str, expected: str, value) -> TypeError:
    return TypeError(f"{function}: {name} must be {expected}, got {type(value).__name__}")


def kernel_axes(plane_axes: Tensor) -> tuple[int, ...] | None:
    """The six axis indices :func:`~dreamportrait.ops.triplane_sample` takes for EG3D ``plane_axes``
    ``(3, 3, 3)``, or None when the planes are not three axis-aligned projections.

    EG3D projects a point ``p`` onto plane ``i`` as ``(p @ inverse(plane_axes[i]))[:2]``; when both
    used columns of the inverse are unit axis vectors the projection selects two coordinates
    exactly, which is what the kernels compute. Anything else (scaled, rotated or more planes) has
    no kernel and gets EG3D's own computation."""
    if not isinstance(plane_axes, Tensor) or tuple(plane_axes.shape) != (3, 3, 3) or not plane_axes.is_floating_point():
        return None
    values = plane_axes.detach().to("cpu", torch.float64)
    if not torch.isfinite(values).all():
        return None
    try:
        inverse = torch.linalg.inv(values)
    except RuntimeError:  # singular
        return None
    axes = []
    for plane in range(3):
        for column in range(2):
            vector = inverse[plane, :, column]
            nonzero = torch.nonzero(vector).flatten().tolist()
            if len(nonzero) != 1 or vector[nonzero[0]].item() != 1.0:
                return None
            axes.append(nonzero[0])
    if any(axes[2 * plane] == axes[2 * plane + 1] for plane in range(3)):
        return None
    return tuple(axes)


def eg3d_sample_from_planes(plane_axes: Tensor, plane_features: Tensor, coordinates: Tensor, mode: str = "bilinear",
                            padding_mode: str = "zeros", box_warp: float | None = None) -> Tensor:
    """EG3D's tri-plane sampling computed as EG3D computes it (any number of planes, any axes):
    points scaled by ``2 / box_warp``, multiplied by each plane's inverse axes matrix, the first two
    coordinates sampled with ``grid_sample(align_corners=False)``. The fallback of
    :func:`sample_from_planes`."""
    batch, n_planes, channels, height, width = plane_features.shape
    count = coordinates.shape[1]
    scaled = (2 / box_warp) * coordinates
    points = scaled.unsqueeze(1).expand(-1, n_planes, -1, -1).reshape(batch * n_planes, count, 3)
    inverse = torch.linalg.inv(plane_axes).unsqueeze(0).expand(batch, -1, -1, -1).reshape(batch * n_planes, 3, 3)
    projected = torch.bmm(points, inverse)[..., :2].unsqueeze(1)
    sampled = F.grid_sample(plane_features.reshape(batch * n_planes, channels, height, width), projected.float(),
                            mode=mode, padding_mode=padding_mode, align_corners=False)
    return sampled.permute(0, 3, 2, 1).reshape(batch, n_planes, count, channels)


def _check_sample_arguments(plane_axes, plane_features, coordinates, mode, padding_mode, box_warp) -> float:
    function = "sample_from_planes"
    for name, value, dims in (("plane_axes", plane_axes, 3), ("plane_features", plane_features, 5),
                              ("coordinates", coordinates, 3)):
        if not isinstance(value, Tensor):
            raise _name_error(function, name, "a Tensor", value)
        if value.dim() != dims:
            raise ValueError(f"{function}: {name} must have {dims} dimensions, got shape {tuple(value.shape)}")
    if tuple(plane_axes.shape[1:]) != (3, 3) or plane_axes.shape[0] != plane_features.shape[1]:
        raise ValueError(f"{function}: plane_axes must have shape ({plane_features.shape[1]}, 3, 3) (one 3x3 basis "
                         f"per plane of plane_features), got {tuple(plane_axes.shape)}")
    if coordinates.shape[2] != 3 or coordinates.shape[0] != plane_features.shape[0]:
        raise ValueError(f"{function}: coordinates must have shape ({plane_features.shape[0]}, M, 3), "
                         f"got {tuple(coordinates.shape)}")
    if padding_mode != "zeros":
        raise ValueError(f"{function}: padding_mode must be 'zeros' (as in EG3D), got {padding_mode!r}")
    if mode not in ("bilinear", "nearest", "bicubic"):
        raise ValueError(f"{function}: mode must be 'bilinear', 'nearest' or 'bicubic', got {mode!r}")
    if isinstance(box_warp, bool) or not isinstance(box_warp, numbers.Real):
        raise _name_error(function, "box_warp", "a positive number", box_warp)
    if not (math.isfinite(box_warp) and box_warp > 0 and math.isfinite(2 / box_warp)):
        raise ValueError(f"{function}: box_warp must be a positive finite number, got {box_warp}")
    return float(box_warp)


def sample_from_planes(plane_axes: Tensor, plane_features: Tensor, coordinates: Tensor, mode: str = "bilinear",
                       padding_mode: str = "zeros", box_warp: float | None = None) -> Tensor:
    """EG3D's ``sample_from_planes`` on DreamPortrait's kernel.

    Args:
        plane_axes: ``(n_planes, 3, 3)`` each plane's basis (EG3D's ``generate_planes()``).
        plane_features: ``(N, n_planes, C, H, W)``.
        coordinates: ``(N, M, 3)`` points; the box ``[-box_warp/2, box_warp/2]^3`` maps onto the planes.
        mode, padding_mode: as EG3D's (``padding_mode`` must be ``'zeros'``).
        box_warp: the box's side, positive.

    Returns ``(N, n_planes, M, C)``, EG3D's result. Three axis-aligned planes (:func:`kernel_axes`)
    sampled bilinearly in float32/float64 run on :func:`~dreamportrait.ops.triplane_sample`; anything
    else runs EG3D's own computation (:func:`eg3d_sample_from_planes`), never a different result.
    """
    box_warp = _check_sample_arguments(plane_axes, plane_features, coordinates, mode, padding_mode, box_warp)
    axes = kernel_axes(plane_axes) if mode == "bilinear" else None
    fast = (axes is not None and plane_features.dtype in (torch.float32, torch.float64)
            and coordinates.dtype == plane_features.dtype and coordinates.device == plane_features.device
            and plane_features.device.type in ("cpu", "cuda"))
    if not fast:
        return eg3d_sample_from_planes(plane_axes, plane_features, coordinates, mode, padding_mode, box_warp)
    sampled = triplane_sample(plane_features, coordinates, box_warp, axes, "none")  # (N, M, 3, C)
    return sampled.permute(0, 2, 1, 3).contiguous()


def _ray_march(self, colors: Tensor, densities: Tensor, depths: Tensor, rendering_options: Mapping):
    if not isinstance(rendering_options, Mapping):
        raise _name_error("MipRayMarcher2", "rendering_options", "a mapping", rendering_options)
    for name, value in (("colors", colors), ("densities", densities), ("depths", depths)):
        if not isinstance(value, Tensor):
            raise _name_error("MipRayMarcher2", name, "a Tensor", value)
        if value.dim() != 4:
            raise ValueError(f"MipRayMarcher2: {name} must have shape (N, R, S, K), got {tuple(value.shape)}")
    options = {"clamp_mode": rendering_options.get("clamp_mode"),
               "white_back": bool(rendering_options.get("white_back", False))}
    return eg3d_ray_march(colors, densities, depths, options)


class MipRayMarcher2(nn.Module):
    """EG3D's ray marcher on :func:`~dreamportrait.ops.composite_rays`: ``forward(colors, densities,
    depths, rendering_options)`` -> ``(rgb, depth, weights)`` with EG3D's shapes and results
    (:func:`~dreamportrait.rendering.eg3d_ray_march`; ``rendering_options['clamp_mode']`` must be
    ``'softplus'``, ``white_back`` is honoured)."""

    def run_forward(self, colors: Tensor, densities: Tensor, depths: Tensor, rendering_options: Mapping):
        return _ray_march(self, colors, densities, depths, rendering_options)

    def forward(self, colors: Tensor, densities: Tensor, depths: Tensor, rendering_options: Mapping):
        return self.run_forward(colors, densities, depths, rendering_options)


# install() / uninstall() ----------------------------------------------------------------------

_patches: list[tuple[object, str, object]] = []  # (owner, attribute, EG3D's original)
_installed_package: str | None = None


def _module(package: str, suffix: str):
    name = f"{package}.{suffix}"
    module = sys.modules.get(name)
    if module is None:
        raise ImportError(f"install: EG3D's {name} is not imported; import your EG3D code (for example "
                          f"'import {name}') before calling install()")
    return module


def _patch(owner, attribute: str, value) -> None:
    if attribute not in vars(owner):
        raise AttributeError(f"install: {getattr(owner, '__name__', owner)} has no {attribute} of its own to replace")
    _patches.append((owner, attribute, vars(owner)[attribute]))
    setattr(owner, attribute, value)


def install(package: str = "training", *, fused: bool = True) -> None:
    """Make EG3D's renderer (the modules ``{package}.volumetric_rendering.renderer`` and
    ``.ray_marcher``, already imported) run on DreamPortrait's ops.

    Replaced: the renderer module's ``sample_from_planes`` (by :func:`sample_from_planes`), the ray
    marcher class's ``run_forward`` (by :class:`MipRayMarcher2`'s), and, with ``fused``, the renderer
    class's ``run_model`` (by one that decodes EG3D's ``OSGDecoder`` with the fused sample-and-decode
    op and otherwise calls EG3D's own). Existing instances are affected: the methods live on the
    classes. Calling it again with the same ``package`` does nothing. :func:`uninstall` restores
    EG3D's objects.
    """
    global _installed_package
    if not isinstance(package, str) or not package:
        raise _name_error("install", "package", "a module name such as 'training'", package)
    if not isinstance(fused, bool):
        raise _name_error("install", "fused", "a bool", fused)
    if _installed_package is not None:
        if _installed_package == package:
            return
        raise RuntimeError(f"install: already installed into {_installed_package!r}; call uninstall() first")
    renderer, ray_marcher = _module(package, RENDERER_MODULE), _module(package, RAY_MARCHER_MODULE)
    for module, attribute in ((renderer, "sample_from_planes"), (renderer, "ImportanceRenderer"),
                              (ray_marcher, "MipRayMarcher2")):
        if not hasattr(module, attribute):
            raise AttributeError(f"install: {module.__name__} has no {attribute}; is it EG3D's?")
    try:
        _patch(renderer, "sample_from_planes", sample_from_planes)
        _patch(ray_marcher.MipRayMarcher2, "run_forward", _ray_march)
        if fused:
            from ._eg3d_fused import fused_run_model

            original = vars(renderer.ImportanceRenderer)["run_model"]
            _patch(renderer.ImportanceRenderer, "run_model", fused_run_model(original))
    except BaseException:
        _restore()
        raise
    _installed_package = package


def _restore() -> None:
    while _patches:
        owner, attribute, original = _patches.pop()
        setattr(owner, attribute, original)


def uninstall() -> None:
    """Put back every object :func:`install` replaced (the very same objects). Does nothing when
    not installed."""
    global _installed_package
    _restore()
    _installed_package = None


def is_installed() -> bool:
    return _installed_package is not None


@contextlib.contextmanager
def installed(package: str = "training", *, fused: bool = True) -> Iterator[None]:
    """:func:`install` for the duration of a ``with`` block, then :func:`uninstall` (only if this
    block installed it)."""
    already = is_installed()
    install(package, fused=fused)
    try:
        yield
    finally:
        if not already:
            uninstall()


__all__ = ["EG3D_PLANE_AXES", "MipRayMarcher2", "eg3d_sample_from_planes", "install", "installed", "is_installed",
           "kernel_axes", "sample_from_planes", "uninstall"]
