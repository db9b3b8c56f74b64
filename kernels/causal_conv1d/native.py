"""ctypes binding of `conv_bf16.c`: the causal depthwise conv over a token-major bf16 sequence on CPU."""

from __future__ import annotations

import ctypes
import functools
from pathlib import Path

import torch

from ..native import load

MAX_TAPS = 16
_I64, _PTR = ctypes.c_int64, ctypes.c_void_p
_ARGTYPES = (_PTR, _I64, _I64, _I64, _PTR, _PTR, _I64, ctypes.c_int, _PTR, _I64, ctypes.c_int)


@functools.cache
def kernel():
    """The C function `causal_conv1d_bf16`, or None where it cannot run here."""
    return load(Path(__file__).with_name("conv_bf16.c"), "causal_conv1d_bf16", _ARGTYPES)


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
                  activation: str | None) -> tuple[torch.Tensor, torch.Tensor]:
    """The contract of `conv.causal_conv1d` for inputs `supports` takes. y comes back as a `[B, D, T]`
    view of a token-major `[B, T, D]` tensor (so `y.transpose(1, 2)` is contiguous)."""
    batch, channels, length = x.shape
    taps = weight.shape[1]
    if conv_state is None:
        tail = torch.zeros(batch, channels, taps - 1, dtype=x.dtype)
    else:
        tail = conv_state.to(memory_format=torch.contiguous_format, copy=True)
    weight = weight.contiguous()
    y = torch.empty(batch, length, channels, dtype=x.dtype)
    for b in range(batch):
        kernel()(x[b].data_ptr(), x.stride(2), length, channels, tail[b].data_ptr(), weight.data_ptr(), taps,
                 int(activation is not None), y[b].data_ptr(), channels, torch.get_num_threads())
    return y.transpose(1, 2), tail
