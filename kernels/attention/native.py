"""ctypes binding of `causal_bf16.c`: causal attention over a bf16 K/V cache on CPU, built for AVX-512
BF16 (with the AMX tile path), for AVX-512 without BF16 and for AVX2 + FMA; the CPU's best build runs."""

from __future__ import annotations

from pathlib import Path

import torch

from ..native import Kernel, matmul_has_amx

MAX_HEAD_DIM = 256

ATTENTION = Kernel(Path(__file__).with_name("causal_bf16.c"), "attention_causal_bf16", "piippiiiiiiifpiipiinn",
                   isas=("avx512", "avx512f", "avx2"), returns="n")


def kernel() -> Kernel | None:
    """The kernel `attention_causal_bf16`, or None where no build of it runs here."""
    return ATTENTION if ATTENTION.available() else None


def supports(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, gate: torch.Tensor | None = None) -> bool:
    """Whether `native_causal_attention` takes these: bf16 on CPU, head dim a multiple of 16 up to
    MAX_HEAD_DIM, unit stride along it, K and V laid out alike, a gate (if any) shaped like q."""
    if gate is not None and (gate.dtype != q.dtype or gate.shape != q.shape or gate.stride(-1) != 1):
        return False
    return (
        q.device.type == "cpu"
        and q.dtype == k.dtype == v.dtype == torch.bfloat16
        and q.shape[-1] % 16 == 0
        and q.shape[-1] <= MAX_HEAD_DIM
        and q.stride(-1) == k.stride(-1) == v.stride(-1) == 1
        and k.stride() == v.stride()
        and kernel() is not None
    )


def tiles_apply(q: torch.Tensor) -> bool:
    """Whether the kernel's AMX path takes q `[B, T, H, D]` by default: in the AVX-512 build on a CPU
    whose matmuls use AMX, for D a multiple of 32, whatever T (a row gets the same bits there too,
    alone or beside others, so decode and draft verification still agree)."""
    return q.shape[-1] % 32 == 0 and matmul_has_amx() and ATTENTION.isa() == "avx512"


def native_causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                            gate: torch.Tensor | None = None, amx: bool | None = None,
                            out: torch.Tensor | None = None) -> torch.Tensor:
    """q `[B, T, H, D]`, k/v `[B, KVH, S, D]` (the last T keys are the new tokens'), gate None or
    `[B, T, H, D]` -> `[B, T, H, D]`, times sigmoid(gate) when given; into `out` (unit stride along D)
    when given. `amx`: the tile path (default: `tiles_apply(q)`)."""
    if amx is None:
        amx = tiles_apply(q)
    batch, length, heads, dim = q.shape
    isa = ATTENTION.isa_for(dim)
    kv_heads, total = k.shape[1], k.shape[2]
    if out is None:
        out = torch.empty(batch, length, heads, dim, dtype=q.dtype)
    gate_strides = (gate.stride(1), gate.stride(2)) if gate is not None else (0, 0)
    for b in range(batch):
        status = ATTENTION(q[b], q.stride(1), q.stride(2), k[b], v[b], k.stride(1), k.stride(2), length, heads,
                           kv_heads, dim, total - length, scale, out[b], out.stride(1), out.stride(2),
                           gate[b] if gate is not None else None, *gate_strides, int(amx), torch.get_num_threads(),
                           isa=isa)
        if status != 0:
            raise MemoryError("attention work buffers could not be allocated")
    return out
