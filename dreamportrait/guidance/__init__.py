"""Score Distillation Sampling guidance from frozen diffusers text-to-image models."""

from .stable_diffusion import WEIGHTINGS, SDSOutput, StableDiffusionGuidance, view_of_yaw, with_view_suffix

__all__ = ["SDSOutput", "StableDiffusionGuidance", "WEIGHTINGS", "view_of_yaw", "with_view_suffix"]
