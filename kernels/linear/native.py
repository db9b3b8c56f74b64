"""ctypes binding of `small_m_bf16.c`."""

from __future__ import annotations

import ctypes
import functools
from pathlib import Path

import torch

from ..native import load

_I64 = ctypes.c_int64
_ARGTYPES = (ctypes.c_void_p, _I64, _I64, ctypes.c_void_p, _I64, _I64, _I64, ctypes.c_void_p, _I64, ctypes.c_int,
             ctypes.c_int)


@functools.cache
def kernel():
    """The C function `linear_small_m_bf16`, or None where it cannot run here."""
    return load(Path(__file__).with_name("small_m_bf16.c"), "linear_small_m_bf16", _ARGTYPES)


def linear_small_m(x: torch.Tensor, weight: torch.Tensor, out_dtype: torch.dtype,
                   out: torch.Tensor | None = None) -> torch.Tensor:
    """x `[M, K]` bf16 with unit column stride, weight `[N, K]` bf16 contiguous -> `[M, N]` out_dtype
    (bf16 or fp32), written into `out` (contiguous) when given. The caller checks `kernel()` is not None."""
    rows, depth = x.shape
    if out is None:
        out = torch.empty(rows, weight.shape[0], dtype=out_dtype)
    kernel()(x.data_ptr(), x.stride(0), rows, weight.data_ptr(), weight.stride(0), weight.shape[0], depth,
             out.data_ptr(), out.shape[1], int(out.dtype == torch.float32), torch.get_num_threads())
    return out
