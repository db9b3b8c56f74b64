"""Binding of `norm_bf16.c` (AVX-512 BF16 and AVX2 + FMA + F16C builds): the RMS norms over bf16 rows on CPU."""

from __future__ import annotations

from pathlib import Path

import torch

from ..native import Kernel

MAX_DIM = 16384
_SOURCE = Path(__file__).with_name("norm_bf16.c")
_ISAS = ("avx512", "avx2")
RMS_NORM = Kernel(_SOURCE, "rms_norm_bf16", "piiiiiiipnfpn", isas=_ISAS)
GATED_RMS_NORM = Kernel(_SOURCE, "gated_rms_norm_bf16", "ppiiiiiiiiiipfpn", isas=_ISAS)
ADD_RMS_NORM = Kernel(_SOURCE, "add_rms_norm_bf16", "pppiipnfpn", isas=_ISAS)


def kernels() -> tuple[Kernel, Kernel] | None:
    """(rms_norm_bf16, gated_rms_norm_bf16) where a build of them runs here, else None."""
    return (RMS_NORM, GATED_RMS_NORM) if RMS_NORM.available() and GATED_RMS_NORM.available() else None


def add_kernel() -> Kernel | None:
    """`add_rms_norm_bf16` where a build of it runs here, else None."""
    return ADD_RMS_NORM if ADD_RMS_NORM.available() else None


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
             out: torch.Tensor | None = None, threads: int | None = None) -> torch.Tensor:
    """The contract of `norm.rms_norm` for inputs `supports` takes; into `out` (contiguous) when given,
    on `threads` threads (default: torch's count)."""
    sizes, strides = _rows(x)
    if out is None:
        out = torch.empty(x.shape, dtype=x.dtype)
    RMS_NORM(x, *sizes, *strides, x.shape[-1], weight, int(zero_centered), eps, out, threads or torch.get_num_threads())
    return out


def gated_rms_norm(x: torch.Tensor, z: torch.Tensor, weight: torch.Tensor, eps: float,
                   out: torch.Tensor | None = None, threads: int | None = None) -> torch.Tensor:
    """The contract of `norm.gated_rms_norm` for inputs `supports` takes; into `out` (contiguous) when given,
    on `threads` threads (default: torch's count)."""
    sizes, strides = _rows(x)
    _, gate_strides = _rows(z)
    if out is None:
        out = torch.empty(x.shape, dtype=x.dtype)
    GATED_RMS_NORM(x, z, *sizes, *strides, *gate_strides, x.shape[-1], weight, eps, out,
                   threads or torch.get_num_threads())
    return out


def add_rms_norm(residual: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor, eps: float,
                 zero_centered: bool, out: torch.Tensor, total: torch.Tensor | None = None,
                 threads: int | None = None) -> None:
    """total = residual + delta (rounded as torch's bf16 add rounds), then out = rms_norm(total): a
    residual connection and the next norm in one pass. total defaults to residual (updated in place).
    All `[rows, D]` contiguous bf16 with D a multiple of 16; the caller checks `add_kernel()` is not None."""
    rows, dim = residual.shape
    total = residual if total is None else total
    ADD_RMS_NORM(residual, delta, total, rows, dim, weight, int(zero_centered), eps, out,
                 threads or torch.get_num_threads())
