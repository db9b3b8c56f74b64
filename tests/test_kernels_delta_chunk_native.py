"""The native chunked gated delta rule against PyTorch's chunked form and the naive recurrence.

Both chunked forms do the same fp32 algebra on the same bf16 inputs; the native one orders its
sums differently, solves the triangular system by forward substitution and uses its own exp.
Tolerances: outputs (rounded to bf16 by both) within one bf16 step at their largest magnitude
(2^-8 * max |reference|), final states within 2e-5 * max |state| (fp32 reordering, compounded
over the chunks). Against the naive recurrence on the same inputs the bound is the one the
PyTorch chunked form is held to in test_kernels_gated_delta_rule.py (states: atol 1e-5, rtol 1e-4).
The native tests run once per build (AVX-512 BF16, AVX2 + FMA) this CPU runs.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from kernels.gated_delta_rule import chunk_gated_delta_rule, gated_delta_rule, naive_gated_delta_rule
from kernels.gated_delta_rule import native as delta_native
from kernels.native import isa_order, use_isa

requires_native = pytest.mark.skipif(
    delta_native.chunk_kernel() is None, reason="native kernel needs a C compiler and a CPU with AVX-512 BF16 or AVX2"
)

# batch, tokens, key heads, value heads, key dim, value dim, chunk
CASES = [
    (1, 100, 4, 8, 64, 64, 16),  # partial last chunk
    (1, 64, 2, 2, 32, 48, 32),  # one key head per value head, V not a multiple of 64
    (2, 37, 1, 3, 16, 16, 64),  # a single partial chunk, batch of two
    (1, 257, 2, 4, 128, 128, 48),  # chunk not a multiple of 16 (padded inside)
    (1, 17, 4, 8, 64, 64, 16),  # just past the recurrent cut-over
]


def case_id(case) -> str:
    return "B{}-T{}-H{}-HV{}-K{}-V{}-C{}".format(*case)


def inputs(case, seed: int = 0, with_state: bool = True):
    batch, tokens, key_heads, heads, key_dim, value_dim, _ = case
    generator = torch.Generator().manual_seed(seed + sum(case))
    q = torch.randn(batch, tokens, key_heads, key_dim, generator=generator).bfloat16()
    k = torch.randn(batch, tokens, key_heads, key_dim, generator=generator).bfloat16()
    v = torch.randn(batch, tokens, heads, value_dim, generator=generator).bfloat16()
    g = -F.softplus(torch.randn(batch, tokens, heads, generator=generator))
    beta = torch.sigmoid(torch.randn(batch, tokens, heads, generator=generator)).bfloat16()
    state = torch.randn(batch, heads, key_dim, value_dim, generator=generator) * 0.1 if with_state else None
    return q, k, v, g, beta, state


def assert_outputs_close(ours, reference):
    bound = 2.0**-8 * reference.abs().max().item()
    assert (ours.float() - reference.float()).abs().max().item() <= bound


@requires_native
@pytest.mark.parametrize("with_state", [True, False], ids=["state", "zeros"])
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_native_chunk_matches_pytorch_chunk(case, with_state, native_isa):
    q, k, v, g, beta, state = inputs(case, with_state=with_state)
    chunk = case[-1]
    assert delta_native.supports_chunk(q, k, v, chunk, use_qk_l2norm=True)
    ours, ours_state = delta_native.chunk_gated_delta_rule(q, k, v, g, beta, initial_state=state, chunk_size=chunk)
    reference, reference_state = chunk_gated_delta_rule(q, k, v, g, beta, initial_state=state, chunk_size=chunk)
    assert ours.dtype == torch.bfloat16 and ours.shape == reference.shape
    assert not torch.isnan(ours).any()
    assert_outputs_close(ours, reference)
    scale = reference_state.abs().max().item()
    torch.testing.assert_close(ours_state, reference_state, atol=2e-5 * scale, rtol=0)


@requires_native
@pytest.mark.parametrize("case", CASES[:2], ids=case_id)
def test_native_chunk_matches_naive_recurrence(case, native_isa):
    q, k, v, g, beta, state = inputs(case, seed=1)
    ours, ours_state = delta_native.chunk_gated_delta_rule(q, k, v, g, beta, initial_state=state, chunk_size=case[-1])
    reference, reference_state = naive_gated_delta_rule(q, k, v, g, beta, initial_state=state)
    assert_outputs_close(ours, reference)
    torch.testing.assert_close(ours_state, reference_state, atol=1e-5, rtol=1e-4)


@requires_native
def test_native_chunk_leaves_the_initial_state_alone_and_splits_cleanly(native_isa):
    """Two calls carrying the state between them equal one call over both halves (chunk-aligned)."""
    q, k, v, g, beta, state = inputs(CASES[0])
    before = state.clone()
    whole, whole_state = delta_native.chunk_gated_delta_rule(q, k, v, g, beta, initial_state=state, chunk_size=16)
    assert torch.equal(state, before)
    first, mid = delta_native.chunk_gated_delta_rule(
        q[:, :48], k[:, :48], v[:, :48], g[:, :48], beta[:, :48], initial_state=state, chunk_size=16
    )
    second, end = delta_native.chunk_gated_delta_rule(
        q[:, 48:], k[:, 48:], v[:, 48:], g[:, 48:], beta[:, 48:], initial_state=mid, chunk_size=16
    )
    assert torch.equal(torch.cat([first, second], dim=1), whole)
    assert torch.equal(end, whole_state)


@requires_native
def test_auto_mode_takes_the_native_kernel_for_long_bf16_inputs(native_isa):
    q, k, v, g, beta, state = inputs(CASES[0])
    auto, _ = gated_delta_rule(q, k, v, g, beta, initial_state=state)
    native, _ = delta_native.chunk_gated_delta_rule(
        q, k, v, g, beta, initial_state=state, chunk_size=delta_native.CHUNK_SIZE
    )
    assert torch.equal(auto, native)


def test_native_chunk_declines_other_inputs():
    q, k, v, *_ = inputs(CASES[0])
    assert not delta_native.supports_chunk(q.float(), k.float(), v.float(), 16, use_qk_l2norm=True)
    assert not delta_native.supports_chunk(q, k, v, 16, use_qk_l2norm=False)
    assert not delta_native.supports_chunk(q, k, v, delta_native.MAX_CHUNK + 1, use_qk_l2norm=True)
    assert not delta_native.supports_chunk(q[..., :24], k[..., :24], v, 16, use_qk_l2norm=True)


@requires_native
def test_native_chunk_does_not_depend_on_the_thread_count(native_isa):
    q, k, v, g, beta, state = inputs(CASES[0], seed=3)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        alone = delta_native.chunk_gated_delta_rule(q, k, v, g, beta, initial_state=state, chunk_size=16)
        torch.set_num_threads(max(2, threads))
        together = delta_native.chunk_gated_delta_rule(q, k, v, g, beta, initial_state=state, chunk_size=16)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(alone[0], together[0]) and torch.equal(alone[1], together[1])



@requires_native
@pytest.mark.skipif(not {"avx512", "avx512f"} <= set(isa_order()), reason="needs a CPU with AVX-512 BF16")
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_avx512_builds_with_and_without_bf16_give_the_same_bits(case):
    """The chunk's AVX-512 code needs no bf16 arithmetic: both builds compile it."""
    q, k, v, g, beta, state = inputs(case, seed=9)
    results = []
    for isa in ("avx512", "avx512f"):
        with use_isa(isa):
            assert delta_native.CHUNK.isa() == isa
            results.append(delta_native.chunk_gated_delta_rule(q, k, v, g, beta, initial_state=state,
                                                               chunk_size=case[-1]))
    assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][1], results[1][1])
