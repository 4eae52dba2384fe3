"""Volume-rendering pieces on top of the ops: EG3D's ray marcher and the samplers its importance
renderer uses."""

from .ray_marcher import eg3d_ray_march
from .sampling import importance_depths, merge_samples, sample_pdf, stratified_depths

__all__ = ["eg3d_ray_march", "importance_depths", "merge_samples", "sample_pdf", "stratified_depths"]
