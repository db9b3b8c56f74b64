"""Causal depthwise conv1d with SiLU in Triton: prefill over a sequence and a single decode step.

Numerics follow `conv.py`: prefill rounds x to weight.dtype, sums the W products in fp32,
rounds once to weight.dtype, applies SiLU (rounded to weight.dtype) and casts to x.dtype; the
decode step sums fp32 products of the un-rounded inputs, then rounds the same way.

The model feeds x as a transposed view (`[B, D, T]` with channels contiguous), so the kernels
take arbitrary strides and tile `[time, channels]` with channels as the fast axis.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..triton_utils import next_power_of_2
from .conv import _check

# Channel tile: 8 warps x 32 lanes x 2 contiguous channels, coalesced on the channel axis.
BLOCK_D = 256
BLOCK_T = 16


@triton.jit
def _finish(acc, W_DTYPE: tl.constexpr, SILU: tl.constexpr):
    """Round the fp32 sum to the weight dtype, then SiLU rounded to the weight dtype again."""
    y = acc.to(W_DTYPE).to(tl.float32)
    if SILU:
        y = (y * tl.sigmoid(y)).to(W_DTYPE).to(tl.float32)
    return y


@triton.jit
def _conv_prefill_kernel(
    x, weight, bias, state, y, new_state,
    s_xb, s_xd, s_xt, s_yb, s_yd, s_yt, s_sb, s_sd, s_ss, s_wd, s_ww,
    D, T,
    W: tl.constexpr, BS: tl.constexpr, BT: tl.constexpr, BD: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_STATE: tl.constexpr, SILU: tl.constexpr,
):
    i_t, i_d, i_b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    t = i_t * BT + tl.arange(0, BT)
    d = i_d * BD + tl.arange(0, BD)
    dmask = d < D
    w_dtype = weight.dtype.element_ty
    xb = x + i_b.to(tl.int64) * s_xb

    acc = tl.zeros((BT, BD), tl.float32)
    if HAS_BIAS:
        acc += tl.load(bias + d, mask=dmask, other=0.0).to(w_dtype).to(tl.float32)[None, :]
    for tap in tl.static_range(W):
        src = t - (W - 1) + tap  # input time of this tap; < 0 reads the carried tail
        wt = tl.load(weight + d * s_wd + tap * s_ww, mask=dmask, other=0.0).to(tl.float32)
        m = (src[:, None] >= 0) & (src[:, None] < T) & dmask[None, :]
        xv = tl.load(xb + src[:, None] * s_xt + d[None, :] * s_xd, mask=m, other=0.0).to(tl.float32)
        if HAS_STATE:
            ms = (src[:, None] < 0) & dmask[None, :]
            sb = state + i_b.to(tl.int64) * s_sb
            tail = tl.load(sb + (W - 1 + src[:, None]) * s_ss + d[None, :] * s_sd, mask=ms, other=0.0)
            xv = tl.where(src[:, None] < 0, tail.to(tl.float32), xv)
        acc += xv.to(w_dtype).to(tl.float32) * wt[None, :]
    out = _finish(acc, w_dtype, SILU)
    ym = (t[:, None] < T) & dmask[None, :]
    tl.store(y + i_b.to(tl.int64) * s_yb + t[:, None] * s_yt + d[None, :] * s_yd, out.to(y.dtype.element_ty), mask=ym)

    if i_t == 0:
        # New tail: the last W-1 inputs of cat(state, x), reaching into the old state when T < W-1.
        j = tl.arange(0, BS)
        src = T - (W - 1) + j
        live = (j[:, None] < W - 1) & dmask[None, :]
        xv = tl.load(xb + src[:, None] * s_xt + d[None, :] * s_xd, mask=live & (src[:, None] >= 0), other=0.0)
        xv = xv.to(tl.float32)
        if HAS_STATE:
            ms = live & (src[:, None] < 0)
            sb = state + i_b.to(tl.int64) * s_sb
            tail = tl.load(sb + (W - 1 + src[:, None]) * s_ss + d[None, :] * s_sd, mask=ms, other=0.0)
            xv = tl.where(src[:, None] < 0, tail.to(tl.float32), xv)
        dst = new_state + (i_b.to(tl.int64) * D + d[None, :]) * (W - 1) + j[:, None]
        tl.store(dst, xv.to(new_state.dtype.element_ty), mask=live)


@triton.jit
def _conv_update_kernel(
    x, state, weight, bias, y,
    s_xb, s_xd, s_sb, s_sd, s_ss, s_wd, s_ww, s_yb, s_yd,
    D,
    W: tl.constexpr, BD: tl.constexpr, HAS_BIAS: tl.constexpr, SILU: tl.constexpr,
):
    i_d, i_b = tl.program_id(0), tl.program_id(1)
    d = i_d * BD + tl.arange(0, BD)
    dmask = d < D
    w_dtype = weight.dtype.element_ty
    sb = state + i_b.to(tl.int64) * s_sb + d * s_sd

    acc = tl.zeros((BD,), tl.float32)
    # Every [BD] vector here has the same layout, so each channel's tail is read and rewritten
    # by one thread: the in-place shift needs no barrier.
    newest = tl.load(x + i_b.to(tl.int64) * s_xb + d * s_xd, mask=dmask, other=0.0)
    for tap in tl.static_range(W - 1):
        xv = tl.load(sb + tap * s_ss, mask=dmask, other=0.0)
        acc += xv.to(tl.float32) * tl.load(weight + d * s_wd + tap * s_ww, mask=dmask, other=0.0).to(tl.float32)
        if tap > 0:
            tl.store(sb + (tap - 1) * s_ss, xv, mask=dmask)
    acc += newest.to(tl.float32) * tl.load(weight + d * s_wd + (W - 1) * s_ww, mask=dmask, other=0.0).to(tl.float32)
    if W > 1:
        tl.store(sb + (W - 2) * s_ss, newest.to(state.dtype.element_ty), mask=dmask)
    if HAS_BIAS:
        acc += tl.load(bias + d, mask=dmask, other=0.0).to(tl.float32)
    out = _finish(acc, w_dtype, SILU)
    tl.store(y + i_b.to(tl.int64) * s_yb + d * s_yd, out.to(y.dtype.element_ty), mask=dmask)


def _silu(activation: str | None) -> bool:
    if activation is None:
        return False
    if activation in ("silu", "swish"):
        return True
    raise ValueError(f"unsupported activation {activation!r}; expected 'silu', 'swish' or None")


def causal_conv1d_triton(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    *,
    conv_state: Tensor | None = None,
    activation: str | None = "silu",
) -> tuple[Tensor, Tensor]:
    """Contract of `causal_conv1d`: x `[B, D, T]` (any strides); weight `[D, W]`; bias `[D]`;
    conv_state `[B, D, W-1]` (zeros when None). Returns y `[B, D, T]` in x.dtype, laid out like x,
    and a new contiguous conv state `[B, D, W-1]` (dtype of conv_state, or of x when None).
    """
    _check(x, weight, bias, conv_state, step=False)
    silu = _silu(activation)
    batch, channels, length = x.shape
    width = weight.shape[1]
    state_dtype = x.dtype if conv_state is None else conv_state.dtype
    new_state = torch.empty(batch, channels, width - 1, dtype=state_dtype, device=x.device)
    if length == 0:
        if conv_state is None:
            new_state.zero_()
        else:
            new_state.copy_(conv_state)
        return x.clone(), new_state
    y = torch.empty_like(x)  # keeps x's layout: channels-contiguous when x is a transposed view
    bd = min(BLOCK_D, next_power_of_2(channels))
    grid = (triton.cdiv(length, BLOCK_T), triton.cdiv(channels, bd), batch)
    _conv_prefill_kernel[grid](
        x, weight, bias, conv_state, y, new_state,
        *x.stride(), *y.stride(), *(conv_state.stride() if conv_state is not None else (0, 0, 0)), *weight.stride(),
        channels, length,
        W=width, BS=next_power_of_2(max(width - 1, 1)), BT=BLOCK_T, BD=bd,
        HAS_BIAS=bias is not None, HAS_STATE=conv_state is not None, SILU=silu, num_warps=4,
    )
    return y, new_state


def causal_conv1d_update_triton(
    x: Tensor,
    conv_state: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    activation: str | None = "silu",
) -> Tensor:
    """Contract of `causal_conv1d_update`: x `[B, D]`; conv_state `[B, D, W-1]`, shifted in
    place; weight `[D, W]`; bias `[D]`. Returns `[B, D]` in x.dtype."""
    _check(x, weight, bias, conv_state, step=True)
    silu = _silu(activation)
    batch, channels = x.shape
    width = weight.shape[1]
    y = torch.empty(batch, channels, dtype=x.dtype, device=x.device)
    bd = min(BLOCK_D, next_power_of_2(channels))
    _conv_update_kernel[(triton.cdiv(channels, bd), batch)](
        x, conv_state, weight, bias, y,
        *x.stride(), *conv_state.stride(), *weight.stride(), *y.stride(),
        channels,
        W=width, BD=bd, HAS_BIAS=bias is not None, SILU=silu, num_warps=4,
    )
    return y
