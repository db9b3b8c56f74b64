"""Binding of `rotary_bf16.c` (AVX-512 BF16 and AVX2 + FMA + F16C builds): rotary embedding of bf16
heads on CPU, bit for bit the reference."""

from __future__ import annotations

from pathlib import Path

import torch

from ..native import Kernel

ROTARY = Kernel(Path(__file__).with_name("rotary_bf16.c"), "rotary_bf16", "piiiiippipiin", isas=("avx512", "avx2"))


def kernel() -> Kernel | None:
    """The kernel where a build of it runs here, else None."""
    return ROTARY if ROTARY.available() else None


def supports(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> bool:
    """x `[B, T, H, D]` bf16 on CPU with unit stride along D; cos/sin `[T, R]` bf16, R even, at most D."""
    return (
        x.device.type == "cpu"
        and x.dim() == 4
        and x.dtype == cos.dtype == sin.dtype == torch.bfloat16
        and x.stride(-1) == 1
        and cos.shape == sin.shape
        and cos.shape[-1] % 2 == 0
        and cos.shape[-1] <= x.shape[-1]
        and kernel() is not None
    )


def rotate_into(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, out: torch.Tensor,
                threads: int | None = None) -> None:
    """Writes `apply_rotary_reference(x, cos, sin)` into out `[T, H, D]` (any token/head strides, unit
    stride along D, not overlapping x) for x `[T, H, D]`; cos/sin `[T, R]` (R = 0 copies); on
    `threads` threads (default: torch's count)."""
    length, heads, dim = x.shape
    cos, sin = cos.contiguous(), sin.contiguous()
    ROTARY(x, x.stride(0), x.stride(1), length, heads, dim, cos, sin, cos.shape[-1], out, out.stride(0), out.stride(1),
           threads or torch.get_num_threads())


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """The contract of `reference.apply_rotary_reference` for inputs `supports` takes."""
    out = torch.empty(x.shape, dtype=x.dtype)
    for b in range(x.shape[0]):
        rotate_into(x[b], cos, sin, out[b])
    return out
