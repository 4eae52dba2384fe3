"""A synthetic portrait world: procedural 3D heads with attributes, their captions and renders."""

from .attributes import (ATTRIBUTES, HELD_OUT_RULES, HeadAttributes, all_combinations, caption,
                         held_out_combinations, is_held_out, parse_caption, training_combinations)
from .heads import WORLD_CAMERAS, HeadBatch, head_field, render_heads, sample_world_cameras

__all__ = ["ATTRIBUTES", "HELD_OUT_RULES", "HeadAttributes", "HeadBatch", "WORLD_CAMERAS", "all_combinations",
           "caption", "head_field", "held_out_combinations", "is_held_out", "parse_caption", "render_heads",
           "sample_world_cameras", "training_combinations"]
