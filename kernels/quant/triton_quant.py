"""Linear layer over a quantized weight in Triton: x `[M, K]` times a `QuantizedWeight` `[N, K]`.

One tiled GEMM serves the three formats (``FORMAT`` constexpr). A program owns a `[BM, BN]`
output tile accumulated in fp32. Each K step loads the raw quantized bytes of a `[BK, BN]` weight
tile, decodes them to their stored values (int8, int4 or e4m3: all exact in bf16 and fp16, so
the tensor cores see the format's exact values) and multiplies them with the x tile by `tl.dot`;
the scale is applied to that partial product. No dequantized copy of the weight is ever written.

Scales are applied after the dot because BK divides the scale group along K, so the scale is
one `[BN]` vector per step: fp8 blocks (128 x 128) give `scale[n // 128, k0 // 128]`, int4 groups
give `scale[n, k0 // group]`, and int8's single per-row scale multiplies the accumulator once at
the end. This rounds differently from `reference.dequantize` (which rounds each `q * s` to fp32)
but is no less accurate: products of exact values, fp32 sums, one scale multiply per group.

int4: a byte holds columns 2j (low nibble) and 2j+1 (high nibble). The kernel loads the
`[BK/2, BN]` packed bytes as they are and splits the x tile into its even and odd columns
instead, so two dots of depth BK/2 replace any interleaving of the weight. For odd K, the
padding nibble meets an x column masked to zero.

FP8 e4m3: on CUDA GPUs of compute capability 8.9 and above the bytes are loaded as Triton's
``float8e4nv`` and converted by the hardware. Elsewhere (older GPUs, which Triton's fp8 casts do
not support, and the CPU interpreter, whose cast reads the NaN codes 0x7F / 0xFF as +-480) they are
loaded as uint8 and decoded with integer ops by `_e4m3_to_fp32`, exactly, NaN included.

Bias is added in fp32 and the result rounded once to x.dtype, as the reference does.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..triton_utils import interpreting, mma_dtype, use_triton
from .formats import FP8_BLOCK, FP8_BLOCK_SIZE, INT4, INT4_GROUP_SIZE, INT8, QuantizedWeight

# The kernel's FORMAT codes.
FP8_CODE = tl.constexpr(0)
INT8_CODE = tl.constexpr(1)
INT4_CODE = tl.constexpr(2)
_FORMAT_CODES = {FP8_BLOCK: FP8_CODE.value, INT8: INT8_CODE.value, INT4: INT4_CODE.value}
# (BM, BN, BK, warps, stages). Decode: 16 rows (the smallest tensor-core M) and narrow column
# tiles, so a few rows still spread the weight over many programs; prefill: 64-row tiles that
# reuse each decoded weight tile across more rows. BK = 128 matches the fp8 block and int4 group.
DECODE_CONFIG = (16, 32, 128, 4, 4)
PREFILL_CONFIG = (64, 128, 128, 8, 3)
DECODE_MAX_ROWS = 16
# An int4 step spans BK columns inside one group, and each half (even / odd columns) must be a
# `tl.dot` operand of depth >= 16: groups must be multiples of 32.
INT4_GROUP_MULTIPLE = 32
X_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@triton.jit
def _e4m3_to_fp32(bits):
    """float8 e4m3fn codes (uint8) -> fp32: sign, 4-bit exponent of bias 7, 3-bit mantissa,
    subnormals, no infinities, 0x7F and 0xFF are NaN."""
    code = bits.to(tl.int32)
    magnitude = code & 0x7F
    # Normal numbers: rebias the exponent (e - 7 + 127) and put the mantissa atop fp32's 23 bits.
    normal = ((magnitude << 20) + (120 << 23)).to(tl.float32, bitcast=True)
    subnormal = magnitude.to(tl.float32) * 0.001953125  # exponent field 0: m/8 * 2^-6 = m * 2^-9
    value = tl.where(magnitude < 8, subnormal, normal)
    value = tl.where(magnitude == 0x7F, float("nan"), value)
    return tl.where(code >= 0x80, -value, value)


@triton.jit
def _quantized_linear_kernel(
    x, data, scale, bias, out, M, N, K, group, s_xm, s_dn, s_sr, s_sg,
    FORMAT: tl.constexpr, FP8_NATIVE: tl.constexpr, HAS_BIAS: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, MMA: tl.constexpr,
):
    rows = tl.program_id(0) * BM + tl.arange(0, BM)
    cols = tl.program_id(1) * BN + tl.arange(0, BN)
    rmask, cmask = rows < M, cols < N
    x_rows = x + rows[:, None].to(tl.int64) * s_xm
    w_cols = data + cols[None, :].to(tl.int64) * s_dn
    if FORMAT == FP8_CODE:  # fp8 blocks are square: `group` rows share a scale row too
        scale_rows = scale + (cols // group).to(tl.int64) * s_sr
    else:
        scale_rows = scale + cols.to(tl.int64) * s_sr

    acc = tl.zeros((BM, BN), tl.float32)
    for k0 in range(0, K, BK):
        kk = k0 + tl.arange(0, BK)
        xt = tl.load(x_rows + kk[None, :], mask=rmask[:, None] & (kk < K)[None, :], other=0.0)
        if FORMAT == INT4_CODE:
            kb = k0 // 2 + tl.arange(0, BK // 2)
            bmask = (kb < (K + 1) // 2)[:, None] & cmask[None, :]
            # 0x88: both nibbles of a masked byte decode to 0.
            packed = tl.load(w_cols + kb[:, None], mask=bmask, other=0x88).to(tl.int32)
            low = ((packed & 0xF) - 8).to(tl.float32).to(MMA)
            high = ((packed >> 4) - 8).to(tl.float32).to(MMA)
            x_even, x_odd = tl.split(tl.reshape(xt, (BM, BK // 2, 2)))
            part = tl.dot(x_even.to(MMA), low, input_precision="ieee")
            part = tl.dot(x_odd.to(MMA), high, part, input_precision="ieee")
        else:
            raw = tl.load(w_cols + kk[:, None], mask=(kk < K)[:, None] & cmask[None, :], other=0.0)
            if FORMAT == FP8_CODE and not FP8_NATIVE:
                w = _e4m3_to_fp32(raw)
            else:
                w = raw.to(tl.float32)
            if FORMAT == INT8_CODE:  # int8: the per-row scale waits until the end
                acc = tl.dot(xt.to(MMA), w.to(MMA), acc, input_precision="ieee")
            else:
                part = tl.dot(xt.to(MMA), w.to(MMA), input_precision="ieee")
        if FORMAT != INT8_CODE:
            s = tl.load(scale_rows + (k0 // group) * s_sg, mask=cmask, other=0.0).to(tl.float32)
            acc += part * s[None, :]
    if FORMAT == INT8_CODE:
        acc *= tl.load(scale_rows, mask=cmask, other=0.0).to(tl.float32)[None, :]
    if HAS_BIAS:
        acc += tl.load(bias + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
    mask = rmask[:, None] & cmask[None, :]
    tl.store(out + rows[:, None].to(tl.int64) * N + cols[None, :], acc.to(out.dtype.element_ty), mask=mask)


def fp8_native(device: torch.device) -> bool:
    """Whether fp8 weights on `device` are converted by the hardware (CUDA, capability >= 8.9)
    rather than decoded with integer ops."""
    if interpreting() or device.type != "cuda" or torch.version.hip is not None:
        return False
    return torch.cuda.get_device_capability(device) >= (8, 9)


def unsupported(x: Tensor, weight: QuantizedWeight) -> str | None:
    """Why `quantized_linear_triton` cannot take x `[..., K]` times `weight`, or None if it can
    (devices aside: the interpreter runs it on the CPU)."""
    if not isinstance(weight, QuantizedWeight) or len(weight.shape) != 2:
        return "the weight must be a 2-D QuantizedWeight"
    if x.dtype not in X_DTYPES:
        return f"x of dtype {x.dtype}; expected float32, bfloat16 or float16"
    if x.dim() == 0 or x.shape[-1] != weight.shape[-1]:
        return f"x {list(x.shape)} does not fit a weight {list(weight.shape)}"
    if x.device != weight.data.device or x.device != weight.scale.device:
        return f"x on {x.device}, weight on {weight.data.device} / {weight.scale.device}"
    if weight.format == INT4 and (weight.group_size or INT4_GROUP_SIZE) % INT4_GROUP_MULTIPLE:
        return f"int4 group of {weight.group_size} columns; the kernel needs a multiple of {INT4_GROUP_MULTIPLE}"
    if torch.is_grad_enabled() and x.requires_grad:
        return "x requires a gradient, which the kernel does not compute"
    return None


def supports_triton(x: Tensor, weight: QuantizedWeight) -> bool:
    """Whether `quantized_linear(x, weight)` should take the Triton kernel: CUDA tensors with
    Triton importable, and a layout the kernel handles (see `unsupported`)."""
    return use_triton(x) and unsupported(x, weight) is None


def quantized_linear_triton(x: Tensor, weight: QuantizedWeight, bias: Tensor | None = None) -> Tensor:
    """x `[..., K]` (fp32, bf16 or fp16) times a quantized weight `[N, K]`, plus bias `[N]` ->
    `[..., N]` in x.dtype, accumulated in fp32 with the weight decoded tile by tile."""
    reason = unsupported(x, weight)
    if reason is not None:
        raise ValueError(reason)
    rows_out, columns = weight.shape
    flat = x.reshape(-1, columns)
    if flat.stride(-1) != 1:
        flat = flat.contiguous()
    rows = flat.shape[0]
    out = torch.empty(rows, rows_out, dtype=x.dtype, device=x.device)
    if rows == 0 or rows_out == 0:
        return out.view(*x.shape[:-1], rows_out)
    if bias is not None and tuple(bias.shape) != (rows_out,):
        raise ValueError(f"bias of shape {list(bias.shape)} for {rows_out} outputs")
    if bias is not None and bias.stride(0) != 1:
        bias = bias.contiguous()

    data = weight.data if weight.data.stride(-1) == 1 else weight.data.contiguous()
    native = weight.format == FP8_BLOCK and fp8_native(x.device)
    if weight.format == FP8_BLOCK and not native:
        data = data.view(torch.uint8)  # the e4m3 codes, decoded in the kernel
    scale = weight.scale
    group = FP8_BLOCK_SIZE if weight.format == FP8_BLOCK else weight.group_size or INT4_GROUP_SIZE

    bm, bn, bk, warps, stages = DECODE_CONFIG if rows <= DECODE_MAX_ROWS else PREFILL_CONFIG
    if weight.format == INT4:
        bk = min(bk, group & -group)  # a step must stay inside one group: its largest power-of-two divisor
    _quantized_linear_kernel[(triton.cdiv(rows, bm), triton.cdiv(rows_out, bn))](
        flat, data, scale, bias if bias is not None else flat, out,
        rows, rows_out, columns, group, flat.stride(0), data.stride(0), scale.stride(0), scale.stride(1),
        FORMAT=_FORMAT_CODES[weight.format], FP8_NATIVE=native, HAS_BIAS=bias is not None,
        BM=bm, BN=bn, BK=bk, MMA=mma_dtype(x.dtype), num_warps=warps, num_stages=stages,
    )
    return out.view(*x.shape[:-1], rows_out)
