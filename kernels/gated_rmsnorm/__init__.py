"""RMS norms: zero-centred block norm and the SiLU-gated Gated DeltaNet output norm.

`gated_rms_norm` runs the fused Triton kernel for CUDA tensors when Triton imports, and the
PyTorch reference in `norm.py` otherwise.
"""

from __future__ import annotations

from torch import Tensor

from ..triton_utils import use_triton
from . import norm
from .norm import rms_norm

__all__ = ["gated_rms_norm", "rms_norm"]


def gated_rms_norm(x: Tensor, z: Tensor, weight: Tensor, eps: float = 1e-6) -> Tensor:
    """`rmsnorm(x) * weight * silu(z)` over the last dim; contract of `norm.gated_rms_norm`."""
    if use_triton(x):
        from .triton_norm import gated_rms_norm_triton

        return gated_rms_norm_triton(x, z, weight, eps)
    return norm.gated_rms_norm(x, z, weight, eps)
