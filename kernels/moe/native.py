"""ctypes binding of `sparse_moe_bf16.c`: the sparse MoE block for a few bf16 tokens on CPU."""

from __future__ import annotations

import ctypes
import functools
from pathlib import Path

import torch

from ..native import load, tiles_pay_off

MAX_TOKENS = 16
MAX_TOP_K = 64
_I64, _PTR = ctypes.c_int64, ctypes.c_void_p
_ARGTYPES = (_PTR, _I64, _I64, _PTR, _I64, _I64, ctypes.c_int, _PTR, _PTR, _I64, _PTR, _PTR, _PTR, _I64, _PTR, _PTR,
             ctypes.c_int)


@functools.cache
def kernel():
    """The C function `sparse_moe_bf16`, or None where it cannot run here."""
    entry = load(Path(__file__).with_name("sparse_moe_bf16.c"), "sparse_moe_bf16", _ARGTYPES)
    if entry is not None:
        entry.restype = ctypes.c_int
    return entry


def supports(x: torch.Tensor, *weights: torch.Tensor, top_k: int) -> bool:
    """x `[N, H]`: bf16 on CPU, at most MAX_TOKENS tokens, contiguous bf16 weights."""
    return (
        x.device.type == "cpu"
        and x.dtype == torch.bfloat16
        and 0 < x.shape[0] <= MAX_TOKENS
        and top_k <= MAX_TOP_K
        and all(w.dtype == torch.bfloat16 and w.is_contiguous() for w in weights)
        and kernel() is not None
    )


def sparse_moe(x: torch.Tensor, router: torch.Tensor, top_k: int, normalize: bool, gate_up: torch.Tensor,
               down: torch.Tensor, shared_gate_proj: torch.Tensor, shared_up_proj: torch.Tensor,
               shared_down: torch.Tensor, shared_gate: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """x `[N, H]` -> `[N, H]`: routed experts (router `[E, H]`, gate_up `[E, 2I, H]`, down `[E, H, I]`)
    plus the shared expert (gate/up `[S, H]`, down `[H, S]`) scaled by sigmoid(shared_gate `[1, H]` . x);
    into `out` (contiguous) when given."""
    x = x.contiguous()
    tokens, hidden = x.shape
    if out is None:
        out = torch.empty_like(x)
    status = kernel()(x.data_ptr(), tokens, hidden, router.data_ptr(), router.shape[0], top_k, int(normalize),
                      gate_up.data_ptr(), down.data_ptr(), down.shape[2], shared_gate_proj.data_ptr(),
                      shared_up_proj.data_ptr(), shared_down.data_ptr(), shared_gate_proj.shape[0],
                      shared_gate.data_ptr(), out.data_ptr(), torch.get_num_threads())
    if status != 0:
        raise MemoryError("MoE work buffers could not be allocated")
    return out


_EXPERTS_ARGTYPES = (_PTR, _I64, _I64, _PTR, _PTR, _I64, _I64, _PTR, _PTR, _I64, _PTR, ctypes.c_int, ctypes.c_int)


@functools.cache
def experts_kernel():
    """The C function `moe_experts_bf16`, or None where it cannot run here."""
    entry = load(Path(__file__).with_name("experts_bf16.c"), "moe_experts_bf16", _EXPERTS_ARGTYPES)
    if entry is not None:
        entry.restype = ctypes.c_int
    return entry


def supports_experts(x: torch.Tensor, weights: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor) -> bool:
    """x `[N, H]` and the routing weights bf16 on CPU, top-k at most MAX_TOP_K, contiguous bf16 weights,
    hidden and expert widths multiples of 16."""
    return (
        x.device.type == "cpu"
        and gate_up.shape[2] % 16 == 0
        and down.shape[2] % 16 == 0
        and x.dtype == weights.dtype == gate_up.dtype == down.dtype == torch.bfloat16
        and weights.shape[1] <= MAX_TOP_K
        and gate_up.is_contiguous()
        and down.is_contiguous()
        and experts_kernel() is not None
    )


def moe_experts(x: torch.Tensor, weights: torch.Tensor, experts: torch.Tensor, gate_up: torch.Tensor,
                down: torch.Tensor, amx: bool | None = None) -> torch.Tensor:
    """x `[N, H]`; weights, experts `[N, k]`; gate_up `[E, 2I, H]`; down `[E, H, I]` -> `[N, H]` bf16,
    the contract of `reference.experts_swiglu`. `amx`: use AMX tiles (default: for more than a few
    tokens on CPUs whose matmuls use them; never for few tokens, whose bits must not depend on the
    call's size)."""
    if amx is None:
        amx = tiles_pay_off(x.shape[0])
    x, weights = x.contiguous(), weights.contiguous()
    experts = experts.to(torch.int64).contiguous()
    tokens, hidden = x.shape
    out = torch.empty_like(x)
    status = experts_kernel()(x.data_ptr(), tokens, hidden, weights.data_ptr(), experts.data_ptr(), weights.shape[1],
                              gate_up.shape[0], gate_up.data_ptr(), down.data_ptr(), down.shape[2], out.data_ptr(),
                              int(amx), torch.get_num_threads())
    if status != 0:
        raise MemoryError("MoE work buffers could not be allocated")
    return out
