"""RMS norms: zero-centred block norm and the SiLU-gated Gated DeltaNet output norm.

`gated_rms_norm` runs the fused Triton kernel for CUDA tensors when Triton imports; on CPU both
norms take the native kernel (`norm_bf16.c`) for bf16 rows; everything else runs the PyTorch
reference in `norm.py`.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..triton_utils import use_triton
from . import native, norm

__all__ = ["add_rms_norm", "gated_rms_norm", "rms_norm"]


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


def add_rms_norm(x: Tensor, delta: Tensor, weight: Tensor, eps: float = 1e-6,
                 zero_centered: bool = True) -> tuple[Tensor, Tensor]:
    """A residual connection and the norm after it: (x + delta, rms_norm(x + delta)). bf16 on CPU in one
    native pass, the same bits as the two steps."""
    if (x.shape == delta.shape and x.is_contiguous() and delta.is_contiguous() and delta.dtype == x.dtype
            and native.supports(x, weight) and native.add_kernel() is not None):
        total, out = torch.empty_like(x), torch.empty_like(x)
        dim = x.shape[-1]
        native.add_rms_norm(x.view(-1, dim), delta.view(-1, dim), weight, eps, zero_centered, out.view(-1, dim),
                            total=total.view(-1, dim))
        return total, out
    total = x + delta
    return total, rms_norm(total, weight, eps, zero_centered)
