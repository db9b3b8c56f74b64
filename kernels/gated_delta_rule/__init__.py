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

import torch
import torch.nn.functional as F
from torch import Tensor

from ..native import FEW_TOKENS
from ..rowwise import per_token
from ..triton_utils import triton_importable, use_triton
from . import native
from .chunk import chunk_gated_delta_rule
from .naive import naive_gated_delta_rule
from .recurrent import recurrent_gated_delta_rule

__all__ = [
    "CHUNK_SIZE",
    "RECURRENT_MAX_LEN",
    "TRITON_RECURRENT_MAX_LEN",
    "chunk_gated_delta_rule",
    "gated_delta_rule",
    "gated_delta_rule_from_gates",
    "naive_gated_delta_rule",
    "recurrent_gated_delta_rule",
    "register_cuda_implementation",
    "triton_available",
]

# Longest input that "auto" runs token by token: the few-token limit. The per-token loop rounds
# each token exactly as a one-token decode step does, so draft verification over up to FEW_TOKENS
# tokens reproduces decoding bit for bit. Speed alone would cut over earlier: on CPU
# (bench/ops.py --sweep, B=1, H=4, HV=8, K=V=64, 1 or 2 threads) the per-token loop costs
# ~0.05 ms a token, a single chunk ~0.35-0.45 ms up to 16 tokens; they break even at 8-12 tokens.
RECURRENT_MAX_LEN = FEW_TOKENS
# The same switch, for the same reason, for the Triton kernels on CUDA (the chunked path costs four
# launches whatever T is; bench/kernels.py --sweep measures where speed alone would put it).
TRITON_RECURRENT_MAX_LEN = FEW_TOKENS
# Tokens per chunk of PyTorch's chunked form: 32 beat 64 on the CPUs measured (smaller
# triangular systems, same matmul volume). The other chunked forms choose their own, each for its
# hardware: the native kernel native.CHUNK_SIZE (16: one head's chunk at a time, in cache), the
# Triton kernels triton_chunk.CHUNK (64: four 16-row blocks of the GPU's matrix units).
CHUNK_SIZE = 32

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


def _triton_gated_delta_rule(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    g: Tensor,
    beta: Tensor,
    *,
    cu_seqlens: Tensor | None = None,
    **kwargs,
) -> tuple[Tensor, Tensor | None]:
    """The Triton kernels: recurrent for short fixed-length inputs, chunked otherwise."""
    if cu_seqlens is None and q.shape[1] <= TRITON_RECURRENT_MAX_LEN:
        from .triton_recurrent import recurrent_gated_delta_rule_triton

        return recurrent_gated_delta_rule_triton(q, k, v, g, beta, **kwargs)
    from .triton_chunk import chunk_gated_delta_rule_triton

    return chunk_gated_delta_rule_triton(q, k, v, g, beta, cu_seqlens=cu_seqlens, **kwargs)


def _per_sequence(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    g: Tensor,
    beta: Tensor,
    cu_seqlens: Tensor,
    initial_state: Tensor | None,
    output_final_state: bool,
    **kwargs,
) -> tuple[Tensor, Tensor | None]:
    """`gated_delta_rule` on each sequence packed in `[1, T, ...]` at offsets `cu_seqlens` `[N + 1]`."""
    if q.shape[0] != 1:
        raise ValueError(f"cu_seqlens needs the sequences packed into B = 1, got B = {q.shape[0]}")
    offsets = cu_seqlens.tolist()
    outs, finals = [], []
    for i, (start, end) in enumerate(zip(offsets[:-1], offsets[1:], strict=True)):
        part = slice(start, end)
        state = None if initial_state is None else initial_state[i : i + 1]
        out, final = gated_delta_rule(
            q[:, part], k[:, part], v[:, part], g[:, part], beta[:, part],
            initial_state=state, output_final_state=output_final_state, **kwargs,
        )
        outs.append(out)
        finals.append(final)
    out = torch.cat(outs, dim=1) if outs else torch.empty(v.shape, dtype=v.dtype, device=v.device)
    return out, (torch.cat(finals) if output_final_state and finals else None)


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
    chunk_size: int | None = None,
    mode: Mode = "auto",
    cu_seqlens: Tensor | None = None,
) -> tuple[Tensor, Tensor | None]:
    """Gated delta rule with the implementation picked by `mode`.

    "auto" uses, for CUDA inputs when Triton is available, a registered CUDA implementation or
    else the Triton kernels; otherwise the recurrent form for T <= RECURRENT_MAX_LEN and the
    chunked form beyond: the native kernel for bf16 CPU inputs it takes, else PyTorch's.
    chunk_size: tokens per chunk; None lets each implementation use its own (CHUNK_SIZE for
    PyTorch's, native.CHUNK_SIZE for the native kernel). Shapes and return values as in
    `chunk_gated_delta_rule`.
    cu_seqlens: int `[N + 1]` offsets of N sequences packed along T (B = 1); initial_state and
    the final state are then `[N, HV, K, V]`.
    """
    kwargs = dict(
        scale=scale, initial_state=initial_state, output_final_state=output_final_state, use_qk_l2norm=use_qk_l2norm
    )
    if mode == "auto" and q.is_cuda and triton_available():
        if _cuda_implementation is not None and cu_seqlens is None:
            return _cuda_implementation(q, k, v, g, beta, chunk_size=chunk_size or CHUNK_SIZE, **kwargs)
        if triton_importable():
            return _triton_gated_delta_rule(q, k, v, g, beta, cu_seqlens=cu_seqlens, **kwargs)
    if cu_seqlens is not None:
        del kwargs["initial_state"], kwargs["output_final_state"]
        return _per_sequence(
            q, k, v, g, beta, cu_seqlens, initial_state, output_final_state, chunk_size=chunk_size, mode=mode, **kwargs
        )
    if mode == "auto":
        mode = "recurrent" if q.shape[1] <= RECURRENT_MAX_LEN else "chunk"
        native_chunk = native.CHUNK_SIZE if chunk_size is None else chunk_size
        if mode == "chunk" and native.supports_chunk(q, k, v, native_chunk, use_qk_l2norm):
            del kwargs["use_qk_l2norm"]
            return native.chunk_gated_delta_rule(q, k, v, g, beta, chunk_size=native_chunk, **kwargs)
    if mode == "chunk":
        return chunk_gated_delta_rule(q, k, v, g, beta, chunk_size=chunk_size or CHUNK_SIZE, **kwargs)
    if mode == "recurrent":
        return recurrent_gated_delta_rule(q, k, v, g, beta, **kwargs)
    if mode == "naive":
        return naive_gated_delta_rule(q, k, v, g, beta, **kwargs)
    raise ValueError(f"unknown mode {mode!r}; expected auto, chunk, recurrent or naive")


def gated_delta_rule_from_gates(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    a: Tensor,
    b: Tensor,
    A_log: Tensor,
    dt_bias: Tensor,
    *,
    scale: float | None = None,
    initial_state: Tensor | None = None,
    output_final_state: bool = True,
    use_qk_l2norm: bool = True,
    chunk_size: int | None = None,
) -> tuple[Tensor, Tensor | None]:
    """`gated_delta_rule` taking Gated DeltaNet's raw gate projections.

    a, b: `[B, T, HV]`; A_log, dt_bias: `[HV]`; the gates are `g = -exp(A_log) * softplus(a + dt_bias)`
    (fp32) and `beta = sigmoid(b)` (in b.dtype). Short CUDA inputs compute them inside the
    recurrent Triton kernel; everything else computes them here and calls `gated_delta_rule`.
    """
    kwargs = dict(
        scale=scale, initial_state=initial_state, output_final_state=output_final_state, use_qk_l2norm=use_qk_l2norm
    )
    if use_triton(q) and q.shape[1] <= TRITON_RECURRENT_MAX_LEN:
        from .triton_recurrent import recurrent_gated_delta_rule_from_gates_triton

        return recurrent_gated_delta_rule_from_gates_triton(q, k, v, a, b, A_log, dt_bias, **kwargs)
    decay_rate = A_log.float().exp()
    g = per_token(lambda a_t: -decay_rate * F.softplus(a_t.float() + dt_bias), a)
    return gated_delta_rule(q, k, v, g, per_token(torch.sigmoid, b), chunk_size=chunk_size, **kwargs)
