"""Per-token gated delta rule for decode and short inputs.

The state lives in one `[B*HV, K, V]` buffer updated in place with batched matmuls, so each
token costs five tensor ops whatever the head count.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..rowwise import per_token
from .utils import Dims, check_inputs, initial_state_fp32, prepare_qk


def _state_buffer(initial_state: Tensor | None, state_out: Tensor | None, dims: Dims, device: torch.device) -> Tensor:
    """The fp32 `[B, HV, K, V]` buffer the recurrence writes to, holding the initial state."""
    if state_out is None:
        return initial_state_fp32(initial_state, dims, device)
    shape = (dims.batch, dims.value_heads, dims.key_dim, dims.value_dim)
    if tuple(state_out.shape) != shape or state_out.dtype != torch.float32 or not state_out.is_contiguous():
        raise ValueError(f"state_out must be a contiguous fp32 tensor of shape {shape}")
    if initial_state is None:
        state_out.zero_()
    elif initial_state.data_ptr() != state_out.data_ptr():
        state_out.copy_(initial_state)
    return state_out


def recurrent_gated_delta_rule(
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
) -> tuple[Tensor, Tensor | None]:
    """Gated delta rule by a per-token loop; same contract as `naive_gated_delta_rule`.

    q, k: `[B, T, H, K]`; v: `[B, T, HV, V]`; g, beta: `[B, T, HV]`; initial_state: `[B, HV, K, V]`.
    Returns o `[B, T, HV, V]` in v.dtype and the final state `[B, HV, K, V]` fp32 (or None).

    state_out: optional contiguous fp32 `[B, HV, K, V]` buffer that receives the final state and
    is returned as it. Passing the initial_state tensor itself updates a decode state in place;
    otherwise no input is modified.
    """
    dims = check_inputs(q, k, v, g, beta, initial_state)
    batch, length, key_heads, key_dim = q.shape
    heads, group, value_dim = dims.value_heads, dims.group, dims.value_dim
    rows = batch * heads

    # Per token for short inputs, so each token is prepared exactly as in a one-token call.
    q32, k32 = per_token(lambda q_t, k_t: prepare_qk(q_t, k_t, scale, use_qk_l2norm), q, k)
    state = _state_buffer(initial_state, state_out, dims, q.device)
    flat_state = state.view(rows, key_dim, value_dim)
    beta32 = beta.to(torch.float32)
    # beta * v once up front; per token only beta * (S^T k) is left to subtract.
    beta_v = v.to(torch.float32) * beta32[..., None]
    decay = per_token(lambda g_t: g_t.to(torch.float32).exp(), g)

    if length == 1:
        # Decode: every [B, 1, ...] tensor is already laid out as one row per value head.
        query = q32.reshape(batch, key_heads, 1, 1, key_dim).expand(batch, key_heads, group, 1, key_dim)
        key = k32.reshape(batch, key_heads, 1, 1, key_dim).expand(batch, key_heads, group, 1, key_dim)
        query, key = query.reshape(rows, 1, key_dim), key.reshape(rows, 1, key_dim)
        flat_state.mul_(decay.reshape(rows, 1, 1))
        update = torch.addcmul(
            beta_v.reshape(rows, 1, value_dim), beta32.reshape(rows, 1, 1), torch.bmm(key, flat_state), value=-1.0
        )
        flat_state.baddbmm_(key.transpose(1, 2), update)
        out = torch.bmm(query, flat_state).view(batch, 1, heads, value_dim).to(v.dtype)
        return out, (state if output_final_state else None)

    def step_major(x: Tensor, tail: tuple[int, ...]) -> Tensor:
        """[B, T, HV, ...] -> [T, B*HV, ...] contiguous, so each step reads one slab."""
        return x.transpose(0, 1).reshape(length, rows, *tail)

    query = step_major(q32[:, :, :, None].expand(batch, length, key_heads, group, key_dim), (1, key_dim))
    key = step_major(k32[:, :, :, None].expand(batch, length, key_heads, group, key_dim), (1, key_dim))
    beta_v = step_major(beta_v, (1, value_dim))
    beta32 = step_major(beta32, (1, 1))
    decay = step_major(decay, (1, 1))
    out = torch.empty(length, rows, 1, value_dim, dtype=torch.float32, device=q.device)
    for t in range(length):
        flat_state.mul_(decay[t])
        update = torch.addcmul(beta_v[t], beta32[t], torch.bmm(key[t], flat_state), value=-1.0)
        flat_state.baddbmm_(key[t].transpose(1, 2), update)
        torch.bmm(query[t], flat_state, out=out[t])
    out = out.view(length, batch, heads, value_dim).transpose(0, 1).to(v.dtype, memory_format=torch.contiguous_format)
    return out, (state if output_final_state else None)
