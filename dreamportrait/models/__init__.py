"""EG3D-compatible models on DreamPortrait's ops: StyleGAN2 layers, the tri-plane generator, its
renderer and super-resolution, the dual discriminator, cameras, presets and shape extraction; and
(:mod:`.pretrained`, :mod:`.safe_pickle`) model directories on disk and the import of EG3D pickles.

The model-directory functions and the text-conditioned generator (:mod:`dreamportrait.text`) build
on the networks here, so importing them here is deferred to their first use: importing a network
module never imports the layers above it.
"""

import importlib

from .cameras import (CAMERA_LABEL_SIZE, camera_labels, camera_rays, fov_to_intrinsics, look_at, orbit_poses,
                      sample_camera_labels, sample_orbit_angles, sample_orbit_poses, split_camera_labels,
                      view_cameras)
from .discriminator import DualDiscriminator
from .mesh import density_grid, extract_mesh
from .presets import PRESETS, build_discriminator, build_generator, preset_kwargs
from .renderer import ImportanceRenderer, OSGDecoder
from .stylegan2 import MappingNetwork, StyleGAN2Backbone, SynthesisNetwork
from .superresolution import (SuperresolutionHybrid2X, SuperresolutionHybrid4X, SuperresolutionHybrid8X,
                              SuperresolutionHybrid8XDC)
from .triplane_generator import TriPlaneGenerator

_DEFERRED = {"import_eg3d": "dreamportrait.models.pretrained", "load_pretrained": "dreamportrait.models.pretrained",
             "save_pretrained": "dreamportrait.models.pretrained", "ConditionAdapters": "dreamportrait.text",
             "TextConditionedGenerator": "dreamportrait.text", "TextEncoder": "dreamportrait.text",
             "TextFeatures": "dreamportrait.text", "TriplaneCrossAttention": "dreamportrait.text"}


def __getattr__(name: str):
    if name not in _DEFERRED:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(_DEFERRED[name]), name)


__all__ = [
    "CAMERA_LABEL_SIZE", "DualDiscriminator", "ImportanceRenderer", "MappingNetwork", "OSGDecoder", "PRESETS",
    "StyleGAN2Backbone", "SuperresolutionHybrid2X", "SuperresolutionHybrid4X", "SuperresolutionHybrid8X",
    "SuperresolutionHybrid8XDC", "SynthesisNetwork", "TextConditionedGenerator", "TextEncoder", "TextFeatures",
    "TriPlaneGenerator", "TriplaneCrossAttention", "ConditionAdapters", "build_discriminator", "build_generator",
    "camera_labels", "camera_rays", "density_grid", "extract_mesh", "import_eg3d", "load_pretrained",
    "save_pretrained", "fov_to_intrinsics", "look_at", "orbit_poses", "preset_kwargs",
    "sample_camera_labels", "sample_orbit_angles", "sample_orbit_poses", "split_camera_labels", "view_cameras",
]
