"""Depthwise causal 1-D convolution with a carried input tail (the conv state)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def _activate(x: Tensor, activation: str | None) -> Tensor:
    if activation is None:
        return x
    if activation in ("silu", "swish"):
        return F.silu(x)
    raise ValueError(f"unsupported activation {activation!r}; expected 'silu', 'swish' or None")


def _check(x: Tensor, weight: Tensor, bias: Tensor | None, conv_state: Tensor | None, step: bool) -> None:
    channels = x.shape[1]
    if weight.dim() != 2 or weight.shape[0] != channels:
        raise ValueError(f"weight must be [D, W] with D = {channels}, got {tuple(weight.shape)}")
    if bias is not None and tuple(bias.shape) != (channels,):
        raise ValueError(f"bias must be [{channels}], got {tuple(bias.shape)}")
    if conv_state is not None:
        expected = (x.shape[0], channels, weight.shape[1] - 1)
        if tuple(conv_state.shape) != expected:
            raise ValueError(f"conv_state must be {expected}, got {tuple(conv_state.shape)}")
    if x.dim() != (2 if step else 3):
        raise ValueError(f"x must be {'[B, D]' if step else '[B, D, T]'}, got {tuple(x.shape)}")


def causal_conv1d(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    *,
    conv_state: Tensor | None = None,
    activation: str | None = "silu",
) -> tuple[Tensor, Tensor]:
    """Causal depthwise convolution over a sequence, continuing from `conv_state`.

    x: `[B, D, T]`; weight: `[D, W]` (one filter per channel, oldest tap first); bias: `[D]`;
    conv_state: `[B, D, W-1]`, the W-1 inputs preceding x (zeros when None);
    activation: "silu" (alias "swish") or None.
    Returns y `[B, D, T]` in x.dtype and the new conv state `[B, D, W-1]`: the last W-1 inputs
    seen, reaching back into conv_state when T < W-1 (dtype of conv_state, or of x when None).
    The convolution runs in weight.dtype, as the reference depthwise `nn.Conv1d` does.
    Inputs are never modified.
    """
    _check(x, weight, bias, conv_state, step=False)
    channels, length, tail = x.shape[1], x.shape[2], weight.shape[1] - 1
    if length == 0:
        if conv_state is None:
            return x.clone(), x.new_zeros(x.shape[0], channels, tail)
        return x.clone(), conv_state.clone(memory_format=torch.contiguous_format)
    if conv_state is None:
        y = F.conv1d(x.to(weight.dtype), weight.unsqueeze(1), bias, padding=tail, groups=channels)[..., :length]
        history = F.pad(x, (tail, 0))
    else:
        history = torch.cat([conv_state, x], dim=-1)
        y = F.conv1d(history.to(weight.dtype), weight.unsqueeze(1), bias, groups=channels)
    state_dtype = x.dtype if conv_state is None else conv_state.dtype
    # A fresh compact tensor: the state outlives this call and is later updated in place.
    new_state = history[..., history.shape[-1] - tail :].to(
        dtype=state_dtype, memory_format=torch.contiguous_format, copy=True
    )
    return _activate(y, activation).to(x.dtype), new_state


def causal_conv1d_update(
    x: Tensor,
    conv_state: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    activation: str | None = "silu",
) -> Tensor:
    """One decode step of `causal_conv1d`; shifts x into `conv_state` in place.

    x: `[B, D]`; conv_state: `[B, D, W-1]` (modified in place); weight: `[D, W]`; bias: `[D]`.
    Returns `[B, D]` in x.dtype. Products are summed in fp32 and rounded once to weight.dtype,
    which is what the depthwise convolution kernel does.
    """
    _check(x, weight, bias, conv_state, step=True)
    window = torch.cat([conv_state, x.unsqueeze(-1)], dim=-1)  # [B, D, W]
    y = (window.to(torch.float32) * weight.to(torch.float32)).sum(dim=-1)
    if bias is not None:
        y = y + bias.to(torch.float32)
    conv_state.copy_(window[..., 1:])
    return _activate(y.to(weight.dtype), activation).to(x.dtype)
