"""Binding of `small_m_quant.c` (the linear layer over a quantized weight for up to 16 rows), built for
AVX-512 with and without BF16 and for AVX2 + FMA + F16C; the build of `SMALL_M.isa()` runs (see
kernels.native)."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

from ..native import FEW_TOKENS, Kernel, int4_pairs_preferred
from .formats import FP8_BLOCK, INT4, INT4_GROUP_SIZE, INT8, QuantizedWeight

SOURCE = Path(__file__).with_name("small_m_quant.c")
# Builds in order of preference (keys of kernels.native.ISAS).
VARIANTS = ("avx512", "avx512f", "avx2")
# Rows of x the kernel takes; above, the reference's matrix products are the faster path.
MAX_ROWS = FEW_TOKENS
# An int4 group must hold whole steps of the kernel's widest build (16 bytes, 32 columns).
INT4_GROUP_MULTIPLE = 32
# The C side's format codes (formats.h); bf16 weights are read as stored.
FORMAT_CODES = {FP8_BLOCK: 0, INT8: 1, INT4: 2}
BF16_CODE = 3
# Dtypes the kernels read scales, biases and activations in, and write outputs in.
HALF_OR_FLOAT = (torch.float32, torch.bfloat16)

SMALL_M = Kernel(SOURCE, "quant_linear_small_m", "npniiipiipniipnpnnn", isas=VARIANTS)
_LANES = Kernel(SOURCE, "quant_small_m_lanes", "p", isas=VARIANTS)


def kernel(isa: str | None = None) -> Kernel | None:
    """The small-row kernel if its `isa` build (None: the one this process runs) can run here, else None."""
    return SMALL_M if SMALL_M.entry(isa or SMALL_M.isa()) is not None else None


def lanes(isa: str) -> int | None:
    """The vector width in fp32 lanes of the `isa` build (16 or 8), or None where it cannot run here."""
    if _LANES.entry(isa) is None:
        return None
    value = torch.zeros(1, dtype=torch.int32)
    _LANES(value, isa=isa)
    return int(value)


def int4_group_fits(weight: QuantizedWeight) -> bool:
    """Whether an int4 weight's groups hold whole steps of every build (other formats: True)."""
    return weight.format != INT4 or (weight.group_size or INT4_GROUP_SIZE) % INT4_GROUP_MULTIPLE == 0


def supports(x: Tensor, weight: QuantizedWeight) -> bool:
    """Whether the native kernel can take x `[..., K]` times `weight`: a 2-D weight on the CPU,
    x fp32 or bf16 with at most MAX_ROWS rows, no gradient asked for, and a build this CPU runs."""
    if len(weight.shape) != 2 or weight.device.type != "cpu" or x.device.type != "cpu":
        return False
    if x.dtype not in HALF_OR_FLOAT or x.shape[-1] != weight.shape[-1] or x.shape[-1] == 0:
        return False
    if not int4_group_fits(weight):
        return False
    if torch.is_grad_enabled() and x.requires_grad:
        return False
    rows = x.numel() // x.shape[-1]
    return 0 < rows <= MAX_ROWS and kernel() is not None


def half_or_float(tensor: Tensor) -> Tensor:
    """`tensor` contiguous in fp32 or bf16 (as stored when it already is one of them)."""
    tensor = tensor if tensor.dtype in HALF_OR_FLOAT else tensor.float()
    return tensor if tensor.is_contiguous() else tensor.contiguous()


class BoundWeight:
    """A 2-D quantized weight (and optional bias) with the kernel's weight arguments checked and
    converted once, for callers that multiply the same weight many times (the few-token forward)."""

    def __init__(self, weight: QuantizedWeight, bias: Tensor | None = None):
        if len(weight.shape) != 2 or not int4_group_fits(weight):
            raise ValueError(f"the small-row kernel takes 2-D weights with whole int4 steps, not {weight.shape}")
        self.weight = weight
        self.data = weight.data if weight.data.is_contiguous() else weight.data.contiguous()
        self.scale = half_or_float(weight.scale)
        self.bias = None if bias is None else half_or_float(bias)
        self.rows, self.columns = weight.shape
        self._weight_args = (self.data.data_ptr(), self.data.shape[-1], self.rows, self.scale.data_ptr(),
                             int(self.scale.dtype == torch.bfloat16), self.scale.shape[-1],
                             weight.group_size or INT4_GROUP_SIZE,
                             None if self.bias is None else self.bias.data_ptr(),
                             int(self.bias is not None and self.bias.dtype == torch.bfloat16))
        self._format = FORMAT_CODES[weight.format]

    def __call__(self, x: Tensor, out: Tensor, isa: str | None = None, threads: int | None = None,
                 int4_pairs: bool | None = None) -> Tensor:
        """x `[M, K]` fp32 or bf16 with unit column stride -> `out` `[M, N]` (contiguous, fp32 or bf16):
        the fp32 sum plus the bias, rounded once to out's dtype, over `threads` threads (default:
        torch's); int4 times bf16 x by pair products where `int4_pairs` (default: where this CPU
        prefers them, kernels.native.int4_pairs_preferred) and the build and group allow."""
        pairs = int4_pairs_preferred() if int4_pairs is None else int4_pairs
        SMALL_M(self._format, x, int(x.dtype == torch.bfloat16), x.stride(0), x.shape[0], self.columns,
                *self._weight_args, out, int(out.dtype == torch.bfloat16), int(pairs),
                torch.get_num_threads() if threads is None else threads, isa=isa)
        return out


def quantized_linear_small_m(x: Tensor, weight: QuantizedWeight, bias: Tensor | None = None, out: Tensor | None = None,
                             out_dtype: torch.dtype = torch.float32, isa: str | None = None,
                             threads: int | None = None, int4_pairs: bool | None = None) -> Tensor:
    """x `[M, K]` fp32 or bf16 with unit column stride, weight `[N, K]`, bias `[N]` or None ->
    `[M, N]`: the fp32 sum plus the bias, rounded once to out_dtype (fp32 or bf16), written into
    `out` (contiguous, M * N elements of out_dtype) when given, over `threads` threads (default:
    torch's count), int4 by pair products as BoundWeight decides. The caller checks that
    `kernel(isa)` is not None."""
    if x.stride(-1) != 1:
        x = x.contiguous()
    if out is None:
        out = torch.empty(x.shape[0], weight.shape[0], dtype=out_dtype)
    if out.dtype not in HALF_OR_FLOAT or not out.is_contiguous() or out.numel() != x.shape[0] * weight.shape[0]:
        raise ValueError(f"out must be contiguous fp32 or bf16 with {x.shape[0]} x {weight.shape[0]} elements")
    return BoundWeight(weight, bias)(x, out, isa=isa, threads=threads, int4_pairs=int4_pairs)
