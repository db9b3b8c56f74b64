"""Gated delta rule (Gated DeltaNet token mixer): naive, chunked and recurrent forms.

All three share one contract: q, k `[B, T, H, K]`; v `[B, T, HV, V]` (value head j reads key
head `j // (HV // H)`); g, beta `[B, T, HV]`; optional initial_state `[B, HV, K, V]`; they return
o `[B, T, HV, V]` in v.dtype and the final state `[B, HV, K, V]` in fp32.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from functools import cache
from typing import Literal

from torch import Tensor

from .chunk import chunk_gated_delta_rule
from .naive import naive_gated_delta_rule
from .recurrent import recurrent_gated_delta_rule

__all__ = [
    "RECURRENT_MAX_LEN",
    "chunk_gated_delta_rule",
    "gated_delta_rule",
    "naive_gated_delta_rule",
    "recurrent_gated_delta_rule",
    "register_cuda_implementation",
    "triton_available",
]

# Longest input that "auto" runs token by token. Measured on CPU with bench/ops.py --sweep
# (B=1, H=4, HV=8, K=V=64, 1 or 2 threads): the per-token loop costs ~0.05 ms a token, a
# single chunk ~0.35-0.45 ms up to 16 tokens; they break even between 8 and 12 tokens.
RECURRENT_MAX_LEN = 8

Mode = Literal["auto", "chunk", "recurrent", "naive"]
GatedDeltaRuleFn = Callable[..., tuple[Tensor, Tensor | None]]

_cuda_implementation: GatedDeltaRuleFn | None = None


@cache
def triton_available() -> bool:
    """Whether Triton can be imported (checked once)."""
    return importlib.util.find_spec("triton") is not None


def register_cuda_implementation(fn: GatedDeltaRuleFn | None) -> None:
    """Install a fused implementation that "auto" uses for CUDA tensors when Triton is present.

    fn takes the same arguments as `chunk_gated_delta_rule` (chunk_size included). None removes it.
    """
    global _cuda_implementation
    _cuda_implementation = fn


def gated_delta_rule(
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
    mode: Mode = "auto",
) -> tuple[Tensor, Tensor | None]:
    """Gated delta rule with the implementation picked by `mode`.

    "auto" uses a registered CUDA implementation for CUDA inputs when Triton is available,
    otherwise the recurrent form for T <= RECURRENT_MAX_LEN and the chunked form beyond.
    Shapes and return values as in `chunk_gated_delta_rule`.
    """
    kwargs = dict(
        scale=scale, initial_state=initial_state, output_final_state=output_final_state, use_qk_l2norm=use_qk_l2norm
    )
    if mode == "auto":
        if q.is_cuda and triton_available() and _cuda_implementation is not None:
            return _cuda_implementation(q, k, v, g, beta, chunk_size=chunk_size, **kwargs)
        mode = "recurrent" if q.shape[1] <= RECURRENT_MAX_LEN else "chunk"
    if mode == "chunk":
        return chunk_gated_delta_rule(q, k, v, g, beta, chunk_size=chunk_size, **kwargs)
    if mode == "recurrent":
        return recurrent_gated_delta_rule(q, k, v, g, beta, **kwargs)
    if mode == "naive":
        return naive_gated_delta_rule(q, k, v, g, beta, **kwargs)
    raise ValueError(f"unknown mode {mode!r}; expected auto, chunk, recurrent or naive")
