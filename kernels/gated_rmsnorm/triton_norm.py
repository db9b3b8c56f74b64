"""Gated RMSNorm `rmsnorm(x) * weight * silu(z)` fused in one Triton pass.

Numerics follow `norm.gated_rms_norm` step by step: the fp32-normalised x is rounded to
x.dtype, multiplied by the weight in the promoted dtype of (weight, x) and rounded to it, then
multiplied by the fp32 silu(z) and rounded to x.dtype. One program normalises a block of rows,
reading x and z once and writing the output once: a memory-bound kernel.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..triton_utils import next_power_of_2, tl_dtype

# Elements per program: 4 warps x 32 lanes x 8 values, i.e. 32 rows of the model's D = 128.
BLOCK_ELEMENTS = 4096


@triton.jit
def _gated_rms_norm_kernel(
    x, z, weight, out, s_x, s_z, M, D, eps,
    BM: tl.constexpr, BD: tl.constexpr, PROD_DTYPE: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BM + tl.arange(0, BM)
    cols = tl.arange(0, BD)
    cmask = cols < D
    mask = (rows[:, None] < M) & cmask[None, :]
    x_dtype = x.dtype.element_ty

    xv = tl.load(x + rows[:, None] * s_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    zv = tl.load(z + rows[:, None] * s_z + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    w = tl.load(weight + cols, mask=cmask, other=0.0).to(tl.float32)

    inv = tl.rsqrt(tl.sum(xv * xv, 1) / D + eps)
    normed = (xv * inv[:, None]).to(x_dtype).to(tl.float32)
    normed = (normed * w[None, :]).to(PROD_DTYPE).to(tl.float32)
    y = normed * (zv * tl.sigmoid(zv))
    tl.store(out + rows[:, None] * D + cols[None, :], y.to(out.dtype.element_ty), mask=mask)


def gated_rms_norm_triton(x: Tensor, z: Tensor, weight: Tensor, eps: float = 1e-6) -> Tensor:
    """Contract of `gated_rms_norm`: x, z `[..., D]` (rows may be strided, D contiguous),
    weight `[D]`; returns a contiguous `[..., D]` in x.dtype."""
    if x.shape != z.shape or weight.shape != (x.shape[-1],):
        raise ValueError(f"x, z must be [..., D] alike and weight [D]; got {x.shape}, {z.shape}, {weight.shape}")
    dim = x.shape[-1]
    x2 = x.reshape(-1, dim)
    z2 = z.reshape(-1, dim)
    x2, z2 = (t if t.stride(-1) == 1 else t.contiguous() for t in (x2, z2))
    rows = x2.shape[0]
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    if rows == 0 or dim == 0:
        return out
    bd = next_power_of_2(dim)
    bm = max(1, min(BLOCK_ELEMENTS // bd, next_power_of_2(rows)))
    _gated_rms_norm_kernel[(triton.cdiv(rows, bm),)](
        x2, z2, weight, out, x2.stride(0), z2.stride(0), rows, dim, eps,
        BM=bm, BD=bd, PROD_DTYPE=tl_dtype(torch.promote_types(weight.dtype, x.dtype)),
        num_warps=4 if bm * bd <= 4096 else 8,
    )
    return out
