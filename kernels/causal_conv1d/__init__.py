"""Causal depthwise convolution (the short conv in front of the Gated DeltaNet q, k, v).

`causal_conv1d` and `causal_conv1d_update` run the Triton kernels for CUDA tensors when Triton
imports; on CPU a token-major bf16 sequence takes the native kernel (`conv_bf16.c`); everything
else runs the PyTorch reference in `conv.py`.
"""

from __future__ import annotations

from torch import Tensor

from ..triton_utils import use_triton
from . import conv, native

__all__ = ["causal_conv1d", "causal_conv1d_update"]


def causal_conv1d(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    *,
    conv_state: Tensor | None = None,
    activation: str | None = "silu",
) -> tuple[Tensor, Tensor]:
    """Causal depthwise convolution over x `[B, D, T]`; contract of `conv.causal_conv1d`."""
    if use_triton(x):
        from .triton_conv import causal_conv1d_triton

        return causal_conv1d_triton(x, weight, bias, conv_state=conv_state, activation=activation)
    if native.supports(x, weight, bias, conv_state, activation):
        return native.causal_conv1d(x, weight, conv_state, activation)
    return conv.causal_conv1d(x, weight, bias, conv_state=conv_state, activation=activation)


def causal_conv1d_update(
    x: Tensor,
    conv_state: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    activation: str | None = "silu",
) -> Tensor:
    """One decode step on x `[B, D]`, shifting `conv_state` in place; contract of `conv.causal_conv1d_update`."""
    if use_triton(x):
        from .triton_conv import causal_conv1d_update_triton

        return causal_conv1d_update_triton(x, conv_state, weight, bias, activation)
    return conv.causal_conv1d_update(x, conv_state, weight, bias, activation)
