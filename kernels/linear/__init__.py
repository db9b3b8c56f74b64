"""Linear layers for a handful of rows (decode steps, draft verification, small expert groups).

PyTorch's bf16 GEMM on CPU is slow for one row and rounds a row differently depending on how
many rows share the call. On CPUs with AVX-512 BF16 or AVX2 + FMA the native kernel here is faster
and gives each row the same bits whatever the batch, up to kernels.native.FEW_TOKENS rows; elsewhere,
and for larger batches (where PyTorch's blocked GEMM is faster), `F.linear` runs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ..native import FEW_TOKENS, native_bf16_matmul
from ..quant import QuantizedRows, QuantizedWeight, quantized_linear
from ..widened import WIDEN_ROWS, widened_linear
from . import native
from .reference import linear_reference

__all__ = ["WIDEN_ROWS", "linear", "linear_reference", "uses_native"]


def uses_native(x: Tensor, weight: Tensor) -> bool:
    """Whether `linear(x, weight)` takes the native small-row kernel."""
    if x.device.type != "cpu" or x.dtype != torch.bfloat16 or weight.dtype != torch.bfloat16:
        return False
    rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
    # The native kernel has no backward: keep autograd's path whenever a gradient could be asked for.
    needs_grad = torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)
    return 0 < rows <= FEW_TOKENS and weight.is_contiguous() and not needs_grad and native.kernel() is not None


def _linear_widened(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """`linear` for bf16 x and weight on CPUs without native bf16 products (kernels.widened)."""
    return widened_linear(x, weight.shape[0], lambda start, stop: weight[start:stop], bias)


def linear(x: Tensor, weight: Tensor | QuantizedWeight | QuantizedRows, bias: Tensor | None = None) -> Tensor:
    """x `[..., K]`, weight `[N, K]` (a tensor or a quantized weight), bias `[N]` or None -> `[..., N]` in x.dtype."""
    if isinstance(weight, QuantizedWeight):
        return quantized_linear(x, weight, bias)
    if isinstance(weight, QuantizedRows):
        out = torch.cat([quantized_linear(x, part) for part in weight.parts], dim=-1)
        return out if bias is None else out + bias
    if not uses_native(x, weight):
        if x.device.type == "cpu" and x.dtype == weight.dtype == torch.bfloat16 and not native_bf16_matmul():
            return _linear_widened(x, weight, bias)
        return F.linear(x, weight, bias)
    flat = x.reshape(-1, x.shape[-1])
    if flat.stride(-1) != 1:
        flat = flat.contiguous()
    out = native.linear_small_m(flat, weight, x.dtype).view(*x.shape[:-1], weight.shape[0])
    return out if bias is None else out + bias
