"""Chunked gated delta rule for prefill.

Within a chunk of C tokens (positions i, j; S0 the state entering the chunk; gamma_i the
inclusive cumulative log-decay from the chunk start; D[i, j] = exp(gamma_i - gamma_j) for
j <= i, else 0) the per-token recurrence unrolls to the WY / UT-transform form

    A[i, j] = beta_i D[i, j] k_i.k_j  (j < i),   T = (I + A)^-1
    W  = T (beta V),   Kc = T (beta exp(gamma) K)
    U  = W - Kc S0                                   (the delta-rule corrections)
    S1 = exp(gamma_last) S0 + (D[last, :] K)^T U
    O  = exp(gamma) Q S0 + (D * Q K^T) U

W, Kc and every `[C, C]` matrix are built for all chunks at once with batched matmuls and one
batched triangular solve. The loop over chunks only carries the state (U and S1: two small
matmuls per chunk); the outputs then come from batched matmuls against the stacked U and
chunk-entry states. All math is fp32 and no `[T, T]` matrix is formed.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from .utils import check_inputs, initial_state_fp32, prepare_qk

# Tokens per pass: the per-chunk intermediates ([C, C] decay and score matrices, stacked
# states, corrections) take an order of magnitude more memory than v in fp32, so long inputs
# are cut into passes to bound the peak; a pass boundary costs a few tensor ops.
MAX_TOKENS_PER_PASS = 4096


def _chunks(x: Tensor, num_chunks: int, chunk_size: int) -> Tensor:
    """`[B, T, *heads, D]` -> zero-padded `[N, B, *heads, C, D]` contiguous."""
    batch, length = x.shape[:2]
    padded = num_chunks * chunk_size
    if padded != length:
        x = F.pad(x, [0, 0] * (x.dim() - 2) + [0, padded - length])
    x = x.view(batch, num_chunks, chunk_size, *x.shape[2:])
    head_dims = list(range(3, x.dim() - 1))
    return x.permute(1, 0, *head_dims, 2, x.dim() - 1).contiguous()


def _chunk_pass(
    q: Tensor, k: Tensor, v: Tensor, g: Tensor, beta: Tensor, state: Tensor, chunk_size: int, out: Tensor
) -> Tensor:
    """One pass over prepared fp32 inputs; writes `out` and returns the final state.

    q, k: `[B, T, H, K]` (normalised, q scaled); v: `[B, T, HV, V]`; g, beta: `[B, T, HV]`;
    state: `[B, HV, K, V]`; out: `[B, T, HV, V]` view to fill (any dtype).
    """
    batch, length, key_heads, key_dim = q.shape
    heads, value_dim = v.shape[2], v.shape[3]
    group = heads // key_heads
    num_chunks = math.ceil(length / chunk_size)
    n, c = num_chunks, chunk_size

    # Value heads are split as [H, G] so q.k products are computed once per key head and
    # broadcast to the G value heads that share it.
    qc = _chunks(q, n, c).unsqueeze(3)  # [N, B, H, 1, C, K]
    kc = _chunks(k, n, c).unsqueeze(3)  # [N, B, H, 1, C, K]
    vc = _chunks(v.view(batch, length, key_heads, group, value_dim), n, c)  # [N, B, H, G, C, V]
    gc = _chunks(g.view(batch, length, key_heads, group, 1), n, c).squeeze(-1)  # [N, B, H, G, C]
    bc = _chunks(beta.view(batch, length, key_heads, group, 1), n, c)  # [N, B, H, G, C, 1]

    # Padded positions have g = 0 and beta = 0: they neither decay nor write the state.
    gamma = gc.cumsum(-1)  # [N, B, H, G, C]
    # gamma only accumulates over one chunk, which bounds the cancellation in gamma_i - gamma_j.
    decay = gamma[..., :, None] - gamma[..., None, :]
    upper = torch.ones(c, c, dtype=torch.bool, device=q.device).triu(1)
    decay = decay.masked_fill_(upper, float("-inf")).exp_()  # D: [N, B, H, G, C, C]
    gamma_exp = gamma.exp()[..., None]  # [N, B, H, G, C, 1]
    # Keys decayed to the chunk end, exp(gamma_last - gamma_j) k_j: D's last row.
    key_to_end = kc * decay[..., c - 1, :, None]  # [N, B, H, G, C, K]

    kt = kc.transpose(-1, -2)
    scores = decay * (qc @ kt)  # D * Q K^T, diagonal included
    system = decay.mul_(bc).mul_(kc @ kt)  # only the strict lower triangle is read below

    # One triangular solve for both right-hand sides R = [beta V | beta exp(gamma) K], posed as
    # X^T (I + A)^T = R^T: with row-major storage this is the layout LAPACK takes without copies.
    rows = batch * heads
    rhs = torch.empty(n, batch, key_heads, group, c, value_dim + key_dim, dtype=torch.float32, device=q.device)
    torch.mul(vc, bc, out=rhs[..., :value_dim])
    torch.mul(kc, bc * gamma_exp, out=rhs[..., value_dim:])
    solved = torch.linalg.solve_triangular(
        system.transpose(-1, -2), rhs.transpose(-1, -2), upper=True, left=False, unitriangular=True
    ).transpose(-1, -2)
    del system, rhs
    solved = solved.reshape(n, rows, c, value_dim + key_dim)
    w, k_cum = solved[..., :value_dim], solved[..., value_dim:]
    key_to_end_t = key_to_end.view(n, rows, c, key_dim).transpose(-1, -2)
    chunk_decay = gamma_exp[..., -1, :].reshape(n, rows, 1, 1)

    # The only sequential part: corrections U and the state entering each chunk.
    corrections = torch.empty(n, rows, c, value_dim, dtype=torch.float32, device=q.device)
    states = torch.empty(n + 1, rows, key_dim, value_dim, dtype=torch.float32, device=q.device)
    states[0] = state.reshape(rows, key_dim, value_dim)
    for i in range(n):
        torch.baddbmm(w[i], k_cum[i], states[i], alpha=-1.0, out=corrections[i])
        torch.mul(states[i], chunk_decay[i], out=states[i + 1])
        states[i + 1].baddbmm_(key_to_end_t[i], corrections[i])

    entry = states[:n].view(n, batch, key_heads, group, key_dim, value_dim)
    chunk_out = torch.matmul(qc * gamma_exp, entry)  # [N, B, H, G, C, V]
    chunk_out += scores @ corrections.view(n, batch, key_heads, group, c, value_dim)
    # [N, B, H, G, C, V] -> [B, N, C, HV, V]; the last chunk may be partial.
    chunk_out = chunk_out.permute(1, 0, 4, 2, 3, 5).reshape(batch, n, c, heads, value_dim)
    full = (n - 1) * c
    out[:, :full].view(batch, n - 1, c, heads, value_dim).copy_(chunk_out[:, : n - 1])
    out[:, full:].copy_(chunk_out[:, n - 1, : length - full])
    # A copy, so the returned state does not keep the whole stack of chunk states alive.
    return states[n].view(batch, heads, key_dim, value_dim).clone()


def chunk_gated_delta_rule(
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
    chunk_size: int = 64,
) -> tuple[Tensor, Tensor | None]:
    """Gated delta rule computed chunk by chunk; same contract as `naive_gated_delta_rule`.

    q, k: `[B, T, H, K]`; v: `[B, T, HV, V]` (value head j reads key head `j // (HV // H)`);
    g: `[B, T, HV]` log-decay (<= 0); beta: `[B, T, HV]`; scale: default `K ** -0.5`;
    initial_state: `[B, HV, K, V]` (zeros when None); chunk_size: tokens per chunk, any T works
    (the last chunk is zero-padded internally).
    Returns o `[B, T, HV, V]` in v.dtype and the final state `[B, HV, K, V]` fp32 (or None).
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    dims = check_inputs(q, k, v, g, beta, initial_state)
    q32, k32 = prepare_qk(q, k, scale, use_qk_l2norm)
    v32, g32, beta32 = v.to(torch.float32), g.to(torch.float32), beta.to(torch.float32)
    state = initial_state_fp32(initial_state, dims, q.device)
    out = torch.empty(v.shape, dtype=v.dtype, device=q.device)

    # An input shorter than one chunk is a single chunk of its own length: no padded work.
    chunk_size = max(1, min(chunk_size, dims.length))
    step = max(chunk_size, MAX_TOKENS_PER_PASS // chunk_size * chunk_size)
    for start in range(0, dims.length, step):
        part = slice(start, min(start + step, dims.length))
        state = _chunk_pass(
            q32[:, part], k32[:, part], v32[:, part], g32[:, part], beta32[:, part], state, chunk_size, out[:, part]
        )
    return out, (state if output_final_state else None)
