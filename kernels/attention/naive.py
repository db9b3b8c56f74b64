"""Readable causal attention over a K/V cache: the definition the fast path is tested against."""

from __future__ import annotations

import torch


def naive_causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                           gate: torch.Tensor | None = None) -> torch.Tensor:
    """Grouped-query causal attention where the last T cached positions are the queries' own.

    q: `[B, T, H, D]`; k, v: `[B, KVH, S, D]` with S >= T (S - T earlier positions);
    query head h reads key/value head h // (H // KVH). Returns `[B, T, H, D]` in q.dtype, multiplied
    by `sigmoid(gate)` (gate `[B, T, H, D]`) when a gate is given.
    Softmax in fp32; builds the full `[T, S]` score matrix, so only for tests and small inputs.
    """
    batch, length, heads, dim = q.shape
    kv_heads, total = k.shape[1], k.shape[2]
    group = heads // kv_heads
    keys = k.repeat_interleave(group, dim=1).float()
    values = v.repeat_interleave(group, dim=1).float()
    scores = torch.einsum("bthd,bhsd->bhts", q.float(), keys) * scale
    past = total - length
    query_pos = torch.arange(length, device=q.device)[:, None] + past
    key_pos = torch.arange(total, device=q.device)[None, :]
    scores = scores.masked_fill(key_pos > query_pos, float("-inf"))
    probs = scores.softmax(dim=-1)
    out = torch.einsum("bhts,bhsd->bthd", probs, values).to(q.dtype)
    return out if gate is None else out * torch.sigmoid(gate)
