"""Ops of the Qwen3-Next runtime, one package per op: PyTorch references and fast paths."""

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
    "build_native_kernels",
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


def build_native_kernels() -> dict[str, bool]:
    """Compile (or find in the cache) every C kernel now rather than at first use; returns
    op -> whether its native kernel runs on this machine."""
    from .attention import native as attention
    from .causal_conv1d import native as conv
    from .gated_delta_rule import native as delta_rule
    from .gated_rmsnorm import native as norms
    from .linear import native as linear
    from .moe import native as moe
    from .rotary import native as rotary

    builds = {
        "attention": [attention.kernel],
        "conv": [conv.kernel],
        "delta_rule": [delta_rule.kernel, delta_rule.grouped_kernel, delta_rule.chunk_kernel],
        "linear": [linear.kernel],
        "moe": [moe.kernel, moe.experts_kernel],
        "norms": [norms.kernels, norms.add_kernel],
        "rotary": [rotary.kernel],
    }
    return {name: all(build() is not None for build in entries) for name, entries in builds.items()}
