"""Routed MoE in Triton: softmax top-k router and grouped SwiGLU expert GEMMs.

Router: a tiled GEMM writes the logits rounded to x.dtype (as the reference linear does), then
one kernel per block of tokens does the fp32 softmax, the top-k by k rounds of row argmax and
the renormalisation. The GEMM is a separate launch so that a decode step spreads the
`[E, hidden]` router weight over many programs instead of one.

Experts: the N * k (token, expert) slots are sorted by expert and each expert's run is padded
to a multiple of BLOCK_M (on device, without a host sync). One program handles one
(BLOCK_M slots of one expert, BLOCK_N output columns) tile, so only routed experts' weights
are read, each once per token block. Kernel 1 computes gate and up, applies SwiGLU and writes
the activations in x.dtype; kernel 2 applies down_proj and the routing weight per slot; the k
slots of a token are then summed in fp32. Rounding follows `reference.experts_swiglu` (gate,
up, silu, their product, the down projection and the weighting are each rounded to x.dtype).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..triton_utils import mma_dtype, next_power_of_2

# (BLOCK_M, BLOCK_N, BLOCK_K, warps) of the expert GEMMs. Decode: a handful of slots per
# expert, so short 16-row tiles (the smallest tensor-core M) and a long K step to stream
# weights; prefill: 64-row tiles that reuse each weight tile across more tokens.
DECODE_CONFIG = (16, 64, 128, 4)
PREFILL_CONFIG = (64, 128, 64, 8)
# Average slots per routed expert above which the prefill tiles pay off.
PREFILL_MIN_SLOTS_PER_EXPERT = 16
ROUTER_BLOCKS = (16, 64, 64)  # (tokens, experts, hidden) per router GEMM tile
TOPK_ROWS = 4  # tokens per top-k program: 4 x E fp32 probabilities in registers


@triton.jit
def _router_logits_kernel(
    x, w, logits, N, E, HID, s_x, s_w,
    BM: tl.constexpr, BE: tl.constexpr, BK: tl.constexpr, MMA: tl.constexpr,
):
    rows = tl.program_id(0) * BM + tl.arange(0, BM)
    cols = tl.program_id(1) * BE + tl.arange(0, BE)
    acc = tl.zeros((BM, BE), tl.float32)
    xrow = x + rows[:, None].to(tl.int64) * s_x
    wcol = w + cols[None, :].to(tl.int64) * s_w
    for k0 in range(0, HID, BK):
        kk = k0 + tl.arange(0, BK)
        xt = tl.load(xrow + kk[None, :], mask=(rows[:, None] < N) & (kk[None, :] < HID), other=0.0)
        wt = tl.load(wcol + kk[:, None], mask=(cols[None, :] < E) & (kk[:, None] < HID), other=0.0)
        acc = tl.dot(xt.to(MMA), wt.to(MMA), acc, input_precision="ieee")
    mask = (rows[:, None] < N) & (cols[None, :] < E)
    tl.store(logits + rows[:, None].to(tl.int64) * E + cols[None, :], acc.to(logits.dtype.element_ty), mask=mask)


@triton.jit
def _router_topk_kernel(
    logits, weights, ids, N, E,
    TOP_K: tl.constexpr, NORMALIZE: tl.constexpr, BM: tl.constexpr, BE: tl.constexpr, BKP: tl.constexpr,
):
    rows = tl.program_id(0) * BM + tl.arange(0, BM)
    cols = tl.arange(0, BE)
    live = rows < N
    lm = live[:, None] & (cols[None, :] < E)
    z = tl.load(logits + rows[:, None].to(tl.int64) * E + cols[None, :], mask=lm, other=0.0).to(tl.float32)
    z = tl.where(cols[None, :] < E, z, float("-inf"))
    p = tl.exp(z - tl.max(z, 1)[:, None])
    p = p / tl.sum(p, 1)[:, None]

    slot = tl.arange(0, BKP)
    top_w = tl.zeros((BM, BKP), tl.float32)
    top_i = tl.zeros((BM, BKP), tl.int64)
    p = tl.where(cols[None, :] < E, p, -1.0)  # padding columns are never picked
    for j in tl.static_range(TOP_K):
        best = tl.max(p, 1)
        # The lowest index among equal maxima, so the choice is deterministic.
        pick = tl.min(tl.where(p == best[:, None], cols[None, :], BE), 1)
        top_w = tl.where(slot[None, :] == j, best[:, None], top_w)
        top_i = tl.where(slot[None, :] == j, pick[:, None].to(tl.int64), top_i)
        p = tl.where(cols[None, :] == pick[:, None], -1.0, p)
    if NORMALIZE:
        top_w = top_w / tl.sum(top_w, 1)[:, None]
    out = rows[:, None].to(tl.int64) * TOP_K + slot[None, :]
    om = live[:, None] & (slot[None, :] < TOP_K)
    tl.store(weights + out, top_w.to(weights.dtype.element_ty), mask=om)
    tl.store(ids + out, top_i, mask=om)


@triton.jit
def _gate_up_kernel(
    x, w, block_expert, sorted_slots, act, S, E, I, HID, s_x, s_we, s_wn,
    TOP_K: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, MMA: tl.constexpr,
):
    pid_m, pid_n = tl.program_id(0), tl.program_id(1)
    e = tl.load(block_expert + pid_m).to(tl.int64)
    if e < E:  # blocks past the last padded run are spare grid, sized for the worst case
        r = pid_m * BM + tl.arange(0, BM)
        slots = tl.load(sorted_slots + r)
        live = slots < S
        tokens = (slots // TOP_K).to(tl.int64)
        n = pid_n * BN + tl.arange(0, BN)
        nmask = n < I
        wbase = w + e * s_we
        acc_gate = tl.zeros((BM, BN), tl.float32)
        acc_up = tl.zeros((BM, BN), tl.float32)
        for k0 in range(0, HID, BK):
            kk = k0 + tl.arange(0, BK)
            km = kk < HID
            xt = tl.load(x + tokens[:, None] * s_x + kk[None, :], mask=live[:, None] & km[None, :], other=0.0)
            wm = km[:, None] & nmask[None, :]
            wg = tl.load(wbase + n[None, :] * s_wn + kk[:, None], mask=wm, other=0.0)
            wu = tl.load(wbase + (I + n[None, :]) * s_wn + kk[:, None], mask=wm, other=0.0)
            xm = xt.to(MMA)
            acc_gate = tl.dot(xm, wg.to(MMA), acc_gate, input_precision="ieee")
            acc_up = tl.dot(xm, wu.to(MMA), acc_up, input_precision="ieee")
        dtype = act.dtype.element_ty
        gate = acc_gate.to(dtype).to(tl.float32)
        up = acc_up.to(dtype).to(tl.float32)
        silu = (gate * tl.sigmoid(gate)).to(dtype).to(tl.float32)
        h = (silu * up).to(dtype)
        tl.store(act + r[:, None].to(tl.int64) * I + n[None, :], h, mask=live[:, None] & nmask[None, :])


@triton.jit
def _down_kernel(
    act, w, weights, block_expert, sorted_slots, out, S, E, I, HID, s_we, s_wn,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, MMA: tl.constexpr,
):
    pid_m, pid_n = tl.program_id(0), tl.program_id(1)
    e = tl.load(block_expert + pid_m).to(tl.int64)
    if e < E:
        r = pid_m * BM + tl.arange(0, BM)
        slots = tl.load(sorted_slots + r)
        live = slots < S
        n = pid_n * BN + tl.arange(0, BN)
        nmask = n < HID
        wbase = w + e * s_we
        acc = tl.zeros((BM, BN), tl.float32)
        for k0 in range(0, I, BK):
            kk = k0 + tl.arange(0, BK)
            km = kk < I
            ht = tl.load(act + r[:, None].to(tl.int64) * I + kk[None, :], mask=live[:, None] & km[None, :], other=0.0)
            wd = tl.load(wbase + n[None, :] * s_wn + kk[:, None], mask=km[:, None] & nmask[None, :], other=0.0)
            acc = tl.dot(ht.to(MMA), wd.to(MMA), acc, input_precision="ieee")
        dtype = out.dtype.element_ty
        y = acc.to(dtype).to(tl.float32)
        gain = tl.load(weights + slots, mask=live, other=0.0).to(tl.float32)
        y = (y * gain[:, None]).to(dtype)
        tl.store(out + slots[:, None].to(tl.int64) * HID + n[None, :], y, mask=live[:, None] & nmask[None, :])


def route_triton(x: Tensor, router_weight: Tensor, top_k: int, normalize: bool) -> tuple[Tensor, Tensor]:
    """Contract of `reference.route`: x `[N, hidden]`, router_weight `[E, hidden]` ->
    (weights `[N, k]` in x.dtype, expert ids `[N, k]` int64, by descending probability)."""
    tokens, hidden = x.shape
    num_experts = router_weight.shape[0]
    if router_weight.shape[1] != hidden or not 0 < top_k <= num_experts:
        raise ValueError(f"router_weight {tuple(router_weight.shape)} / top_k {top_k} do not fit x {tuple(x.shape)}")
    x = x if x.stride(-1) == 1 else x.contiguous()
    router_weight = router_weight if router_weight.stride(-1) == 1 else router_weight.contiguous()
    weights = torch.empty(tokens, top_k, dtype=x.dtype, device=x.device)
    ids = torch.empty(tokens, top_k, dtype=torch.int64, device=x.device)
    if tokens == 0:
        return weights, ids
    logits = torch.empty(tokens, num_experts, dtype=x.dtype, device=x.device)
    bm, be, bk = ROUTER_BLOCKS
    _router_logits_kernel[(triton.cdiv(tokens, bm), triton.cdiv(num_experts, be))](
        x, router_weight, logits, tokens, num_experts, hidden, x.stride(0), router_weight.stride(0),
        BM=bm, BE=be, BK=bk, MMA=mma_dtype(x.dtype), num_warps=4,
    )
    _router_topk_kernel[(triton.cdiv(tokens, TOPK_ROWS),)](
        logits, weights, ids, tokens, num_experts,
        TOP_K=top_k, NORMALIZE=normalize, BM=TOPK_ROWS, BE=next_power_of_2(num_experts), BKP=next_power_of_2(top_k),
        num_warps=4,
    )
    return weights, ids


def align_slots(experts: Tensor, num_experts: int, block_m: int) -> tuple[Tensor, Tensor]:
    """Sort the N * k routing slots by expert into BLOCK_M-padded runs, on device (no sync).

    experts: `[N, k]` ids. Returns sorted_slots `[num_blocks * block_m]` (slot = token * k + j,
    padding = N * k) and block_expert `[num_blocks]` (the expert of each block; num_experts for
    spare blocks), with num_blocks = ceil(N k / block_m) + min(E, N k), the worst case.
    """
    flat = experts.flatten()
    slots = flat.numel()
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=num_experts)
    padded = (counts + block_m - 1) // block_m * block_m
    padded_end = torch.cumsum(padded, 0)
    padded_start = padded_end - padded
    start = torch.cumsum(counts, 0) - counts
    sorted_experts = flat[order]
    position = torch.arange(slots, device=flat.device) - start[sorted_experts] + padded_start[sorted_experts]
    num_blocks = triton.cdiv(slots, block_m) + min(num_experts, slots)
    sorted_slots = torch.full((num_blocks * block_m,), slots, dtype=torch.int32, device=flat.device)
    sorted_slots[position] = order.to(torch.int32)
    block_start = torch.arange(num_blocks, device=flat.device) * block_m
    block_expert = torch.searchsorted(padded_end, block_start, right=True).to(torch.int32)
    return sorted_slots, block_expert


def experts_swiglu_triton(
    x: Tensor, weights: Tensor, experts: Tensor, gate_up_proj: Tensor, down_proj: Tensor
) -> Tensor:
    """Contract of `reference.experts_swiglu`: x `[N, hidden]`; weights, experts `[N, k]`;
    gate_up_proj `[E, 2I, hidden]`; down_proj `[E, hidden, I]`. Returns `[N, hidden]` in x.dtype."""
    tokens, hidden = x.shape
    num_experts, double_width, _ = gate_up_proj.shape
    width = double_width // 2
    top_k = experts.shape[1]
    if gate_up_proj.shape[2] != hidden or down_proj.shape != (num_experts, hidden, width):
        shapes = f"{tuple(gate_up_proj.shape)}, {tuple(down_proj.shape)}"
        raise ValueError(f"expert weights {shapes} do not fit x {tuple(x.shape)}")
    if weights.shape != experts.shape or experts.shape[0] != tokens:
        raise ValueError(f"weights and experts must both be [N, k], got {tuple(weights.shape)}, {tuple(experts.shape)}")
    slots = tokens * top_k
    if slots == 0:
        return torch.zeros_like(x)
    x = x if x.stride(-1) == 1 else x.contiguous()
    gate_up_proj, down_proj = gate_up_proj.contiguous(), down_proj.contiguous()
    slot_weights = weights.reshape(slots).contiguous()

    prefill = slots >= PREFILL_MIN_SLOTS_PER_EXPERT * min(num_experts, slots)
    bm, bn, bk, warps = PREFILL_CONFIG if prefill else DECODE_CONFIG
    sorted_slots, block_expert = align_slots(experts, num_experts, bm)
    num_blocks = block_expert.numel()
    act = torch.empty(num_blocks * bm, width, dtype=x.dtype, device=x.device)
    per_slot = torch.empty(slots, hidden, dtype=x.dtype, device=x.device)
    mma = mma_dtype(x.dtype)
    _gate_up_kernel[(num_blocks, triton.cdiv(width, bn))](
        x, gate_up_proj, block_expert, sorted_slots, act, slots, num_experts, width, hidden,
        x.stride(0), gate_up_proj.stride(0), gate_up_proj.stride(1),
        TOP_K=top_k, BM=bm, BN=bn, BK=bk, MMA=mma, num_warps=warps, num_stages=3,
    )
    _down_kernel[(num_blocks, triton.cdiv(hidden, bn))](
        act, down_proj, slot_weights, block_expert, sorted_slots, per_slot, slots, num_experts, width, hidden,
        down_proj.stride(0), down_proj.stride(1),
        BM=bm, BN=bn, BK=bk, MMA=mma, num_warps=warps, num_stages=3,
    )
    return per_slot.view(tokens, top_k, hidden).sum(dim=1, dtype=torch.float32).to(x.dtype)


def sparse_moe_triton(
    x: Tensor, router_weight: Tensor, gate_up_proj: Tensor, down_proj: Tensor, top_k: int, normalize: bool
) -> Tensor:
    """Router then experts: the routed part of `model.layers.SparseMoE` for x `[N, hidden]`."""
    weights, experts = route_triton(x, router_weight, top_k, normalize)
    return experts_swiglu_triton(x, weights, experts, gate_up_proj, down_proj)
