"""RMS norms: zero-centred block norm and the SiLU-gated Gated DeltaNet output norm.

`gated_rms_norm` runs the fused Triton kernel for CUDA tensors when Triton imports; on CPU both
norms take the native kernel (`norm_bf16.c`) for bf16 rows; everything else runs the PyTorch
reference in `norm.py`.
"""

from __future__ import annotations

from torch import Tensor

from ..triton_utils import use_triton
from . import native, norm

__all__ = ["gated_rms_norm", "rms_norm"]


def rms_norm(x: Tensor, weight: Tensor, eps: float = 1e-6, zero_centered: bool = True) -> Tensor:
    """RMSNorm over the last dim; contract of `norm.rms_norm`."""
    if native.supports(x, weight):
        return native.rms_norm(x, weight, eps, zero_centered)
    return norm.rms_norm(x, weight, eps, zero_centered)


def gated_rms_norm(x: Tensor, z: Tensor, weight: Tensor, eps: float = 1e-6) -> Tensor:
    """`rmsnorm(x) * weight * silu(z)` over the last dim; contract of `norm.gated_rms_norm`."""
    if use_triton(x):
        from .triton_norm import gated_rms_norm_triton

        return gated_rms_norm_triton(x, z, weight, eps)
    if native.supports(x, weight, z):
        return native.gated_rms_norm(x, z, weight, eps)
    return norm.gated_rms_norm(x, z, weight, eps)
