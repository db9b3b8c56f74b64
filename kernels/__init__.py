"""Reference PyTorch ops of the Qwen3-Next runtime, one package per op."""

from .attention import causal_attention, naive_causal_attention
from .causal_conv1d import causal_conv1d, causal_conv1d_update
from .gated_delta_rule import (
    chunk_gated_delta_rule,
    gated_delta_rule,
    naive_gated_delta_rule,
    recurrent_gated_delta_rule,
)
from .gated_rmsnorm import gated_rms_norm, rms_norm
from .moe import moe_experts, moe_route, sparse_moe

__all__ = [
    "causal_attention",
    "causal_conv1d",
    "causal_conv1d_update",
    "chunk_gated_delta_rule",
    "gated_delta_rule",
    "gated_rms_norm",
    "moe_experts",
    "moe_route",
    "naive_causal_attention",
    "naive_gated_delta_rule",
    "recurrent_gated_delta_rule",
    "rms_norm",
    "sparse_moe",
]
