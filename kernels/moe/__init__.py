"""Routed mixture of experts: top-k softmax router and grouped SwiGLU experts.

Each function runs the Triton kernels for CUDA tensors when Triton imports; on CPU the experts
of many bf16 tokens run in the native kernel (`experts_bf16.c`, built for AVX-512 and for AVX2,
over bf16 or quantized weights); everything else runs the PyTorch reference in `reference.py` (the
numerics of `model.layers.Router` / `Experts`), with few-row projections through `kernels.linear`.
"""

from __future__ import annotations

from torch import Tensor

from ..linear import linear
from ..quant import QuantizedRows, QuantizedWeight
from ..quant import prefill as quant_prefill
from ..triton_utils import use_triton
from . import native, reference

__all__ = ["moe_experts", "moe_experts_quantized", "moe_route", "sparse_moe"]


def moe_route(x: Tensor, router_weight: Tensor, top_k: int, normalize: bool) -> tuple[Tensor, Tensor]:
    """x `[N, hidden]`, router_weight `[E, hidden]` -> (weights `[N, k]` in x.dtype, ids `[N, k]` int64)."""
    if use_triton(x):
        from .triton_moe import route_triton

        return route_triton(x, router_weight, top_k, normalize)
    return reference.route(x, router_weight, top_k, normalize, linear)


def moe_experts(x: Tensor, weights: Tensor, experts: Tensor, gate_up_proj: Tensor, down_proj: Tensor) -> Tensor:
    """x `[N, hidden]`; weights, experts `[N, k]`; gate_up_proj `[E, 2I, hidden]`; down_proj
    `[E, hidden, I]` -> `[N, hidden]` in x.dtype."""
    if use_triton(x):
        from .triton_moe import experts_swiglu_triton

        return experts_swiglu_triton(x, weights, experts, gate_up_proj, down_proj)
    if x.shape[0] > 1 and native.supports_experts(x, weights, gate_up_proj, down_proj):
        return native.moe_experts(x, weights, experts, gate_up_proj, down_proj)
    return reference.experts_swiglu(x, weights, experts, gate_up_proj, down_proj, linear)


def moe_experts_quantized(x: Tensor, weights: Tensor, experts: Tensor, gate_up_proj: QuantizedRows | QuantizedWeight,
                          down_proj: QuantizedWeight) -> Tensor:
    """moe_experts for a prefill chunk over quantized experts (`quant_prefill.supports_experts`): the
    bf16 experts on the exact weights rounded to bf16, dequantized inside the native kernel as it
    reaches them, else routed experts dequantized in groups beside it (`quant_prefill`)."""
    if native.supports_quantized_experts(x, weights, gate_up_proj, down_proj):
        return native.moe_experts_quantized(x, weights, experts, gate_up_proj, down_proj)
    return quant_prefill.quantized_experts(x, weights, experts, gate_up_proj, down_proj, moe_experts)


def sparse_moe(
    x: Tensor, router_weight: Tensor, gate_up_proj: Tensor, down_proj: Tensor, top_k: int, normalize: bool
) -> Tensor:
    """Router then experts: the routed part of `model.layers.SparseMoE` for x `[N, hidden]`."""
    weights, experts = moe_route(x, router_weight, top_k, normalize)
    return moe_experts(x, weights, experts, gate_up_proj, down_proj)
