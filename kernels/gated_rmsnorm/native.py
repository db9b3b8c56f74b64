"""ctypes binding of `norm_bf16.c`: the RMS norms over bf16 rows on CPU."""

from __future__ import annotations

import ctypes
import functools
from pathlib import Path

import torch

from ..native import load

MAX_DIM = 16384
_I64, _PTR = ctypes.c_int64, ctypes.c_void_p


@functools.cache
def kernels():
    """(rms_norm_bf16, gated_rms_norm_bf16) from the C file, or None where they cannot run here."""
    source = Path(__file__).with_name("norm_bf16.c")
    plain = load(source, "rms_norm_bf16", (_PTR, _I64, _I64, _I64, _I64, _I64, _I64, _I64, _PTR, ctypes.c_int,
                                           ctypes.c_float, _PTR, ctypes.c_int))
    gated = load(source, "gated_rms_norm_bf16", (_PTR, _PTR, _I64, _I64, _I64, _I64, _I64, _I64, _I64, _I64, _I64,
                                                 _I64, _PTR, ctypes.c_float, _PTR, ctypes.c_int))
    return None if plain is None or gated is None else (plain, gated)


@functools.cache
def add_kernel():
    """`add_rms_norm_bf16` from the C file, or None where it cannot run here."""
    return load(Path(__file__).with_name("norm_bf16.c"), "add_rms_norm_bf16",
                (_PTR, _PTR, _PTR, _I64, _I64, _PTR, ctypes.c_int, ctypes.c_float, _PTR, ctypes.c_int))


def _rows(x: torch.Tensor) -> tuple[list[int], list[int]]:
    """Up to three leading sizes and strides (padded with size 1) addressing x's rows."""
    sizes, strides = list(x.shape[:-1]), list(x.stride()[:-1])
    while len(sizes) > 3:  # merge leading dims that are laid out as one
        if strides[0] != sizes[1] * strides[1]:
            raise ValueError("rows not addressable by three strides")
        sizes[:2], strides[:2] = [sizes[0] * sizes[1]], [strides[1]]
    pad = 3 - len(sizes)
    return [1] * pad + sizes, [0] * pad + strides


def _addressable(x: torch.Tensor) -> bool:
    try:
        _rows(x)
    except ValueError:
        return False
    return True


def supports(x: torch.Tensor, weight: torch.Tensor, z: torch.Tensor | None = None) -> bool:
    """bf16 on CPU, unit stride along a last dim that is a multiple of 16 (at most MAX_DIM), rows
    addressable by three strides, a contiguous bf16 weight (and z shaped like x)."""
    dim = x.shape[-1]
    return (
        x.device.type == "cpu"
        and x.dtype == weight.dtype == torch.bfloat16
        and x.dim() >= 1
        and dim % 16 == 0
        and 0 < dim <= MAX_DIM
        and x.stride(-1) == 1
        and weight.is_contiguous()
        and _addressable(x)
        and (z is None or (z.shape == x.shape and z.dtype == x.dtype and z.stride(-1) == 1 and _addressable(z)))
        and kernels() is not None
    )


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, zero_centered: bool,
             out: torch.Tensor | None = None) -> torch.Tensor:
    """The contract of `norm.rms_norm` for inputs `supports` takes; into `out` (contiguous) when given."""
    sizes, strides = _rows(x)
    if out is None:
        out = torch.empty(x.shape, dtype=x.dtype)
    kernels()[0](x.data_ptr(), *sizes, *strides, x.shape[-1], weight.data_ptr(), int(zero_centered), eps,
                 out.data_ptr(), torch.get_num_threads())
    return out


def gated_rms_norm(x: torch.Tensor, z: torch.Tensor, weight: torch.Tensor, eps: float,
                   out: torch.Tensor | None = None) -> torch.Tensor:
    """The contract of `norm.gated_rms_norm` for inputs `supports` takes; into `out` (contiguous) when given."""
    sizes, strides = _rows(x)
    _, gate_strides = _rows(z)
    if out is None:
        out = torch.empty(x.shape, dtype=x.dtype)
    kernels()[1](x.data_ptr(), z.data_ptr(), *sizes, *strides, *gate_strides, x.shape[-1], weight.data_ptr(), eps,
                 out.data_ptr(), torch.get_num_threads())
    return out


def add_rms_norm(residual: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor, eps: float,
                 zero_centered: bool, out: torch.Tensor, total: torch.Tensor | None = None) -> None:
    """total = residual + delta (rounded as torch's bf16 add rounds), then out = rms_norm(total): a
    residual connection and the next norm in one pass. total defaults to residual (updated in place).
    All `[rows, D]` contiguous bf16 with D a multiple of 16; the caller checks `add_kernel()` is not None."""
    rows, dim = residual.shape
    total = residual if total is None else total
    add_kernel()(residual.data_ptr(), delta.data_ptr(), total.data_ptr(), rows, dim, weight.data_ptr(),
                 int(zero_centered), eps, out.data_ptr(), torch.get_num_threads())
