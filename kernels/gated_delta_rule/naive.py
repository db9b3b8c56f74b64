"""Token-by-token gated delta rule: the readable definition the fast paths are tested against."""

from __future__ import annotations

import torch
from torch import Tensor

from .utils import check_inputs, initial_state_fp32, prepare_qk


def naive_gated_delta_rule(
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
) -> tuple[Tensor, Tensor | None]:
    """Gated delta rule, one token at a time, all math in fp32.

    q, k: `[B, T, H, K]`; v: `[B, T, HV, V]` where value head j reads key head `j // (HV // H)`;
    g: `[B, T, HV]` log-decay (<= 0); beta: `[B, T, HV]` write strength in (0, 1);
    scale: query multiplier, default `K ** -0.5` (applied after the optional L2 norm);
    initial_state: `[B, HV, K, V]` (zeros when None). For each token and value head:

        S = S * exp(g)
        S = S + k (beta * (v - S^T k))^T
        o = S^T (q * scale)

    Returns o `[B, T, HV, V]` in v.dtype and the final state `[B, HV, K, V]` fp32
    (None when output_final_state is False). Inputs are never modified.
    """
    dims = check_inputs(q, k, v, g, beta, initial_state)
    q32, k32 = prepare_qk(q, k, scale, use_qk_l2norm)
    q32 = q32.repeat_interleave(dims.group, dim=2)
    k32 = k32.repeat_interleave(dims.group, dim=2)
    v32, g32, beta32 = v.to(torch.float32), g.to(torch.float32), beta.to(torch.float32)

    state = initial_state_fp32(initial_state, dims, q.device)
    out = torch.empty(v.shape, dtype=torch.float32, device=q.device)
    for t in range(dims.length):
        state = state * g32[:, t].exp()[..., None, None]
        predicted = torch.einsum("bhk,bhkv->bhv", k32[:, t], state)
        update = beta32[:, t, :, None] * (v32[:, t] - predicted)
        state = state + k32[:, t, :, :, None] * update[:, :, None, :]
        out[:, t] = torch.einsum("bhk,bhkv->bhv", q32[:, t], state)
    return out.to(v.dtype), (state if output_final_state else None)
