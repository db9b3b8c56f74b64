"""Binding of `dequant_tiles.c`: quantized weight rows to bf16 (or fp32) tiles, bit-identical to
`reference.dequantize(weight, rows).to(dtype)`, for the prefill path's GEMMs."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

from ..native import Kernel
from .formats import INT4_GROUP_SIZE, QuantizedWeight
from .native import FORMAT_CODES

DEQUANTIZE = Kernel(Path(__file__).with_name("dequant_tiles.c"), "dequantize_rows", "npiipniiipiiiipniin",
                    isas=("avx512", "avx512f", "avx2"))
_TILE_DTYPES = (torch.bfloat16, torch.float32)
_SCALE_DTYPES = (torch.float32, torch.bfloat16)


def available() -> bool:
    return DEQUANTIZE.available()


def dequantize_into(weight: QuantizedWeight, out: Tensor, rows: slice | None = None, experts: Tensor | None = None,
                    threads: int | None = None) -> Tensor:
    """Writes the weight's ``rows`` (default all) into ``out``, rounded to its dtype (bf16 or fp32).

    A 2-D weight `[N, K]` fills ``out`` `[len(rows), K]`. Of a stacked weight `[E, N, K]`, the
    ``experts`` (ids, default all E) fill ``out`` `[len(experts), len(rows), K]`, the i-th listed
    into ``out[i]``. ``out`` needs unit column stride; its rows and experts may be strided (a
    slice of a wider buffer). Runs the build of `DEQUANTIZE.isa()` over `threads` (default torch's count).
    """
    *lead, total_rows, columns = weight.shape
    rows = rows or slice(0, total_rows)
    count = rows.stop - rows.start
    if len(lead) > 1 or rows.step not in (None, 1) or not 0 <= rows.start <= rows.stop <= total_rows:
        raise ValueError(f"rows {rows} of a weight {list(weight.shape)}")
    if lead and experts is None:
        experts = torch.arange(lead[0])
    shape = (len(experts), count, columns) if lead else (count, columns)
    if out.dtype not in _TILE_DTYPES or out.shape != shape or (columns > 1 and out.stride(-1) != 1):
        raise ValueError(f"out must be bf16 or fp32 of shape {list(shape)} with unit column stride")
    data = weight.data if weight.data.stride(-1) == 1 else weight.data.contiguous()
    scale = weight.scale if weight.scale.dtype in _SCALE_DTYPES else weight.scale.float()
    if scale.shape[-1] > 1 and scale.stride(-1) != 1:
        scale = scale.contiguous()
    if lead:
        experts = experts.to(torch.int64).contiguous()
        if len(experts) and not 0 <= int(experts.min()) <= int(experts.max()) < lead[0]:
            raise ValueError(f"expert ids outside [0, {lead[0]})")
        data_expert, scale_expert, out_expert = data.stride(0), scale.stride(0), out.stride(0)
    else:
        experts, data_expert, scale_expert, out_expert = None, 0, 0, 0
    DEQUANTIZE(FORMAT_CODES[weight.format], data, data_expert, data.stride(-2), scale,
               int(scale.dtype == torch.bfloat16), scale_expert, scale.stride(-2), weight.group_size or INT4_GROUP_SIZE,
               experts, len(experts) if lead else 1, rows.start, count, columns,
               out, int(out.dtype == torch.bfloat16), out_expert, out.stride(-2),
               torch.get_num_threads() if threads is None else threads)
    return out


def dequantize(weight: QuantizedWeight, rows: slice | None = None, dtype: torch.dtype = torch.bfloat16) -> Tensor:
    """The weight's ``rows`` as a new `[*, len(rows), K]` tensor of ``dtype`` (bf16 or fp32)."""
    rows = rows or slice(0, weight.shape[-2])
    out = torch.empty(*weight.shape[:-2], rows.stop - rows.start, weight.shape[-1], dtype=dtype)
    return dequantize_into(weight, out, rows)
