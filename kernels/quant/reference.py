"""Readable reference of the quantized formats: exact dequantization, round-to-nearest
quantization, and the linear layer over a quantized weight.

Every fast path is checked against :func:`dequantize` followed by an fp32 product;
:func:`quantized_linear_reference` is also the path where the native kernel cannot run.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ..native import FEW_TOKENS
from .formats import (
    FP8_BLOCK,
    FP8_BLOCK_SIZE,
    INT4,
    INT4_GROUP_SIZE,
    INT4_MAX,
    INT4_OFFSET,
    INT8,
    INT8_MAX,
    QuantizedWeight,
)

# Rows of the weight dequantized at a time, so a product never holds a whole fp32 copy of it.
TILE_ELEMENTS = 1 << 22
# Up to this many rows of x, each row is its own matrix-vector product: its bits then do not
# depend on how many rows share the call (decode and draft verification agree).
ROWWISE_MAX_ROWS = FEW_TOKENS


def dequantize(weight: QuantizedWeight, rows: slice | None = None) -> Tensor:
    """The weight (or its output ``rows``) in fp32, exactly as the format defines it."""
    rows = rows or slice(0, weight.shape[-2])
    data = weight.data[..., rows, :]
    if weight.format == FP8_BLOCK:
        values = data.to(torch.float32)
        scale = weight.scale[..., rows.start // FP8_BLOCK_SIZE : -(-rows.stop // FP8_BLOCK_SIZE), :].float()
        scale = scale.repeat_interleave(FP8_BLOCK_SIZE, dim=-2).repeat_interleave(FP8_BLOCK_SIZE, dim=-1)
        offset = rows.start % FP8_BLOCK_SIZE
        return values * scale[..., offset : offset + values.shape[-2], : values.shape[-1]]
    if weight.format == INT8:
        return data.to(torch.float32) * weight.scale[..., rows, :].float()
    values = unpack_int4(data, weight.shape[-1]).to(torch.float32)
    group = weight.group_size or INT4_GROUP_SIZE
    scale = weight.scale[..., rows, :].float().repeat_interleave(group, dim=-1)
    return values * scale[..., : values.shape[-1]]


def unpack_int4(packed: Tensor, columns: int) -> Tensor:
    """uint8 `[..., ceil(K/2)]` (low nibble first, offset 8) -> int8 `[..., K]`."""
    low = (packed & 0x0F).to(torch.int8) - INT4_OFFSET
    high = (packed >> 4).to(torch.int8) - INT4_OFFSET
    return torch.stack((low, high), dim=-1).flatten(-2)[..., :columns]


def pack_int4(values: Tensor) -> Tensor:
    """int8 `[..., K]` in [-8, 7] -> uint8 `[..., ceil(K/2)]` (low nibble first, offset 8; a
    padding nibble is 0, as compressed-tensors writes it)."""
    stored = (values.to(torch.int16) + INT4_OFFSET).to(torch.uint8)
    if stored.shape[-1] % 2:
        stored = F.pad(stored, (0, 1))
    return stored[..., 0::2] | (stored[..., 1::2] << 4)


def quantize_int8(weight: Tensor) -> QuantizedWeight:
    """Symmetric per-output-row int8 of a weight `[*, N, K]`: scale = max |row| / 127."""
    w = weight.detach().to(torch.float32)
    scale = w.abs().amax(dim=-1, keepdim=True) / INT8_MAX
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    data = torch.round(w / scale).clamp_(-INT8_MAX, INT8_MAX).to(torch.int8)
    return QuantizedWeight(INT8, data, scale, tuple(weight.shape))


def quantize_int4(weight: Tensor, group_size: int = INT4_GROUP_SIZE) -> QuantizedWeight:
    """Symmetric int4 per group of ``group_size`` columns (the last group may be shorter):
    scale = max |group| / 7, values in [-7, 7]."""
    w = weight.detach().to(torch.float32)
    columns = w.shape[-1]
    padded = -(-columns // group_size) * group_size
    grouped = F.pad(w, (0, padded - columns)).unflatten(-1, (-1, group_size))
    scale = grouped.abs().amax(dim=-1) / INT4_MAX
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    values = torch.round(grouped / scale[..., None]).clamp_(-INT4_MAX, INT4_MAX).flatten(-2)[..., :columns]
    return QuantizedWeight(INT4, pack_int4(values.to(torch.int8)), scale, tuple(weight.shape), group_size)


def fp8_block(data: Tensor, scale_inv: Tensor) -> QuantizedWeight:
    """An official FP8 checkpoint's weight and its ``weight_scale_inv``."""
    return QuantizedWeight(FP8_BLOCK, data, scale_inv, tuple(data.shape))


def quantized_linear_reference(x: Tensor, weight: QuantizedWeight, bias: Tensor | None = None) -> Tensor:
    """x `[..., K]` times a quantized weight `[N, K]` -> `[..., N]` in x.dtype, computed in fp32.

    Up to :data:`ROWWISE_MAX_ROWS` rows each row is a matrix-vector product of its own; above,
    one product per tile of weight rows.
    """
    rows, columns = weight.shape
    flat = x.reshape(-1, columns).to(torch.float32)
    out = torch.empty(flat.shape[0], rows, dtype=torch.float32, device=x.device)
    tile = max(1, TILE_ELEMENTS // max(columns, 1))
    for start in range(0, rows, tile):
        stop = min(rows, start + tile)
        w = dequantize(weight, slice(start, stop))
        if flat.shape[0] <= ROWWISE_MAX_ROWS:
            for row in range(flat.shape[0]):
                out[row, start:stop] = torch.mv(w, flat[row])
        else:
            out[:, start:stop] = flat @ w.T
    if bias is not None:
        out += bias.float()
    return out.to(x.dtype).view(*x.shape[:-1], rows)
