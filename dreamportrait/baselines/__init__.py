"""Baselines DreamPortrait is measured against."""

from .per_prompt_sds import DEFAULT_STEPS, BaselineResult, TriplaneScene, optimise_scene, save_scene, write_baseline

__all__ = ["BaselineResult", "DEFAULT_STEPS", "TriplaneScene", "optimise_scene", "save_scene", "write_baseline"]
