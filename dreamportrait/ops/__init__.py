"""DreamPortrait's accelerated ops.

Each op has a PyTorch reference (:mod:`dreamportrait.ops.reference`, the specification), a C++
CPU kernel, a CUDA kernel and a Triton kernel; see :mod:`dreamportrait.ops._backend` for which
one runs a call.
"""

from ._backend import BACKEND_ENV, BACKENDS
from .composite_rays import composite_rays
from .gated_cross_attention import gated_cross_attention
from .sample_and_decode import sample_and_decode
from .triplane_sample import EG3D_AXES, ORTHOGONAL_AXES, triplane_sample

__all__ = ["BACKENDS", "BACKEND_ENV", "EG3D_AXES", "ORTHOGONAL_AXES", "composite_rays", "gated_cross_attention",
           "sample_and_decode", "triplane_sample"]
