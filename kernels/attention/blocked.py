"""Causal attention over a K/V cache without a `[T, S]` mask.

A prompt chunk of T tokens after P cached ones is split into two exact pieces: the chunk's
own keys (a square causal problem, so the kernel's built-in causal flag is correct) and the
P earlier keys (fully visible, no mask at all). Each piece returns its log-sum-exp and the
two are merged, which is the same softmax over all P + T keys.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..native import tiles_pay_off
from . import native

_flash_cpu = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, scale: float):
    """q `[B, H, L, D]`, k/v `[B, H, S, D]` -> (out `[B, H, L, D]`, lse `[B, H, L]` fp32)."""
    if _flash_cpu is not None and q.device.type == "cpu" and q.dtype in (torch.float32, torch.bfloat16):
        out, lse = _flash_cpu(q, k, v, 0.0, causal, scale=scale)[:2]
        return out, lse
    scores = torch.matmul(q.float(), k.float().transpose(-1, -2)) * scale
    if causal:
        length = q.shape[-2]
        mask = torch.ones(length, length, dtype=torch.bool, device=q.device).triu(1)
        scores = scores.masked_fill(mask, float("-inf"))
    lse = scores.logsumexp(dim=-1)
    probs = torch.exp(scores - lse[..., None])
    return torch.matmul(probs, v.float()).to(q.dtype), lse


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                     gate: torch.Tensor | None = None) -> torch.Tensor:
    """Same contract as `naive_causal_attention`: q `[B, T, H, D]`, k/v `[B, KVH, S, D]`, gate None or
    `[B, T, H, D]` -> `[B, T, H, D]`."""
    # Where the CPU has AMX tiles, prefill-sized calls the kernel cannot tile (D not a multiple of 32, or
    # the AVX2 build chosen by DOCANALYST_ISA) run faster on PyTorch's flash kernel (AMX GEMMs) than on
    # the kernel's dot products. Without AMX (AVX2-only CPUs among them) the kernel takes every call.
    if native.supports(q, k, v, gate) and (native.tiles_apply(q) or not tiles_pay_off(q.shape[1])):
        return native.native_causal_attention(q, k, v, scale, gate)
    out = pytorch_attention(q, k, v, scale)
    return out if gate is None else out * torch.sigmoid(gate)


def pytorch_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """causal_attention without a gate on PyTorch's kernels alone (its flash attention on the chunk's
    own keys, its plain kernel on the cached ones, merged by log-sum-exp): the path taken where the
    native kernel does not."""
    batch, length, heads, dim = q.shape
    kv_heads, total = k.shape[1], k.shape[2]
    group = heads // kv_heads
    past = total - length
    if length == 1:
        grouped = q.reshape(batch, kv_heads, group, dim)
        out = F.scaled_dot_product_attention(grouped, k, v, scale=scale)
        return out.reshape(batch, 1, heads, dim)

    own_k = k[:, :, past:].repeat_interleave(group, dim=1)
    own_v = v[:, :, past:].repeat_interleave(group, dim=1)
    out_own, lse_own = _attend(q.transpose(1, 2), own_k, own_v, True, scale)
    if past == 0:
        return out_own.transpose(1, 2)

    # Grouped query heads become extra query rows of their shared K/V head: no K/V copy.
    grouped = q.reshape(batch, length, kv_heads, group, dim).permute(0, 2, 3, 1, 4)
    grouped = grouped.reshape(batch, kv_heads, group * length, dim)
    out_past, lse_past = _attend(grouped, k[:, :, :past], v[:, :, :past], False, scale)
    out_past = out_past.reshape(batch, heads, length, dim)
    lse_past = lse_past.reshape(batch, heads, length)

    lse = torch.logaddexp(lse_own, lse_past)
    merged = out_own.float() * torch.exp(lse_own - lse)[..., None]
    merged += out_past.float() * torch.exp(lse_past - lse)[..., None]
    return merged.to(q.dtype).transpose(1, 2)
