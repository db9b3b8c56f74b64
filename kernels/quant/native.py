"""ctypes binding of `small_m_quant.c`, built for AVX-512 and for AVX2 + FMA; the CPU's best build runs."""

from __future__ import annotations

import ctypes
import functools
from pathlib import Path

import torch
from torch import Tensor

from ..native import ISAS, load
from .formats import FP8_BLOCK, INT4, INT4_GROUP_SIZE, INT8, QuantizedWeight

SOURCE = Path(__file__).with_name("small_m_quant.c")
# Builds in order of preference (keys of kernels.native.ISAS).
VARIANTS = ("avx512", "avx2")
# Rows of x the kernel takes; above, the reference's matrix products are the faster path.
MAX_ROWS = 16
# An int4 group must hold whole steps of the kernel's widest build (16 bytes, 32 columns).
INT4_GROUP_MULTIPLE = 32
_FORMAT_CODES = {FP8_BLOCK: 0, INT8: 1, INT4: 2}

_I64, _PTR, _INT = ctypes.c_int64, ctypes.c_void_p, ctypes.c_int
_ARGTYPES = (_INT, _PTR, _INT, _I64, _I64, _I64, _PTR, _I64, _I64, _PTR, _INT, _I64, _I64, _PTR, _INT, _PTR, _INT, _INT)
_HALF = (torch.float32, torch.bfloat16)

assert set(VARIANTS) <= set(ISAS)


@functools.cache
def kernel(isa: str | None = None):
    """The C function `quant_linear_small_m` built for `isa` (None: the first of VARIANTS this CPU
    runs), or None where it cannot run here."""
    if isa is None:
        return next((entry for entry in map(kernel, VARIANTS) if entry is not None), None)
    return load(SOURCE, "quant_linear_small_m", _ARGTYPES, isa=isa)


def lanes(isa: str) -> int | None:
    """The vector width in fp32 lanes of the `isa` build (16 or 8), or None where it cannot run here."""
    entry = load(SOURCE, "quant_small_m_lanes", (ctypes.POINTER(ctypes.c_int32),), isa=isa)
    if entry is None:
        return None
    value = ctypes.c_int32(0)
    entry(ctypes.byref(value))
    return value.value


def supports(x: Tensor, weight: QuantizedWeight) -> bool:
    """Whether the native kernel can take x `[..., K]` times `weight`: a 2-D weight on the CPU,
    x fp32 or bf16 with at most MAX_ROWS rows, no gradient asked for, and a build this CPU runs."""
    if len(weight.shape) != 2 or weight.device.type != "cpu" or x.device.type != "cpu":
        return False
    if x.dtype not in (torch.float32, torch.bfloat16) or x.shape[-1] != weight.shape[-1] or x.shape[-1] == 0:
        return False
    if weight.format == INT4 and (weight.group_size or INT4_GROUP_SIZE) % INT4_GROUP_MULTIPLE:
        return False
    if torch.is_grad_enabled() and x.requires_grad:
        return False
    rows = x.numel() // x.shape[-1]
    return 0 < rows <= MAX_ROWS and kernel() is not None


def quantized_linear_small_m(x: Tensor, weight: QuantizedWeight, bias: Tensor | None = None, out: Tensor | None = None,
                             out_dtype: torch.dtype = torch.float32, isa: str | None = None,
                             threads: int | None = None) -> Tensor:
    """x `[M, K]` fp32 or bf16 with unit column stride, weight `[N, K]`, bias `[N]` or None ->
    `[M, N]`: the fp32 sum plus the bias, rounded once to out_dtype (fp32 or bf16), written into
    `out` (contiguous, M * N elements of out_dtype) when given, over `threads` threads (default:
    torch's count). The caller checks that `kernel(isa)` is not None."""
    rows, columns = x.shape
    if x.stride(-1) != 1:
        x = x.contiguous()
    data = weight.data if weight.data.is_contiguous() else weight.data.contiguous()
    scale = weight.scale if weight.scale.dtype in _HALF else weight.scale.float()
    scale = scale if scale.is_contiguous() else scale.contiguous()
    if bias is not None:
        bias = bias if bias.dtype in _HALF else bias.float()
        bias = bias if bias.is_contiguous() else bias.contiguous()
    if out is None:
        out = torch.empty(rows, weight.shape[0], dtype=out_dtype)
    if out.dtype not in _HALF or not out.is_contiguous() or out.numel() != rows * weight.shape[0]:
        raise ValueError(f"out must be contiguous fp32 or bf16 with {rows} x {weight.shape[0]} elements")
    kernel(isa)(_FORMAT_CODES[weight.format], x.data_ptr(), int(x.dtype == torch.bfloat16), x.stride(0), rows, columns,
                data.data_ptr(), data.shape[-1], weight.shape[0], scale.data_ptr(), int(scale.dtype == torch.bfloat16),
                scale.shape[-1], weight.group_size or INT4_GROUP_SIZE,
                None if bias is None else bias.data_ptr(), int(bias is not None and bias.dtype == torch.bfloat16),
                out.data_ptr(), int(out.dtype == torch.bfloat16),
                torch.get_num_threads() if threads is None else threads)
    return out
