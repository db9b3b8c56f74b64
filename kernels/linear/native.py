"""Binding of `small_m_bf16.c` (AVX-512 BF16 and AVX2 + FMA + F16C builds)."""

from __future__ import annotations

from pathlib import Path

import torch

from ..native import Kernel

LINEAR = Kernel(Path(__file__).with_name("small_m_bf16.c"), "linear_small_m_bf16", "piipiiipinn",
                isas=("avx512", "avx2"))


def kernel() -> Kernel | None:
    """The kernel where a build of it runs here, else None."""
    return LINEAR if LINEAR.available() else None


def linear_small_m(x: torch.Tensor, weight: torch.Tensor, out_dtype: torch.dtype,
                   out: torch.Tensor | None = None, threads: int | None = None) -> torch.Tensor:
    """x `[M, K]` bf16 with unit column stride, weight `[N, K]` bf16 contiguous -> `[M, N]` out_dtype
    (bf16 or fp32), written into `out` (contiguous) when given, on `threads` threads (default:
    torch's count). The caller checks `kernel()` is not None."""
    rows, depth = x.shape
    if out is None:
        out = torch.empty(rows, weight.shape[0], dtype=out_dtype)
    LINEAR(x, x.stride(0), rows, weight, weight.stride(0), weight.shape[0], depth, out, out.shape[1],
           int(out.dtype == torch.float32), threads or torch.get_num_threads())
    return out
