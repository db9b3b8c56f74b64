"""RMS norms of the Qwen3-Next blocks: the zero-centred norm and the gated output norm."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def _normalize_fp32(x: Tensor, eps: float) -> Tensor:
    """`x / sqrt(mean(x^2) + eps)` over the last dim, computed in fp32."""
    x32 = x.to(torch.float32)
    return x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)


def rms_norm(x: Tensor, weight: Tensor, eps: float = 1e-6, zero_centered: bool = True) -> Tensor:
    """RMSNorm over the last dim: x `[..., D]`, weight `[D]` -> `[..., D]` in x.dtype.

    zero_centered: scale by `1 + weight` (weights stored around 0, as in every Qwen3-Next block
    norm) instead of `weight`. The normalised activations are multiplied by the fp32 scale
    before the single cast back to x.dtype.
    """
    scale = weight.to(torch.float32)
    if zero_centered:
        scale = 1.0 + scale
    return (_normalize_fp32(x, eps) * scale).to(x.dtype)


def gated_rms_norm(x: Tensor, z: Tensor, weight: Tensor, eps: float = 1e-6) -> Tensor:
    """`rmsnorm(x) * weight * silu(z)` over the last dim; x, z `[..., D]`, weight `[D]`.

    Weight is plain (stored around 1). The cast order follows the reference model: the
    normalised x is rounded to x.dtype before the weight multiply, the gate is applied in
    fp32, and the result is cast to x.dtype.
    """
    normed = weight * _normalize_fp32(x, eps).to(x.dtype)
    return (normed * F.silu(z.to(torch.float32))).to(x.dtype)
