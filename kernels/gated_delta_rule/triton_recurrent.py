"""Recurrent gated delta rule in Triton: decode steps and short prompts.

One program owns a `[K, BV]` slice of one value head's state and walks the tokens of its
sequence: the state is read once and written once, whatever T is, so a decode step moves
`8 K V` bytes per value head (read + write, fp32) plus the tiny q/k/v rows. The q/k L2 norms
and, in the fused-gate entry point, `g = -exp(A_log) softplus(a + dt_bias)` and
`beta = sigmoid(b)` are computed in registers from the raw projections.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..triton_utils import block_size, check_head_dim
from .utils import L2NORM_EPS, check_inputs

# Below this many (sequence, value head, value block) programs at BV = 32, narrower 16-wide
# blocks are used so that a B = 1 decode still spreads over the SMs (132 on H100).
MIN_PROGRAMS = 256


@triton.jit
def _softplus(x):
    """torch's softplus (threshold 20) as max(x, 0) + log1p(exp(-|x|)); log1p via the
    `log(u) * e / (u - 1)` correction, since libdevice calls do not run under the interpreter."""
    e = tl.exp(-tl.abs(x))
    u = 1.0 + e
    exact = u == 1.0  # e below half an ulp of 1: log1p(e) = e
    log1p_e = tl.where(exact, e, tl.log(u) * e / tl.where(exact, 1.0, u - 1.0))
    return tl.where(x > 20.0, x, tl.maximum(x, 0.0) + log1p_e)


@triton.jit
def _recurrent_kernel(
    q, k, v, g_or_a, beta_or_b, a_log, dt_bias, o, h0, ht, cu_seqlens,
    s_qb, s_qt, s_qh, s_kb, s_kt, s_kh, s_vb, s_vt, s_vh, s_gb, s_gt, s_gh, s_bb, s_bt, s_bh,
    T, scale,
    H: tl.constexpr, HV: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    USE_L2: tl.constexpr, FUSED_GATES: tl.constexpr, HAS_H0: tl.constexpr, STORE_FINAL: tl.constexpr,
    IS_VARLEN: tl.constexpr, EPS: tl.constexpr,
):
    i_nh, i_v = tl.program_id(0), tl.program_id(1)
    i_n, i_hv = i_nh // HV, i_nh % HV
    i_h = i_hv // (HV // H)
    if IS_VARLEN:
        bos = tl.load(cu_seqlens + i_n).to(tl.int64)
        eos = tl.load(cu_seqlens + i_n + 1).to(tl.int64)
        batch = bos * 0  # packed sequences live in batch row 0 at token offsets bos..eos
    else:
        batch = i_n.to(tl.int64)
        bos = batch * 0  # int64, so token offsets times strides cannot overflow
        eos = bos + T
    out_row0 = batch * T  # o is a contiguous [B, T, HV, V]

    ck = tl.arange(0, BK)
    cv = i_v * BV + tl.arange(0, BV)
    kmask = ck < K
    vmask = cv < V
    sm = kmask[:, None] & vmask[None, :]
    state_offsets = (i_n.to(tl.int64) * HV + i_hv) * K * V + ck[:, None] * V + cv[None, :]
    if HAS_H0:
        s = tl.load(h0 + state_offsets, mask=sm, other=0.0)
    else:
        s = tl.zeros((BK, BV), tl.float32)
    if FUSED_GATES:
        decay_rate = tl.exp(tl.load(a_log + i_hv).to(tl.float32))
        bias = tl.load(dt_bias + i_hv).to(tl.float32)

    for t in range(bos, eos):
        qt = tl.load(q + batch * s_qb + t * s_qt + i_h * s_qh + ck, mask=kmask, other=0.0).to(tl.float32)
        kt = tl.load(k + batch * s_kb + t * s_kt + i_h * s_kh + ck, mask=kmask, other=0.0).to(tl.float32)
        vt = tl.load(v + batch * s_vb + t * s_vt + i_hv * s_vh + cv, mask=vmask, other=0.0).to(tl.float32)
        gate = tl.load(g_or_a + batch * s_gb + t * s_gt + i_hv * s_gh).to(tl.float32)
        write = tl.load(beta_or_b + batch * s_bb + t * s_bt + i_hv * s_bh).to(tl.float32)
        if FUSED_GATES:
            gate = -decay_rate * _softplus(gate + bias)
            # The model computes sigmoid(b) in b's dtype: round the same way.
            write = tl.sigmoid(write).to(beta_or_b.dtype.element_ty).to(tl.float32)
        if USE_L2:
            qt = qt * tl.rsqrt(tl.sum(qt * qt, 0) + EPS)
            kt = kt * tl.rsqrt(tl.sum(kt * kt, 0) + EPS)
        qt = qt * scale

        s = s * tl.exp(gate)
        predicted = tl.sum(s * kt[:, None], 0)
        update = write * (vt - predicted)
        s = s + kt[:, None] * update[None, :]
        out = tl.sum(s * qt[:, None], 0)
        tl.store(o + ((out_row0 + t) * HV + i_hv) * V + cv, out.to(o.dtype.element_ty), mask=vmask)

    if STORE_FINAL:
        tl.store(ht + state_offsets, s, mask=sm)


def _strides3(x: Tensor) -> tuple[int, int, int]:
    """(batch, token, head) strides of a `[B, T, heads, ...]` tensor."""
    return x.stride(0), x.stride(1), x.stride(2)


def _launch(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    gate: Tensor,
    write: Tensor,
    a_log: Tensor | None,
    dt_bias: Tensor | None,
    *,
    scale: float | None,
    initial_state: Tensor | None,
    output_final_state: bool,
    use_qk_l2norm: bool,
    state_out: Tensor | None,
    cu_seqlens: Tensor | None,
) -> tuple[Tensor, Tensor | None]:
    dims = check_inputs(q, k, v, gate, write, None)
    batch, length, key_heads, key_dim = q.shape
    heads, value_dim = dims.value_heads, dims.value_dim
    check_head_dim("K", key_dim)
    check_head_dim("V", value_dim)
    if cu_seqlens is not None and batch != 1:
        raise ValueError(f"cu_seqlens needs the sequences packed into B = 1, got B = {batch}")
    num_seqs = batch if cu_seqlens is None else cu_seqlens.numel() - 1
    state_shape = (num_seqs, heads, key_dim, value_dim)
    if initial_state is not None and tuple(initial_state.shape) != state_shape:
        raise ValueError(f"initial_state must be {state_shape}, got {tuple(initial_state.shape)}")
    if state_out is not None and (
        tuple(state_out.shape) != state_shape or state_out.dtype != torch.float32 or not state_out.is_contiguous()
    ):
        raise ValueError(f"state_out must be a contiguous fp32 tensor of shape {state_shape}")
    if scale is None:
        scale = key_dim**-0.5

    h0 = None
    if initial_state is not None:
        # The kernel reads each state tile before writing it, so h0 may be state_out itself.
        h0 = initial_state.to(dtype=torch.float32, memory_format=torch.contiguous_format)
    final = state_out
    if final is None and output_final_state:
        final = torch.empty(state_shape, dtype=torch.float32, device=q.device)
    out = torch.empty(v.shape, dtype=v.dtype, device=q.device)

    q, k, v = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, k, v))
    if cu_seqlens is not None:
        cu_seqlens = cu_seqlens.to(device=q.device, dtype=torch.int32)
    bk, bv = block_size(key_dim), block_size(value_dim, minimum=16)
    bv = min(bv, 32 if num_seqs * heads * triton.cdiv(value_dim, 32) >= MIN_PROGRAMS else 16)
    # (sequence, head) on the first grid axis: a large decode batch exceeds the others' 65535 cap.
    _recurrent_kernel[(num_seqs * heads, triton.cdiv(value_dim, bv))](
        q, k, v, gate, write, a_log, dt_bias, out, h0, final, cu_seqlens,
        *_strides3(q), *_strides3(k), *_strides3(v), *_strides3(gate), *_strides3(write),
        length, scale,
        H=key_heads, HV=heads, K=key_dim, V=value_dim, BK=bk, BV=bv,
        USE_L2=use_qk_l2norm, FUSED_GATES=a_log is not None, HAS_H0=h0 is not None, STORE_FINAL=final is not None,
        IS_VARLEN=cu_seqlens is not None, EPS=L2NORM_EPS,
        num_warps=4 if bk * bv >= 4096 else 2,
    )
    return out, (final if output_final_state else None)


def recurrent_gated_delta_rule_triton(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    g: Tensor,
    beta: Tensor,
    *,
    scale: float | None = None,
    initial_state: Tensor | None = None,
    output_final_state: bool = True,
    use_qk_l2norm: bool = True,
    state_out: Tensor | None = None,
    cu_seqlens: Tensor | None = None,
) -> tuple[Tensor, Tensor | None]:
    """Per-token gated delta rule; contract of `recurrent_gated_delta_rule` plus variable lengths.

    q, k: `[B, T, H, K]`; v: `[B, T, HV, V]`; g, beta: `[B, T, HV]` (any strides, unit stride in
    the last dim of q, k, v preferred: others are copied); initial_state: `[N, HV, K, V]`;
    state_out: contiguous fp32 `[N, HV, K, V]` receiving the final state (may be initial_state
    itself: an in-place decode step); cu_seqlens: int `[N + 1]` offsets of sequences packed in
    T (B = 1). Returns o `[B, T, HV, V]` in v.dtype and the final state fp32 (or None).
    """
    return _launch(
        q, k, v, g, beta, None, None,
        scale=scale, initial_state=initial_state, output_final_state=output_final_state,
        use_qk_l2norm=use_qk_l2norm, state_out=state_out, cu_seqlens=cu_seqlens,
    )


def recurrent_gated_delta_rule_from_gates_triton(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    a: Tensor,
    b: Tensor,
    A_log: Tensor,
    dt_bias: Tensor,
    *,
    scale: float | None = None,
    initial_state: Tensor | None = None,
    output_final_state: bool = True,
    use_qk_l2norm: bool = True,
    state_out: Tensor | None = None,
    cu_seqlens: Tensor | None = None,
) -> tuple[Tensor, Tensor | None]:
    """As `recurrent_gated_delta_rule_triton`, with the gates computed in the kernel.

    a, b: raw `[B, T, HV]` projections; A_log, dt_bias: `[HV]`. Equivalent to passing
    `g = -exp(A_log) * softplus(a + dt_bias)` (fp32) and `beta = sigmoid(b)` (in b.dtype), as
    Gated DeltaNet computes them.
    """
    heads = v.shape[2]
    if A_log.shape != (heads,) or dt_bias.shape != (heads,):
        raise ValueError(f"A_log and dt_bias must be [{heads}], got {tuple(A_log.shape)} and {tuple(dt_bias.shape)}")
    return _launch(
        q, k, v, a, b, A_log.contiguous(), dt_bias.contiguous(),
        scale=scale, initial_state=initial_state, output_final_state=output_final_state,
        use_qk_l2norm=use_qk_l2norm, state_out=state_out, cu_seqlens=cu_seqlens,
    )
