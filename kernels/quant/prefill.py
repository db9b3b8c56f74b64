"""Prefill chunks (more than 16 rows) over quantized weights on the CPU, in bf16.

Weight tiles are dequantized exactly and rounded to bf16 by the native dequantizer
(`dequant_tiles.c`, bit-identical to `dequantize(...).to(torch.bfloat16)`, which runs where it
cannot), then multiplied with PyTorch's bf16 GEMM, which runs on AMX tiles or AVX-512 BF16 where
the CPU has them: the same arithmetic a bf16 checkpoint gets in prefill, with the weight stored in
fewer bytes. A tile never holds more than TILE_ELEMENTS weights.

Routed experts run in the experts kernel, which dequantizes their rows itself as it reaches them
(`kernels.moe.moe_experts_quantized`). Where it cannot, `quantized_experts` gives any bf16 experts
function the same values: it dequantizes only the experts a chunk routed tokens to, into bf16
buffers reused from call to call.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

import torch
from torch import Tensor

from ..native import FEW_TOKENS, native_bf16_matmul
from ..widened import WIDEN_ROWS, widened_linear
from . import dequant_native
from .formats import QuantizedRows, QuantizedWeight
from .reference import TILE_ELEMENTS, dequantize

# Fewer rows take the few-token kernels, whose bits must not depend on the call's size.
MIN_ROWS = FEW_TOKENS + 1
# Routed experts up to this many bf16 bytes (gate/up and down together) are dequantized for one
# call of the experts kernel; a chunk whose routed experts need more (the 80B's 512 experts: 3.2 GB)
# runs them in groups of EXPERT_GROUP_BYTES, small enough that a group's weights are still in the
# last-level cache when the kernel reads them (a 2,048-token chunk through the 80B's layers on 2
# threads: int4 17% and int8 13% faster than groups of 512 MB, whose weights went through memory
# twice, and 0.5 GB less resident).
EXPERT_BUFFER_BYTES = 512 << 20
EXPERT_GROUP_BYTES = 24 << 20


def supports(x: Tensor, weight: QuantizedWeight) -> bool:
    """bf16 activations of more than 16 rows on the CPU, a 2-D weight, no gradient wanted."""
    rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
    return (
        x.device.type == "cpu" and x.dtype == torch.bfloat16 and rows >= MIN_ROWS and len(weight.shape) == 2
        and not (torch.is_grad_enabled() and x.requires_grad)
    )


def bf16_tile(weight: QuantizedWeight, rows: slice, out: Tensor | None = None) -> Tensor:
    """The weight's ``rows`` `[len(rows), K]` exactly dequantized and rounded to bf16 (into ``out``
    when given): natively where the dequantizer runs, else through the reference."""
    if dequant_native.available():
        if out is None:
            return dequant_native.dequantize(weight, rows)
        return dequant_native.dequantize_into(weight, out, rows)
    tile = dequantize(weight, rows).to(torch.bfloat16)
    return tile if out is None else out.copy_(tile)


def quantized_linear_bf16(x: Tensor, weight: QuantizedWeight, bias: Tensor | None = None) -> Tensor:
    """x `[..., K]` bf16 times a quantized weight `[N, K]` -> `[..., N]` bf16, tile by tile in bf16
    (in fp32 where bf16 products are not native: kernels.widened)."""
    rows, columns = weight.shape
    if not native_bf16_matmul():
        # fp32 products of WIDEN_ROWS-row tiles, as a bf16 weight holding the same values gets.
        buffer = torch.empty(min(WIDEN_ROWS, rows), columns, dtype=torch.bfloat16)
        return widened_linear(x, rows, lambda start, stop: bf16_tile(weight, slice(start, stop),
                                                                     buffer[: stop - start]), bias)
    flat = x.reshape(-1, columns)
    out = torch.empty(flat.shape[0], rows, dtype=torch.bfloat16)
    tile = max(1, TILE_ELEMENTS // max(columns, 1))
    if tile >= rows:
        torch.matmul(flat, bf16_tile(weight, slice(0, rows)).T, out=out)
    else:
        buffer = torch.empty(tile, columns, dtype=torch.bfloat16)
        for start in range(0, rows, tile):
            stop = min(rows, start + tile)
            out[:, start:stop] = flat @ bf16_tile(weight, slice(start, stop), buffer[: stop - start]).T
    if bias is not None:
        out += bias.to(out.dtype)
    return out.view(*x.shape[:-1], rows)


def supports_experts(x: Tensor, gate_up: QuantizedRows | QuantizedWeight, down: QuantizedWeight) -> bool:
    """x `[N, H]` bf16 on the CPU with more than 16 rows, stacked quantized experts, no gradient wanted."""
    return (
        isinstance(gate_up, QuantizedRows | QuantizedWeight) and isinstance(down, QuantizedWeight)
        and len(gate_up.shape) == 3 and len(down.shape) == 3 and gate_up.device.type == down.device.type == "cpu"
        and x.device.type == "cpu" and x.dtype == torch.bfloat16 and x.dim() == 2 and x.shape[0] >= MIN_ROWS
        and not (torch.is_grad_enabled() and x.requires_grad)
    )


def quantized_experts(x: Tensor, weights: Tensor, experts: Tensor, gate_up: QuantizedRows | QuantizedWeight,
                      down: QuantizedWeight, bf16_experts: Callable[..., Tensor]) -> Tensor:
    """Routed experts over quantized weights -> `[N, H]` bf16, by ``bf16_experts`` (the contract of
    `kernels.moe.moe_experts`) on the routed experts' exact weights rounded to bf16.

    x `[N, H]`; weights, experts `[N, k]`; gate_up `[E, 2I, H]`; down `[E, H, I]`. The routed
    experts, in ascending order, are dequantized into compact buffers and the ids renumbered to
    match, so each token still sums its experts in ascending expert order. When they need more
    than EXPERT_BUFFER_BYTES, groups of experts of EXPERT_GROUP_BYTES run one after the other,
    each token-expert pair as its own row, and a token's outputs are summed in fp32 in that order
    and rounded once.
    """
    routed = torch.unique(experts)  # ascending
    per_expert = 2 * (gate_up.shape[1] * gate_up.shape[2] + down.shape[1] * down.shape[2])
    if len(routed) * per_expert <= EXPERT_BUFFER_BYTES:
        slot = torch.empty(gate_up.shape[0], dtype=torch.int64)
        slot[routed] = torch.arange(len(routed))
        return bf16_experts(x, weights, slot[experts], *_dense_experts(routed, gate_up, down))
    group = max(1, EXPERT_GROUP_BYTES // per_expert)
    flat = experts.flatten()
    order = flat.argsort(stable=True)
    bounds = torch.searchsorted(flat[order], routed[::group].contiguous()).tolist() + [len(order)]
    total = torch.zeros(x.shape, dtype=torch.float32)
    for index, start in enumerate(range(0, len(routed), group)):
        members, pairs = routed[start : start + group], order[bounds[index] : bounds[index + 1]]
        slot = torch.searchsorted(members, flat[pairs])
        tokens = pairs // experts.shape[1]
        routed_out = bf16_experts(x[tokens], weights.flatten()[pairs, None], slot[:, None],
                                  *_dense_experts(members, gate_up, down))
        total.index_add_(0, tokens, routed_out.float())
    return total.to(x.dtype)


_buffers = threading.local()


def _dense_experts(ids: Tensor, gate_up: QuantizedRows | QuantizedWeight,
                   down: QuantizedWeight) -> tuple[Tensor, Tensor]:
    """The experts ``ids`` of gate_up `[E, 2I, H]` and down `[E, H, I]` as bf16 `[len(ids), 2I, H]`
    and `[len(ids), H, I]`, in this thread's buffer (valid until its next call)."""
    _, width2, hidden = gate_up.shape
    _, _, width = down.shape
    gate_up_size, down_size = len(ids) * width2 * hidden, len(ids) * hidden * width
    buffer = getattr(_buffers, "tensor", None)
    if buffer is None or buffer.numel() < gate_up_size + down_size:
        _buffers.tensor = buffer = None  # the old buffer is freed before the new one is taken
        _buffers.tensor = buffer = torch.empty(gate_up_size + down_size, dtype=torch.bfloat16)
    dense_gate_up = buffer[:gate_up_size].view(len(ids), width2, hidden)
    dense_down = buffer[gate_up_size : gate_up_size + down_size].view(len(ids), hidden, width)
    start = 0
    for part in gate_up.parts if isinstance(gate_up, QuantizedRows) else (gate_up,):
        _expert_tiles(part, ids, dense_gate_up[:, start : start + part.shape[1]])
        start += part.shape[1]
    _expert_tiles(down, ids, dense_down)
    return dense_gate_up, dense_down


def _expert_tiles(weight: QuantizedWeight, ids: Tensor, out: Tensor) -> None:
    if dequant_native.available():
        dequant_native.dequantize_into(weight, out, experts=ids)
        return
    for index, expert in enumerate(ids.tolist()):
        out[index] = dequantize(weight[expert]).to(torch.bfloat16)
