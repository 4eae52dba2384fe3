"""Named model configurations: constructor kwargs for :class:`TriPlaneGenerator` and
:class:`DualDiscriminator`.

``ffhq512-128`` is the published EG3D FFHQ 512² checkpoint (``ffhq512-128.pkl``): its training
configuration (``train.py --cfg=ffhq --gen_pose_cond=True``, final neural rendering 128²). ``tiny``
keeps the architecture at a few hundred thousand parameters per network for CPU tests and demos;
``world`` is ``tiny`` with the synthetic world's camera orbit (pivot at the origin, where the
world's heads are centred; :mod:`dreamportrait.world`), its grey background (empty space
renders as the world's background, so the generator need not fill the frustum with a grey card
to paint it) and a density prior, a ball the size of the heads that the generator starts from
(without both, the packaged 3D GAN learned a fog over the frame; with the background alone, a
thin card at the pivot: either foreshortens with the camera instead of turning).
"""

from __future__ import annotations

import copy

FFHQ_RENDERING = {
    "image_resolution": 512,
    "disparity_space_sampling": False,
    "clamp_mode": "softplus",
    "superresolution_module": "training.superresolution.SuperresolutionHybrid8XDC",
    "c_gen_conditioning_zero": False,
    "gpc_reg_prob": 0.5,
    "c_scale": 1.0,
    "superresolution_noise_mode": "none",
    "density_reg": 0.25,
    "density_reg_p_dist": 0.004,
    "reg_type": "l1",
    "decoder_lr_mul": 1.0,
    "sr_antialias": True,
    "depth_resolution": 48,
    "depth_resolution_importance": 48,
    "ray_start": 2.25,
    "ray_end": 3.3,
    "box_warp": 1,
    "avg_camera_radius": 2.7,
    "avg_camera_pivot": [0, 0, 0.2],
}

PRESETS = {
    "ffhq512-128": {
        "generator": {
            "z_dim": 512, "c_dim": 25, "w_dim": 512, "img_resolution": 512, "img_channels": 3,
            "sr_num_fp16_res": 4,
            "mapping_kwargs": {"num_layers": 2},
            "rendering_kwargs": FFHQ_RENDERING,
            "sr_kwargs": {"channel_base": 32768, "channel_max": 512, "fused_modconv_default": "inference_only"},
            "channel_base": 32768, "channel_max": 512, "fused_modconv_default": "inference_only",
            "num_fp16_res": 0, "conv_clamp": None,
            "neural_rendering_resolution": 128,
        },
        "discriminator": {
            "c_dim": 25, "img_resolution": 512, "img_channels": 3, "channel_base": 32768, "channel_max": 512,
            "num_fp16_res": 4, "conv_clamp": 256, "disc_c_noise": 0.0,
            "block_kwargs": {"freeze_layers": 0}, "mapping_kwargs": {}, "epilogue_kwargs": {"mbstd_group_size": 4},
        },
    },
    "tiny": {
        "generator": {
            "z_dim": 64, "c_dim": 25, "w_dim": 64, "img_resolution": 64, "img_channels": 3,
            "sr_num_fp16_res": 0,
            "mapping_kwargs": {"num_layers": 2},
            "rendering_kwargs": {
                **FFHQ_RENDERING,
                "image_resolution": 64,
                "superresolution_module": "SuperresolutionHybrid2X",
                "depth_resolution": 24,
                "depth_resolution_importance": 24,
            },
            "sr_kwargs": {"block_channels": [32, 16]},
            "channel_base": 2048, "channel_max": 64, "num_fp16_res": 0, "conv_clamp": None,
            "neural_rendering_resolution": 32, "triplane_resolution": 64,
        },
        "discriminator": {
            "c_dim": 25, "img_resolution": 64, "img_channels": 3, "channel_base": 1024, "channel_max": 64,
            "num_fp16_res": 0, "conv_clamp": None, "epilogue_kwargs": {"mbstd_group_size": 4},
        },
    },
}


PRESETS["world"] = copy.deepcopy(PRESETS["tiny"])
PRESETS["world"]["generator"]["rendering_kwargs"].update(
    avg_camera_pivot=[0, 0, 0],
    background=0.85,  # dreamportrait.world.heads.BACKGROUND (a test keeps them equal; the world imports models)
    density_prior={"radius": 0.25, "strength": 20.0},  # a ball the size of the world's heads (radii ~0.2-0.3)
)


def preset_kwargs(name: str, network: str) -> dict:
    """A deep copy of preset ``name``'s kwargs for ``network`` (``"generator"`` or ``"discriminator"``)."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    if network not in ("generator", "discriminator"):
        raise ValueError(f"network must be 'generator' or 'discriminator', got {network!r}")
    return copy.deepcopy(PRESETS[name][network])


def build_generator(preset: str, **overrides):
    """A freshly initialised :class:`TriPlaneGenerator` of ``preset``; ``overrides`` replace kwargs."""
    from .triplane_generator import TriPlaneGenerator

    return TriPlaneGenerator(**{**preset_kwargs(preset, "generator"), **overrides})


def build_discriminator(preset: str, **overrides):
    """A freshly initialised :class:`DualDiscriminator` of ``preset``; ``overrides`` replace kwargs."""
    from .discriminator import DualDiscriminator

    return DualDiscriminator(**{**preset_kwargs(preset, "discriminator"), **overrides})
