"""Readable definition of the sparse MoE block over quantized weights for a few tokens (what
`sparse_moe_quant.c` computes): the weights exactly dequantized (`reference.dequantize`), every
product exact (float64) and rounded to bf16 where the module path rounds, the experts through the
MoE reference math (`kernels.moe.reference.experts_swiglu`, one token at a time).

Routing is spelled out here rather than taken from `kernels.moe.reference.route` to fix the one
choice torch.topk leaves open: among equal probabilities the lowest expert id is taken first.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ..moe.reference import experts_swiglu
from .formats import QuantizedRows, QuantizedWeight
from .reference import dequantize


def exact_weight(weight: Tensor | QuantizedWeight | QuantizedRows) -> Tensor:
    """The weight's values in float64: dequantized exactly, QuantizedRows' parts stacked along rows."""
    if isinstance(weight, QuantizedRows):
        return torch.cat([exact_weight(part) for part in weight.parts], dim=-2)
    if isinstance(weight, QuantizedWeight):
        return dequantize(weight).double()
    return weight.double()


def exact_linear(x: Tensor, weight: Tensor) -> Tensor:
    """x `[..., K]` times weight `[N, K]` (float64 values) exactly, rounded once to x.dtype."""
    return (x.double() @ weight.T).to(x.dtype)


def route_reference(x: Tensor, router: Tensor, top_k: int, normalize: bool) -> tuple[Tensor, Tensor]:
    """x `[N, H]` bf16 -> (weights `[N, k]` bf16, expert ids `[N, k]` ascending): logits rounded to
    bf16, softmax in fp32, the k largest probabilities (lowest id first among equals), optionally
    renormalised to sum to one."""
    probs = exact_linear(x, exact_weight(router)).softmax(dim=-1, dtype=torch.float32)
    picked = []
    for row in probs.tolist():
        ranked = sorted(range(len(row)), key=lambda expert: (-row[expert], expert))
        picked.append(sorted(ranked[:top_k]))
    chosen = torch.tensor(picked, dtype=torch.long).reshape(-1, top_k)
    weights = probs.gather(-1, chosen)
    if normalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights.to(x.dtype), chosen


def sparse_moe_reference(x: Tensor, router: Tensor, top_k: int, normalize: bool, gate_up, down, shared_gate_proj,
                         shared_up_proj, shared_down, shared_expert_gate) -> Tensor:
    """x `[N, H]` bf16 -> `[N, H]` bf16: the routed experts (gate_up `[E, 2I, H]`, down `[E, H, I]`)
    plus the shared expert (gate/up `[S, H]`, down `[H, S]`) scaled by sigmoid(shared_expert_gate
    `[1, H]` . x), each token on its own; weights are bf16 tensors or quantized."""
    weights, experts = route_reference(x, router, top_k, normalize)
    gate_up, down = exact_weight(gate_up), exact_weight(down)
    shared = [exact_weight(w) for w in (shared_gate_proj, shared_up_proj, shared_down, shared_expert_gate)]
    out = torch.empty_like(x)
    for token in range(x.shape[0]):
        row = x[token : token + 1]
        routed = experts_swiglu(row, weights[token : token + 1], experts[token : token + 1], gate_up, down,
                                exact_linear)
        gate_proj, up_proj, shared_down_proj, shared_gate = shared
        activation = F.silu(exact_linear(row, gate_proj)) * exact_linear(row, up_proj)
        gated = torch.sigmoid(exact_linear(row, shared_gate)) * exact_linear(activation, shared_down_proj)
        out[token] = (routed + gated)[0]
    return out
