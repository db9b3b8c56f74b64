"""Blocked causal attention over a K/V cache against the naive definition."""

from __future__ import annotations

import pytest
import torch

from kernels.attention import causal_attention, naive_causal_attention

# fp32: same softmax, computed in two merged pieces; only rounding differs.
FP32_ATOL = 2e-6
# bf16 inputs and outputs: one bf16 rounding of O(1) outputs is ~4e-3.
BF16_ATOL = 2e-2

CASES = [
    # batch, queries, heads, kv heads, cached positions before the queries, head dim
    (1, 1, 4, 2, 0, 8),
    (1, 1, 4, 1, 9, 16),
    (2, 7, 6, 2, 0, 16),
    (2, 7, 6, 2, 13, 16),
    (1, 33, 8, 2, 100, 32),
    (1, 64, 16, 2, 3, 64),
]


def case_id(case) -> str:
    b, t, h, kvh, past, d = case
    return f"B{b}-T{t}-H{h}-KV{kvh}-P{past}-D{d}"


@pytest.mark.parametrize("case", CASES, ids=case_id)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_blocked_matches_naive(case, dtype):
    batch, length, heads, kv_heads, past, dim = case
    generator = torch.Generator().manual_seed(sum(case))
    q = torch.randn(batch, length, heads, dim, generator=generator).to(dtype)
    k = torch.randn(batch, kv_heads, past + length, dim, generator=generator).to(dtype)
    v = torch.randn(batch, kv_heads, past + length, dim, generator=generator).to(dtype)
    ours = causal_attention(q, k, v, dim**-0.5)
    reference = naive_causal_attention(q.float(), k.float(), v.float(), dim**-0.5)
    assert ours.dtype == dtype and ours.shape == q.shape
    assert not torch.isnan(ours).any()
    torch.testing.assert_close(ours.float(), reference, atol=FP32_ATOL if dtype == torch.float32 else BF16_ATOL,
                               rtol=0)


def test_reads_only_the_live_part_of_a_larger_buffer():
    """The model passes a view of a K/V buffer with spare capacity; the spare part is never read."""
    q = torch.randn(1, 5, 4, 8)
    keys, values = torch.full((1, 2, 20, 8), float("nan")), torch.full((1, 2, 20, 8), float("nan"))
    keys[:, :, :12], values[:, :, :12] = torch.randn(1, 2, 12, 8), torch.randn(1, 2, 12, 8)
    ours = causal_attention(q, keys[:, :, :12], values[:, :, :12], 8**-0.5)
    reference = naive_causal_attention(q, keys[:, :, :12].clone(), values[:, :, :12].clone(), 8**-0.5)
    assert not torch.isnan(ours).any()
    torch.testing.assert_close(ours, reference, atol=FP32_ATOL, rtol=0)
