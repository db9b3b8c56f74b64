"""Chunked gated delta rule forward (prefill) in Triton.

Same algebra as `chunk.py` (see its docstring for the WY form), split into four kernels over
64-token chunks. With gamma the chunk-local cumulative log-decay, k^ and q^ the L2-normalised
keys and queries, and S the state entering a chunk:

1. `_inverse_kernel`, one program per (chunk, value head): A = beta D K^K^T (strictly lower,
   built as 16x16 blocks), T = (I + A)^-1 by recursive doubling inside the four diagonal
   blocks and block forward substitution across them; also writes gamma.
2. `_wy_kernel`, same grid: W = T (beta V) and Kc = T (beta exp(gamma) K^).
3. `_state_kernel`, one program per (sequence, value head, value block), sequential over the
   chunks of its sequence: stores each chunk's entry state, U = W - Kc S, and
   S <- exp(gamma_last) S + (exp(gamma_last - gamma) K^)^T U.
4. `_output_kernel`, one program per (chunk, value block, value head):
   O = exp(gamma) Q^ S + (D * Q^ K^^T) U.

Only kernel 3 is sequential; it does two small matmuls per chunk, so prefill time is
dominated by kernels 1, 2 and 4, which run fully parallel. Raw q and k feed the matmuls and the
L2 norms are applied as row scales of the products. Every matmul takes fp32 operands: with
half-precision inputs they run as TF32 on tensor cores, which holds bf16 inputs exactly and
rounds the fp32 intermediates (T, W, Kc, U, states) to 10 mantissa bits instead of bf16's 7;
with fp32 inputs they are exact IEEE products. Accumulation and all stored intermediates are fp32.

Intermediate memory per token and value head is 4 * (65 + 2V + K) bytes plus one fp32 state
per chunk and value head: about 12 GiB at T = 128K with HV = 32, K = V = 128.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..triton_utils import block_size, check_head_dim, dot_precision
from .utils import L2NORM_EPS, check_inputs

CHUNK = 64  # tokens per chunk: four 16-row blocks in the triangular inverse
# Value-block widths: the state kernel is latency-bound, so narrower blocks mean more programs
# (B * HV * V / 32 = 128 at B = 1 on 132 SMs); the output kernel reuses Q K^T across a wider block.
STATE_BLOCK_V = 32
OUTPUT_BLOCK_V = 64


@triton.jit
def _chunk_span(i_c, cu_seqlens, chunk_indices, T, NT, IS_VARLEN: tl.constexpr):
    """(bos, eos, first token) of global chunk i_c, in flattened token indices (int64)."""
    if IS_VARLEN:
        i_n = tl.load(chunk_indices + 2 * i_c).to(tl.int64)
        c = tl.load(chunk_indices + 2 * i_c + 1).to(tl.int64)
        bos = tl.load(cu_seqlens + i_n).to(tl.int64)
        eos = tl.load(cu_seqlens + i_n + 1).to(tl.int64)
    else:
        i_n = (i_c // NT).to(tl.int64)
        c = (i_c % NT).to(tl.int64)
        bos = i_n * T
        eos = bos + T
    return bos, eos, bos + c * 64


@triton.jit
def _inv_norm(x, USE_L2: tl.constexpr, EPS: tl.constexpr):
    """Per-row `1 / sqrt(sum(x^2) + eps)` of an fp32 `[rows, BK]` tile (ones without the norm)."""
    if USE_L2:
        return tl.rsqrt(tl.sum(x * x, 1) + EPS)
    else:
        return tl.full((x.shape[0],), 1.0, tl.float32)


@triton.jit
def _key_block(k, g, beta, t0, eos, i_h, i_hv, H: tl.constexpr, HV: tl.constexpr, K: tl.constexpr,
               BK: tl.constexpr, USE_L2: tl.constexpr, EPS: tl.constexpr):
    """16 rows from t0: raw keys `[16, BK]`, key inverse norms, log-decays and betas `[16]`."""
    rows = t0 + tl.arange(0, 16)
    cols = tl.arange(0, BK)
    live = rows < eos
    kb = tl.load(k + (rows[:, None] * H + i_h) * K + cols[None, :], mask=live[:, None] & (cols[None, :] < K), other=0.0)
    rk = _inv_norm(kb.to(tl.float32), USE_L2, EPS)
    gb = tl.load(g + rows * HV + i_hv, mask=live, other=0.0).to(tl.float32)
    bb = tl.load(beta + rows * HV + i_hv, mask=live, other=0.0).to(tl.float32)
    return kb, rk, gb, bb


@triton.jit
def _a_block(ki, kj, ri, rj, gi, gj, bi, DIAG: tl.constexpr, DOT: tl.constexpr):
    """Block (i, j) of A = beta D K^ K^^T: `[16, 16]`, strictly lower when DIAG."""
    s = tl.dot(ki.to(tl.float32), tl.trans(kj.to(tl.float32)), input_precision=DOT)
    s = s * (bi * ri)[:, None] * rj[None, :]
    if DIAG:
        r = tl.arange(0, 16)
        lower = r[:, None] > r[None, :]
        # Mask the exponent too: above the diagonal gamma_i - gamma_j > 0 and exp may overflow.
        s = tl.where(lower, s * tl.exp(tl.where(lower, gi[:, None] - gj[None, :], 0.0)), 0.0)
    else:
        s = s * tl.exp(gi[:, None] - gj[None, :])
    return s


@triton.jit
def _unit_lower_inverse_16(a):
    """`(I + a)^-1` of a strictly lower `[16, 16]` block by recursive doubling.

    With T the inverse of the block-diagonal part of I + a at block size b, the inverse at
    size 2b is T - T a' T, a' being a restricted to the lower-left b x b corner of each 2b
    block: four levels of two small products, no per-row reductions.
    """
    r = tl.arange(0, 16)
    lower = r[:, None] > r[None, :]
    t = tl.where(r[:, None] == r[None, :], 1.0, 0.0)
    for level in tl.static_range(4):
        size = 1 << level
        corner = lower & ((r[:, None] // (2 * size)) == (r[None, :] // (2 * size)))
        corner = corner & ((r[:, None] // size) != (r[None, :] // size))
        step = tl.dot(tl.where(corner, a, 0.0), t, input_precision="ieee")
        t = t - tl.dot(t, step, input_precision="ieee")
    return t


@triton.jit
def _store_block_row(ptr, t0, eos, i_hv, bi, b0, b1, b2, b3, HV: tl.constexpr):
    """Write row block bi (four `[16, 16]` blocks) of a chunk's `[64, 64]` matrix into `[tokens, HV, 64]`."""
    r = tl.arange(0, 16)
    rows = t0 + bi * 16 + r
    base = ptr + (rows[:, None] * HV + i_hv) * 64 + r[None, :]
    live = (rows < eos)[:, None]
    tl.store(base, b0, mask=live)
    tl.store(base + 16, b1, mask=live)
    tl.store(base + 32, b2, mask=live)
    tl.store(base + 48, b3, mask=live)


@triton.jit
def _inverse_kernel(
    k, g, beta, gcum, ainv, cu_seqlens, chunk_indices, T, NT,
    H: tl.constexpr, HV: tl.constexpr, K: tl.constexpr, BK: tl.constexpr,
    USE_L2: tl.constexpr, IS_VARLEN: tl.constexpr, EPS: tl.constexpr, DOT: tl.constexpr,
):
    i_c, i_hv = tl.program_id(0), tl.program_id(1)
    i_h = i_hv // (HV // H)
    bos, eos, t0 = _chunk_span(i_c, cu_seqlens, chunk_indices, T, NT, IS_VARLEN)

    k0, r0, g0, b0 = _key_block(k, g, beta, t0, eos, i_h, i_hv, H, HV, K, BK, USE_L2, EPS)
    k1, r1, g1, b1 = _key_block(k, g, beta, t0 + 16, eos, i_h, i_hv, H, HV, K, BK, USE_L2, EPS)
    k2, r2, g2, b2 = _key_block(k, g, beta, t0 + 32, eos, i_h, i_hv, H, HV, K, BK, USE_L2, EPS)
    k3, r3, g3, b3 = _key_block(k, g, beta, t0 + 48, eos, i_h, i_hv, H, HV, K, BK, USE_L2, EPS)
    # Chunk-local cumulative decay; padded rows carry g = 0, beta = 0 and zero keys.
    e0 = tl.sum(g0, 0)
    e1 = e0 + tl.sum(g1, 0)
    e2 = e1 + tl.sum(g2, 0)
    c0 = tl.cumsum(g0, 0)
    c1 = tl.cumsum(g1, 0) + e0
    c2 = tl.cumsum(g2, 0) + e1
    c3 = tl.cumsum(g3, 0) + e2
    rows = t0 + tl.arange(0, 16)
    tl.store(gcum + rows * HV + i_hv, c0, mask=rows < eos)
    tl.store(gcum + (rows + 16) * HV + i_hv, c1, mask=rows + 16 < eos)
    tl.store(gcum + (rows + 32) * HV + i_hv, c2, mask=rows + 32 < eos)
    tl.store(gcum + (rows + 48) * HV + i_hv, c3, mask=rows + 48 < eos)

    a00 = _a_block(k0, k0, r0, r0, c0, c0, b0, True, DOT)
    a11 = _a_block(k1, k1, r1, r1, c1, c1, b1, True, DOT)
    a22 = _a_block(k2, k2, r2, r2, c2, c2, b2, True, DOT)
    a33 = _a_block(k3, k3, r3, r3, c3, c3, b3, True, DOT)
    a10 = _a_block(k1, k0, r1, r0, c1, c0, b1, False, DOT)
    a20 = _a_block(k2, k0, r2, r0, c2, c0, b2, False, DOT)
    a21 = _a_block(k2, k1, r2, r1, c2, c1, b2, False, DOT)
    a30 = _a_block(k3, k0, r3, r0, c3, c0, b3, False, DOT)
    a31 = _a_block(k3, k1, r3, r1, c3, c1, b3, False, DOT)
    a32 = _a_block(k3, k2, r3, r2, c3, c2, b3, False, DOT)

    t00 = _unit_lower_inverse_16(a00)
    t11 = _unit_lower_inverse_16(a11)
    t22 = _unit_lower_inverse_16(a22)
    t33 = _unit_lower_inverse_16(a33)
    # Block forward substitution: T_ij = -T_ii sum_{j <= m < i} A_im T_mj. These 16x16 products
    # are few and tiny, so they stay in IEEE fp32 whatever the input dtype.
    t10 = -tl.dot(t11, tl.dot(a10, t00, input_precision="ieee"), input_precision="ieee")
    t21 = -tl.dot(t22, tl.dot(a21, t11, input_precision="ieee"), input_precision="ieee")
    t32 = -tl.dot(t33, tl.dot(a32, t22, input_precision="ieee"), input_precision="ieee")
    s20 = tl.dot(a20, t00, input_precision="ieee") + tl.dot(a21, t10, input_precision="ieee")
    t20 = -tl.dot(t22, s20, input_precision="ieee")
    s31 = tl.dot(a31, t11, input_precision="ieee") + tl.dot(a32, t21, input_precision="ieee")
    t31 = -tl.dot(t33, s31, input_precision="ieee")
    s30 = (
        tl.dot(a30, t00, input_precision="ieee")
        + tl.dot(a31, t10, input_precision="ieee")
        + tl.dot(a32, t20, input_precision="ieee")
    )
    t30 = -tl.dot(t33, s30, input_precision="ieee")

    zero = tl.zeros((16, 16), tl.float32)
    _store_block_row(ainv, t0, eos, i_hv, 0, t00, zero, zero, zero, HV)
    _store_block_row(ainv, t0, eos, i_hv, 1, t10, t11, zero, zero, HV)
    _store_block_row(ainv, t0, eos, i_hv, 2, t20, t21, t22, zero, HV)
    _store_block_row(ainv, t0, eos, i_hv, 3, t30, t31, t32, t33, HV)


@triton.jit
def _wy_kernel(
    k, v, beta, gcum, ainv, w, kc, cu_seqlens, chunk_indices, T, NT,
    H: tl.constexpr, HV: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    USE_L2: tl.constexpr, IS_VARLEN: tl.constexpr, EPS: tl.constexpr, DOT: tl.constexpr,
):
    i_c, i_hv = tl.program_id(0), tl.program_id(1)
    i_h = i_hv // (HV // H)
    bos, eos, t0 = _chunk_span(i_c, cu_seqlens, chunk_indices, T, NT, IS_VARLEN)
    rows = t0 + tl.arange(0, 64)
    live = rows < eos
    cols64 = tl.arange(0, 64)
    ck = tl.arange(0, BK)
    cv = tl.arange(0, BV)

    t = tl.load(ainv + (rows[:, None] * HV + i_hv) * 64 + cols64[None, :], mask=live[:, None], other=0.0)
    b = tl.load(beta + rows * HV + i_hv, mask=live, other=0.0).to(tl.float32)
    gam = tl.load(gcum + rows * HV + i_hv, mask=live, other=0.0)

    vm = live[:, None] & (cv[None, :] < V)
    vt = tl.load(v + (rows[:, None] * HV + i_hv) * V + cv[None, :], mask=vm, other=0.0).to(tl.float32)
    wt = tl.dot(t, vt * b[:, None], input_precision=DOT)
    tl.store(w + (rows[:, None] * HV + i_hv) * V + cv[None, :], wt, mask=vm)

    km = live[:, None] & (ck[None, :] < K)
    kt = tl.load(k + (rows[:, None] * H + i_h) * K + ck[None, :], mask=km, other=0.0).to(tl.float32)
    row_scale = b * _inv_norm(kt, USE_L2, EPS) * tl.exp(gam)
    kct = tl.dot(t, kt * row_scale[:, None], input_precision=DOT)
    tl.store(kc + (rows[:, None] * HV + i_hv) * K + ck[None, :], kct, mask=km)


@triton.jit
def _state_kernel(
    k, gcum, w, kc, u, h, h0, ht, cu_seqlens, chunk_offsets, T, NT,
    H: tl.constexpr, HV: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    USE_L2: tl.constexpr, HAS_H0: tl.constexpr, STORE_FINAL: tl.constexpr, IS_VARLEN: tl.constexpr,
    EPS: tl.constexpr, DOT: tl.constexpr,
):
    i_nh, i_v = tl.program_id(0), tl.program_id(1)
    i_n, i_hv = i_nh // HV, i_nh % HV
    i_h = i_hv // (HV // H)
    if IS_VARLEN:
        bos = tl.load(cu_seqlens + i_n).to(tl.int64)
        eos = tl.load(cu_seqlens + i_n + 1).to(tl.int64)
        first_chunk = tl.load(chunk_offsets + i_n).to(tl.int64)
    else:
        bos = i_n.to(tl.int64) * T
        eos = bos + T
        first_chunk = i_n.to(tl.int64) * NT
    num_chunks = tl.cdiv(eos - bos, 64)

    ck = tl.arange(0, BK)
    cv = i_v * BV + tl.arange(0, BV)
    sm = (ck[:, None] < K) & (cv[None, :] < V)
    state_offsets = ck[:, None] * V + cv[None, :]
    if HAS_H0:
        s = tl.load(h0 + (i_n.to(tl.int64) * HV + i_hv) * K * V + state_offsets, mask=sm, other=0.0)
    else:
        s = tl.zeros((BK, BV), tl.float32)

    for c in range(num_chunks):
        tl.store(h + ((first_chunk + c) * HV + i_hv) * K * V + state_offsets, s, mask=sm)
        t0 = bos + c * 64
        rows = t0 + tl.arange(0, 64)
        live = rows < eos
        km = live[:, None] & (ck[None, :] < K)
        vm = live[:, None] & (cv[None, :] < V)
        kct = tl.load(kc + (rows[:, None] * HV + i_hv) * K + ck[None, :], mask=km, other=0.0)
        wt = tl.load(w + (rows[:, None] * HV + i_hv) * V + cv[None, :], mask=vm, other=0.0)
        ut = wt - tl.dot(kct, s, input_precision=DOT)
        tl.store(u + (rows[:, None] * HV + i_hv) * V + cv[None, :], ut, mask=vm)

        kt = tl.load(k + (rows[:, None] * H + i_h) * K + ck[None, :], mask=km, other=0.0).to(tl.float32)
        gam = tl.load(gcum + rows * HV + i_hv, mask=live, other=0.0)
        last = tl.minimum(t0 + 64, eos) - 1
        gam_last = tl.load(gcum + last * HV + i_hv)
        # Fold the key norm and the decay to the chunk end into U's rows, so raw k is the operand.
        row_scale = _inv_norm(kt, USE_L2, EPS) * tl.exp(gam_last - gam)
        row_scale = tl.where(live, row_scale, 0.0)
        s = s * tl.exp(gam_last) + tl.dot(tl.trans(kt), ut * row_scale[:, None], input_precision=DOT)

    if STORE_FINAL:
        tl.store(ht + (i_n.to(tl.int64) * HV + i_hv) * K * V + state_offsets, s, mask=sm)


@triton.jit
def _output_kernel(
    q, k, gcum, u, h, o, cu_seqlens, chunk_indices, T, NT, scale,
    H: tl.constexpr, HV: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    USE_L2: tl.constexpr, IS_VARLEN: tl.constexpr, EPS: tl.constexpr, DOT: tl.constexpr,
):
    i_c, i_v, i_hv = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_h = i_hv // (HV // H)
    bos, eos, t0 = _chunk_span(i_c, cu_seqlens, chunk_indices, T, NT, IS_VARLEN)
    r = tl.arange(0, 64)
    rows = t0 + r
    live = rows < eos
    ck = tl.arange(0, BK)
    cv = i_v * BV + tl.arange(0, BV)
    km = live[:, None] & (ck[None, :] < K)
    vm = live[:, None] & (cv[None, :] < V)

    qt = tl.load(q + (rows[:, None] * H + i_h) * K + ck[None, :], mask=km, other=0.0).to(tl.float32)
    kt = tl.load(k + (rows[:, None] * H + i_h) * K + ck[None, :], mask=km, other=0.0).to(tl.float32)
    gam = tl.load(gcum + rows * HV + i_hv, mask=live, other=0.0)
    rq = _inv_norm(qt, USE_L2, EPS) * scale
    rk = _inv_norm(kt, USE_L2, EPS)
    state = tl.load(
        h + (i_c.to(tl.int64) * HV + i_hv) * K * V + ck[:, None] * V + cv[None, :],
        mask=(ck[:, None] < K) & (cv[None, :] < V),
        other=0.0,
    )
    out = tl.dot(qt, state, input_precision=DOT) * (rq * tl.exp(gam))[:, None]

    causal = (r[:, None] >= r[None, :]) & live[:, None]
    decay = tl.exp(tl.where(causal, gam[:, None] - gam[None, :], 0.0))
    scores = tl.dot(qt, tl.trans(kt), input_precision=DOT)
    scores = tl.where(causal, scores * decay * rq[:, None] * rk[None, :], 0.0)
    ut = tl.load(u + (rows[:, None] * HV + i_hv) * V + cv[None, :], mask=vm, other=0.0)
    out += tl.dot(scores, ut, input_precision=DOT)
    tl.store(o + (rows[:, None] * HV + i_hv) * V + cv[None, :], out.to(o.dtype.element_ty), mask=vm)


def _varlen_chunks(cu_seqlens: Tensor, device: torch.device) -> tuple[Tensor, Tensor, int]:
    """(chunk_indices `[N_chunks, 2]` = (sequence, chunk in it), chunk_offsets `[N + 1]`, N_chunks).

    Needs the offsets on the host (one sync): the grid size depends on them.
    """
    offsets = cu_seqlens.detach().to("cpu", torch.int64)
    counts = ((offsets[1:] - offsets[:-1]) + CHUNK - 1) // CHUNK
    chunk_offsets = torch.zeros(len(counts) + 1, dtype=torch.int64)
    chunk_offsets[1:] = counts.cumsum(0)
    total = int(chunk_offsets[-1])
    seq = torch.repeat_interleave(torch.arange(len(counts)), counts)
    within = torch.arange(total) - chunk_offsets[:-1].repeat_interleave(counts)
    indices = torch.stack([seq, within], dim=1).to(torch.int32)
    return indices.to(device), chunk_offsets.to(device=device, dtype=torch.int32), total


def chunk_gated_delta_rule_triton(
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
    cu_seqlens: Tensor | None = None,
) -> tuple[Tensor, Tensor | None]:
    """Chunked gated delta rule; contract of `chunk_gated_delta_rule` plus variable lengths.

    q, k: `[B, T, H, K]`; v: `[B, T, HV, V]`; g (log-decay), beta: `[B, T, HV]`;
    initial_state: `[N, HV, K, V]` with N = B, or the number of sequences with cu_seqlens;
    cu_seqlens: int `[N + 1]` token offsets of N sequences packed in T (then B must be 1).
    Returns o `[B, T, HV, V]` in v.dtype and the final states `[N, HV, K, V]` fp32 (or None).
    K, V <= 256. Works on CUDA tensors, and on CPU tensors under `TRITON_INTERPRET=1`.
    """
    dims = check_inputs(q, k, v, g, beta, None)
    batch, length, key_heads, key_dim = q.shape
    heads, value_dim = dims.value_heads, dims.value_dim
    check_head_dim("K", key_dim)
    check_head_dim("V", value_dim)
    if cu_seqlens is not None:
        if batch != 1:
            raise ValueError(f"cu_seqlens needs the sequences packed into B = 1, got B = {batch}")
        num_seqs = cu_seqlens.numel() - 1
    else:
        num_seqs = batch
    state_shape = (num_seqs, heads, key_dim, value_dim)
    if initial_state is not None and tuple(initial_state.shape) != state_shape:
        raise ValueError(f"initial_state must be {state_shape}, got {tuple(initial_state.shape)}")
    if scale is None:
        scale = key_dim**-0.5

    device = q.device
    out = torch.empty(v.shape, dtype=v.dtype, device=device)
    final = torch.empty(state_shape, dtype=torch.float32, device=device) if output_final_state else None
    tokens = batch * length
    if tokens == 0:
        if final is not None and initial_state is not None:
            final.copy_(initial_state)
        elif final is not None:
            final.zero_()
        return out, final

    qf = q.reshape(tokens, key_heads, key_dim).contiguous()
    kf = k.reshape(tokens, key_heads, key_dim).contiguous()
    vf = v.reshape(tokens, heads, value_dim).contiguous()
    gf = g.reshape(tokens, heads).contiguous()
    bf = beta.reshape(tokens, heads).contiguous()
    h0 = None
    if initial_state is not None:
        h0 = initial_state.to(dtype=torch.float32, memory_format=torch.contiguous_format)

    if cu_seqlens is not None:
        chunk_indices, chunk_offsets, num_chunks = _varlen_chunks(cu_seqlens, device)
        cu = cu_seqlens.to(device=device, dtype=torch.int32)
        per_seq = 0
    else:
        per_seq = math.ceil(length / CHUNK)
        num_chunks = batch * per_seq
        chunk_indices = chunk_offsets = cu = None

    f32 = dict(dtype=torch.float32, device=device)
    gcum = torch.empty(tokens, heads, **f32)
    ainv = torch.empty(tokens, heads, CHUNK, **f32)
    w = torch.empty(tokens, heads, value_dim, **f32)
    kc = torch.empty(tokens, heads, key_dim, **f32)
    u = torch.empty(tokens, heads, value_dim, **f32)
    states = torch.empty(num_chunks, heads, key_dim, value_dim, **f32)

    bk, bv_full = block_size(key_dim), block_size(value_dim)
    common = dict(
        H=key_heads, HV=heads, K=key_dim, USE_L2=use_qk_l2norm, IS_VARLEN=cu_seqlens is not None,
        EPS=L2NORM_EPS, DOT=dot_precision(q.dtype),
    )
    _inverse_kernel[(num_chunks, heads)](
        kf, gf, bf, gcum, ainv, cu, chunk_indices, length, per_seq, BK=bk, **common, num_warps=4
    )
    _wy_kernel[(num_chunks, heads)](
        kf, vf, bf, gcum, ainv, w, kc, cu, chunk_indices, length, per_seq,
        V=value_dim, BK=bk, BV=bv_full, **common, num_warps=8,
    )
    state_bv = min(STATE_BLOCK_V, bv_full)
    _state_kernel[(num_seqs * heads, triton.cdiv(value_dim, state_bv))](
        kf, gcum, w, kc, u, states, h0, final, cu, chunk_offsets, length, per_seq,
        V=value_dim, BK=bk, BV=state_bv, HAS_H0=h0 is not None, STORE_FINAL=final is not None,
        **common, num_warps=4, num_stages=2,
    )
    out_bv = min(OUTPUT_BLOCK_V, bv_full)
    # Chunks on the first grid axis: the others are capped at 65535 programs.
    _output_kernel[(num_chunks, triton.cdiv(value_dim, out_bv), heads)](
        qf, kf, gcum, u, states, out, cu, chunk_indices, length, per_seq, scale,
        V=value_dim, BK=bk, BV=out_bv, **common, num_warps=4,
    )
    return out, final
