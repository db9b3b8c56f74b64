"""ctypes binding of `rotary_bf16.c`: rotary embedding of bf16 heads on CPU, bit for bit the reference."""

from __future__ import annotations

import ctypes
import functools
from pathlib import Path

import torch

from ..native import load

_I64, _PTR = ctypes.c_int64, ctypes.c_void_p
_ARGTYPES = (_PTR, _I64, _I64, _I64, _I64, _I64, _PTR, _PTR, _I64, _PTR, _I64, _I64, ctypes.c_int)


@functools.cache
def kernel():
    """The C function `rotary_bf16`, or None where it cannot run here."""
    return load(Path(__file__).with_name("rotary_bf16.c"), "rotary_bf16", _ARGTYPES)


def supports(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> bool:
    """x `[B, T, H, D]` bf16 on CPU with unit stride along D; cos/sin `[T, R]` bf16, R even, at most D."""
    return (
        x.device.type == "cpu"
        and x.dim() == 4
        and x.dtype == cos.dtype == sin.dtype == torch.bfloat16
        and x.stride(-1) == 1
        and cos.shape == sin.shape
        and cos.shape[-1] % 2 == 0
        and cos.shape[-1] <= x.shape[-1]
        and kernel() is not None
    )


def rotate_into(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, out: torch.Tensor) -> None:
    """Writes `apply_rotary_reference(x, cos, sin)` into out `[T, H, D]` (any token/head strides, unit
    stride along D) for x `[T, H, D]`; cos/sin `[T, R]` (R = 0 copies)."""
    length, heads, dim = x.shape
    cos, sin = cos.contiguous(), sin.contiguous()
    kernel()(x.data_ptr(), x.stride(0), x.stride(1), length, heads, dim, cos.data_ptr(), sin.data_ptr(), cos.shape[-1],
             out.data_ptr(), out.stride(0), out.stride(1), torch.get_num_threads())


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """The contract of `reference.apply_rotary_reference` for inputs `supports` takes."""
    out = torch.empty(x.shape, dtype=x.dtype)
    for b in range(x.shape[0]):
        rotate_into(x[b], cos, sin, out[b])
    return out
