"""bf16 matrix products on CPUs without native bf16 arithmetic (the AVX2 builds).

PyTorch's bf16 GEMM is an order of magnitude slower than its fp32 one where the CPU has no bf16
dot products, so many-row bf16 linear layers multiply in fp32: the activations widened once, the
weight widened (or dequantized) one tile of WIDEN_ROWS output rows at a time, and each tile's fp32
products plus bias rounded once to bf16 straight into its columns of the output. A dense bf16
weight and a quantized weight holding the same bf16 values take the same tiles, so they give the
same bits.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

# Weight rows widened to fp32 at a time (8 MiB at K = 2048).
WIDEN_ROWS = 1024


def widened_linear(x: Tensor, out_features: int, weight_rows: Callable[[int, int], Tensor],
                   bias: Tensor | None) -> Tensor:
    """x `[..., K]` bf16 times a weight `[N, K]` whose rows ``weight_rows(start, stop)`` gives as an
    fp32 (or bf16) tile `[stop - start, K]`, plus bias `[N]` -> `[..., N]` in x.dtype.

    Autograd flows through the conversions and the column copies."""
    flat = x.reshape(-1, x.shape[-1]).float()
    if out_features <= WIDEN_ROWS:
        out = F.linear(flat, weight_rows(0, out_features).float(), None if bias is None else bias.float())
        return out.to(x.dtype).view(*x.shape[:-1], out_features)
    out = torch.empty(flat.shape[0], out_features, dtype=x.dtype)
    for start in range(0, out_features, WIDEN_ROWS):
        stop = min(start + WIDEN_ROWS, out_features)
        tile_bias = None if bias is None else bias[start:stop].float()
        out[:, start:stop] = F.linear(flat, weight_rows(start, stop).float(), tile_bias)
    return out.view(*x.shape[:-1], out_features)
