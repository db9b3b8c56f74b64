"""Weights held quantized (official FP8 blocks, int8 per channel, int4 per group) and the linear
layer over them. Layouts are in `formats.py`; `reference.py` is the exact definition; `native.py`
binds the C kernel that takes decode and draft-verification calls (up to 16 rows) on the CPU, and
`moe_native.py` the one that runs a whole sparse MoE block with quantized experts for such calls
(`moe_reference.py` defines it); both read the weights through the dot products of `quant_dot.h`.
`prefill.py` takes longer calls on the CPU; `triton_quant.py` is the CUDA path (weights decoded
tile by tile inside one tiled GEMM).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..triton_utils import use_triton
from . import native, prefill
from .formats import FORMATS, FP8_BLOCK, INT4, INT4_GROUP_SIZE, INT8, QuantizedRows, QuantizedWeight
from .reference import (
    dequantize,
    fp8_block,
    pack_int4,
    quantize_int4,
    quantize_int8,
    quantized_linear_reference,
    unpack_int4,
)

__all__ = [
    "FORMATS",
    "FP8_BLOCK",
    "INT4",
    "INT4_GROUP_SIZE",
    "INT8",
    "QuantizedRows",
    "QuantizedWeight",
    "dequantize",
    "fp8_block",
    "pack_int4",
    "quantize_int4",
    "quantize_int8",
    "quantized_linear",
    "quantized_linear_reference",
    "unpack_int4",
    "uses_native",
]


def uses_native(x: Tensor, weight: QuantizedWeight) -> bool:
    """Whether `quantized_linear(x, weight)` takes the native kernel."""
    return native.supports(x, weight)


def quantized_linear(x: Tensor, weight: QuantizedWeight, bias: Tensor | None = None) -> Tensor:
    """x `[..., K]` times a quantized weight `[N, K]`, plus bias `[N]` -> `[..., N]` in x.dtype, in fp32.

    Up to 16 rows on a CPU the native kernel reads the quantized bytes directly (a row's bits do not
    depend on the other rows) and adds the bias before its one rounding to x.dtype, as the
    reference does; elsewhere the reference dequantizes tile by tile.
    """
    if use_triton(x):  # CUDA tensors; Triton is imported on this path only
        from .triton_quant import quantized_linear_triton, supports_triton

        if supports_triton(x, weight):
            return quantized_linear_triton(x, weight, bias)
    if prefill.supports(x, weight):
        return prefill.quantized_linear_bf16(x, weight, bias)
    if not native.supports(x, weight):
        return quantized_linear_reference(x, weight, bias)
    out = torch.empty(*x.shape[:-1], weight.shape[0], dtype=x.dtype)
    native.quantized_linear_small_m(x if x.dim() == 2 else x.reshape(-1, x.shape[-1]), weight, bias, out)
    return out
