"""PyTorch reference of the routed MoE: top-k softmax router and per-expert SwiGLU.

The same operations, dtypes and order as `model.layers.Router` and `model.layers.Experts`,
as free functions over the stacked weights so the Triton kernels can be checked against them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def route(x: Tensor, router_weight: Tensor, top_k: int, normalize: bool, linear=F.linear) -> tuple[Tensor, Tensor]:
    """x `[N, hidden]`, router_weight `[E, hidden]` -> (weights `[N, k]` in x.dtype, expert ids `[N, k]` int64).

    Logits in x.dtype, softmax in fp32, top-k in descending order, optionally renormalised to sum to one.
    `linear` computes `x @ weight.T` (the CPU path passes its small-row kernel).
    """
    probs = linear(x, router_weight).softmax(dim=-1, dtype=torch.float32)
    weights, experts = probs.topk(top_k, dim=-1)
    if normalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights.to(x.dtype), experts


def experts_swiglu(
    x: Tensor, weights: Tensor, experts: Tensor, gate_up_proj: Tensor, down_proj: Tensor, linear=F.linear
) -> Tensor:
    """Weighted sum over each token's routed experts of `down(silu(gate(x)) * up(x))`.

    x `[N, hidden]`; weights, experts `[N, k]`; gate_up_proj `[E, 2I, hidden]` (gate rows first);
    down_proj `[E, hidden, I]`. Returns `[N, hidden]` in x.dtype; experts nobody chose cost nothing.
    """
    top_k = experts.shape[1]
    if x.shape[0] == 1:
        # One token (a decode step): the same products, summed in fp32 in expert order and rounded
        # once like `index_add_` below, without the grouped path's sort, gather and scatter.
        total = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
        ids = experts[0].tolist()
        for slot in sorted(range(top_k), key=ids.__getitem__):
            gate, up = linear(x, gate_up_proj[ids[slot]]).chunk(2, dim=-1)
            total += linear(F.silu(gate) * up, down_proj[ids[slot]]) * weights[:, slot, None]
        return total.to(x.dtype)
    flat = experts.flatten()
    order = flat.argsort(stable=True)
    counts = torch.bincount(flat, minlength=gate_up_proj.shape[0]).tolist()
    token_index = order // top_k
    gathered = x[token_index]
    slot_weights = weights.flatten()[order, None]
    outputs = torch.empty_like(gathered)
    start = 0
    for expert, count in enumerate(counts):
        if count == 0:
            continue
        end = start + count
        gate, up = linear(gathered[start:end], gate_up_proj[expert]).chunk(2, dim=-1)
        outputs[start:end] = linear(F.silu(gate) * up, down_proj[expert]) * slot_weights[start:end]
        start = end
    result = torch.zeros_like(x)
    result.index_add_(0, token_index, outputs)
    return result
