"""Binding of `conv_bf16.c` (AVX-512 BF16 and AVX2 + FMA + F16C builds): the causal depthwise conv
over a token-major bf16 sequence on CPU."""

from __future__ import annotations

from pathlib import Path

import torch

from ..native import Kernel

MAX_TAPS = 16
CONV = Kernel(Path(__file__).with_name("conv_bf16.c"), "causal_conv1d_bf16", "piiippinpin", isas=("avx512", "avx2"))


def kernel() -> Kernel | None:
    """The kernel where a build of it runs here, else None."""
    return CONV if CONV.available() else None


def supports(x: torch.Tensor, weight: torch.Tensor, bias, conv_state, activation) -> bool:
    """x `[B, D, T]` bf16 on CPU with unit stride along D (a transposed token-major tensor), a bf16
    weight of at most MAX_TAPS taps, no bias, a bf16 state (or none) and SiLU or no activation."""
    return (
        x.device.type == "cpu"
        and x.dtype == weight.dtype == torch.bfloat16
        and x.shape[2] > 0
        and x.stride(1) == 1
        and weight.shape[1] <= MAX_TAPS
        and bias is None
        and (conv_state is None or conv_state.dtype == torch.bfloat16)
        and activation in (None, "silu", "swish")
        and kernel() is not None
    )


def causal_conv1d(x: torch.Tensor, weight: torch.Tensor, conv_state: torch.Tensor | None,
                  activation: str | None, threads: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The contract of `conv.causal_conv1d` for inputs `supports` takes. y comes back as a `[B, D, T]`
    view of a token-major `[B, T, D]` tensor (so `y.transpose(1, 2)` is contiguous). On `threads`
    threads (default: torch's count)."""
    batch, channels, length = x.shape
    taps = weight.shape[1]
    if conv_state is None:
        tail = torch.zeros(batch, channels, taps - 1, dtype=x.dtype)
    else:
        tail = conv_state.to(memory_format=torch.contiguous_format, copy=True)
    weight = weight.contiguous()
    y = torch.empty(batch, length, channels, dtype=x.dtype)
    for b in range(batch):
        CONV(x[b], x.stride(2), length, channels, tail[b], weight, taps, int(activation is not None), y[b], channels,
             threads or torch.get_num_threads())
    return y.transpose(1, 2), tail
