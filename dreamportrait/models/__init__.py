"""EG3D-compatible models on DreamPortrait's ops: StyleGAN2 layers, the tri-plane generator, its
renderer and super-resolution, the dual discriminator, cameras, presets, checkpoint import and
shape extraction."""

from .cameras import (CAMERA_LABEL_SIZE, camera_labels, camera_rays, fov_to_intrinsics, look_at, orbit_poses,
                      sample_camera_labels, sample_orbit_angles, sample_orbit_poses, split_camera_labels,
                      view_cameras)
from .discriminator import DualDiscriminator
from .mesh import density_grid, extract_mesh
from .pretrained import import_eg3d, load_pretrained, save_pretrained
from .presets import PRESETS, build_discriminator, build_generator, preset_kwargs
from .renderer import ImportanceRenderer, OSGDecoder
from .stylegan2 import MappingNetwork, StyleGAN2Backbone, SynthesisNetwork
from .superresolution import (SuperresolutionHybrid2X, SuperresolutionHybrid4X, SuperresolutionHybrid8X,
                              SuperresolutionHybrid8XDC)
from .text_conditioning import ConditionAdapters, TextConditionedGenerator, TriplaneCrossAttention
from .text_encoder import TextEncoder, TextFeatures
from .triplane_generator import TriPlaneGenerator

__all__ = [
    "CAMERA_LABEL_SIZE", "DualDiscriminator", "ImportanceRenderer", "MappingNetwork", "OSGDecoder", "PRESETS",
    "StyleGAN2Backbone", "SuperresolutionHybrid2X", "SuperresolutionHybrid4X", "SuperresolutionHybrid8X",
    "SuperresolutionHybrid8XDC", "SynthesisNetwork", "TextConditionedGenerator", "TextEncoder", "TextFeatures",
    "TriPlaneGenerator", "TriplaneCrossAttention", "ConditionAdapters", "build_discriminator", "build_generator",
    "camera_labels", "camera_rays", "density_grid", "extract_mesh", "import_eg3d", "load_pretrained",
    "save_pretrained", "fov_to_intrinsics", "look_at", "orbit_poses", "preset_kwargs",
    "sample_camera_labels", "sample_orbit_angles", "sample_orbit_poses", "split_camera_labels", "view_cameras",
]
