"""ctypes binding of `causal_bf16.c`: causal attention over a bf16 K/V cache on CPU."""

from __future__ import annotations

import ctypes
import functools
from pathlib import Path

import torch

from ..native import load

MAX_HEAD_DIM = 256
_I64, _PTR = ctypes.c_int64, ctypes.c_void_p
_ARGTYPES = (_PTR, _I64, _I64, _PTR, _PTR, _I64, _I64, _I64, _I64, _I64, _I64, _I64, ctypes.c_float, _PTR, _I64,
             _I64, ctypes.c_int)


@functools.cache
def kernel():
    """The C function `attention_causal_bf16`, or None where it cannot run here."""
    entry = load(Path(__file__).with_name("causal_bf16.c"), "attention_causal_bf16", _ARGTYPES)
    if entry is not None:
        entry.restype = ctypes.c_int
    return entry


def supports(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """Whether `native_causal_attention` takes these: bf16 on CPU, head dim a multiple of 16 up to
    MAX_HEAD_DIM, unit stride along it, K and V laid out alike."""
    return (
        q.device.type == "cpu"
        and q.dtype == k.dtype == v.dtype == torch.bfloat16
        and q.shape[-1] % 16 == 0
        and q.shape[-1] <= MAX_HEAD_DIM
        and q.stride(-1) == k.stride(-1) == v.stride(-1) == 1
        and k.stride() == v.stride()
        and kernel() is not None
    )


def native_causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """q `[B, T, H, D]`, k/v `[B, KVH, S, D]` (the last T keys are the new tokens') -> `[B, T, H, D]`."""
    batch, length, heads, dim = q.shape
    kv_heads, total = k.shape[1], k.shape[2]
    out = torch.empty(batch, length, heads, dim, dtype=q.dtype)
    entry = kernel()
    for b in range(batch):
        status = entry(q[b].data_ptr(), q.stride(1), q.stride(2), k[b].data_ptr(), v[b].data_ptr(), k.stride(1),
                       k.stride(2), length, heads, kv_heads, dim, total - length, scale, out[b].data_ptr(),
                       out.stride(1), out.stride(2), torch.get_num_threads())
        if status != 0:
            raise MemoryError("attention work buffers could not be allocated")
    return out
