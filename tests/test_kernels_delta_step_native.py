"""The native Gated DeltaNet step for a few bf16 tokens against the PyTorch path it mirrors.

The native step rounds to bf16 where the PyTorch path does (conv output, SiLU, beta, outputs)
and keeps q/k norms, gates and the recurrent state in fp32; only the last bits of exp/log1p and
fp32 summation orders differ. Tolerances: outputs within one bf16 step at their largest
magnitude (2^-8 * max |reference|); recurrent states within 1e-5 * max |state| + 1e-7 (fp32
reordering over a few tokens); conv tails bitwise. Tokens must not depend on the batch nor on
the thread count. The native tests run once per build (AVX-512 BF16, AVX2 + FMA) this CPU runs;
the delta rule has no reduction across vector lanes, so the two builds give the same bits.
"""

from __future__ import annotations

import pytest
import torch

from kernels.causal_conv1d import causal_conv1d_update
from kernels.gated_delta_rule import gated_delta_rule_from_gates
from kernels.gated_delta_rule import native as delta_native
from kernels.native import FEW_TOKENS, compiler, isa_order, use_isa

requires_native = pytest.mark.skipif(
    delta_native.kernel() is None, reason="native kernel needs a C compiler and a CPU with AVX-512 BF16 or AVX2"
)

# tokens, key heads, value heads, key dim, value dim, conv width
# (the last: 36 channels, so the AVX2 conv's 8-channel vectors leave 4 for its scalar remainder)
CASES = [(1, 4, 8, 64, 64, 4), (3, 2, 6, 32, 48, 4), (16, 1, 2, 128, 128, 3), (2, 1, 1, 10, 16, 4)]


def case_id(case) -> str:
    return "T{}-H{}-HV{}-K{}-V{}-W{}".format(*case)


def inputs(case, seed: int):
    tokens, key_heads, heads, key_dim, value_dim, width = case
    channels = 2 * key_heads * key_dim + heads * value_dim
    generator = torch.Generator().manual_seed(seed)

    def rand(*shape, scale=1.0, dtype=torch.bfloat16):
        return (torch.randn(*shape, generator=generator) * scale).to(dtype)

    return dict(
        mixed=rand(1, tokens, channels), conv_state=rand(1, channels, width - 1),
        conv_weight=rand(channels, width, scale=0.5), a=rand(1, tokens, heads), b=rand(1, tokens, heads),
        A_log=rand(heads, scale=0.5), dt_bias=rand(heads, scale=0.5),
        recurrent=rand(1, heads, key_dim, value_dim, scale=0.1, dtype=torch.float32),
    )


def torch_path(case, t):
    """Token by token through the PyTorch decode path."""
    _, key_heads, heads, key_dim, value_dim, _ = case
    conv, state, outs = t["conv_state"].clone(), t["recurrent"].clone(), []
    for i in range(t["mixed"].shape[1]):
        mixed = causal_conv1d_update(t["mixed"][:, i], conv, t["conv_weight"])[:, None]
        q, k, v = mixed.split([key_heads * key_dim, key_heads * key_dim, heads * value_dim], dim=-1)
        out, state = gated_delta_rule_from_gates(
            q.reshape(1, 1, key_heads, key_dim), k.reshape(1, 1, key_heads, key_dim), v.reshape(1, 1, heads, value_dim),
            t["a"][:, i : i + 1], t["b"][:, i : i + 1], t["A_log"], t["dt_bias"], initial_state=state,
        )
        outs.append(out)
    return torch.cat(outs, dim=1), conv, state


def native_path(case, t):
    _, key_heads, _, key_dim, value_dim, _ = case
    return delta_native.gated_delta_step(
        t["mixed"], t["conv_state"].clone(), t["conv_weight"], t["a"], t["b"], t["A_log"], t["dt_bias"],
        t["recurrent"].clone(), key_heads, key_dim, value_dim,
    )


@requires_native
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_native_step_matches_pytorch_path(case, native_isa):
    t = inputs(case, seed=sum(case))
    assert delta_native.supports(t["mixed"], t["conv_state"], t["recurrent"], case[4])
    out, conv, state = native_path(case, t)
    expected_out, expected_conv, expected_state = torch_path(case, t)
    assert out.dtype == torch.bfloat16 and out.shape == expected_out.shape and torch.isfinite(out).all()
    torch.testing.assert_close(out.float(), expected_out.float(), rtol=0,
                               atol=2.0**-8 * expected_out.float().abs().max().item())
    assert torch.equal(conv, expected_conv)
    torch.testing.assert_close(state, expected_state, rtol=0,
                               atol=1e-5 * expected_state.abs().max().item() + 1e-7)


@requires_native
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_tokens_fed_one_by_one_give_the_same_bits(case, native_isa):
    t = inputs(case, seed=5)
    together, conv_together, state_together = native_path(case, t)
    conv, state, outs = t["conv_state"].clone(), t["recurrent"].clone(), []
    _, key_heads, _, key_dim, value_dim, _ = case
    for i in range(t["mixed"].shape[1]):
        out, conv, state = delta_native.gated_delta_step(
            t["mixed"][:, i : i + 1], conv, t["conv_weight"], t["a"][:, i : i + 1], t["b"][:, i : i + 1],
            t["A_log"], t["dt_bias"], state, key_heads, key_dim, value_dim,
        )
        outs.append(out)
    assert torch.equal(torch.cat(outs, dim=1), together)
    assert torch.equal(conv, conv_together) and torch.equal(state, state_together)


def test_native_step_declines_other_inputs():
    t = inputs(CASES[0], seed=1)
    assert not delta_native.supports(t["mixed"].float(), t["conv_state"].float(), t["recurrent"], 64)
    long = torch.zeros(1, FEW_TOKENS + 1, t["mixed"].shape[-1], dtype=torch.bfloat16)
    assert not delta_native.supports(long, t["conv_state"], t["recurrent"], 64)
    assert not delta_native.supports(t["mixed"], t["conv_state"], t["recurrent"], 40)


def grouped_projections(case, t, seed: int):
    """The step's inputs as the checkpoint's projections lay them out: per key head
    `[q | k | g v | g z]` and `[g b | g a]`, with random z and a row stride wider than the row."""
    tokens, key_heads, heads, key_dim, value_dim, _ = case
    group = heads // key_heads
    mixed = t["mixed"][0]
    q, k, v = mixed.split([key_heads * key_dim, key_heads * key_dim, heads * value_dim], dim=-1)
    z = (torch.randn(tokens, heads * value_dim, generator=torch.Generator().manual_seed(seed))).to(torch.bfloat16)
    per_head = [q.view(tokens, key_heads, key_dim), k.view(tokens, key_heads, key_dim),
                v.view(tokens, key_heads, group * value_dim), z.view(tokens, key_heads, group * value_dim)]
    qkvz = torch.cat(per_head, dim=-1).reshape(tokens, -1)
    padded = torch.full((tokens, qkvz.shape[1] + 16), float("nan"), dtype=torch.bfloat16)
    padded[:, : qkvz.shape[1]] = qkvz
    ba = torch.cat([t["b"][0].view(tokens, key_heads, group), t["a"][0].view(tokens, key_heads, group)], dim=-1)
    return padded[:, : qkvz.shape[1]], ba.reshape(tokens, -1)


@requires_native
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_grouped_step_equals_step_on_split_inputs(case, native_isa):
    """Reading the projections in place gives the step's bits exactly (it only gathers)."""
    if delta_native.grouped_kernel() is None:
        pytest.skip("native kernel unavailable")
    t = inputs(case, seed=9)
    expected_out, expected_conv, expected_state = native_path(case, t)
    qkvz, ba = grouped_projections(case, t, seed=3)
    _, key_heads, heads, key_dim, value_dim, _ = case
    conv, state = t["conv_state"][0].clone(), t["recurrent"][0].clone()
    out = torch.full((qkvz.shape[0], heads, value_dim), float("nan"), dtype=torch.bfloat16)
    delta_native.gated_delta_step_grouped(qkvz, ba, conv, t["conv_weight"], t["A_log"].float().exp(),
                                          t["dt_bias"].float(), state, key_heads, key_dim, value_dim, out)
    assert torch.equal(out, expected_out[0])
    assert torch.equal(conv, expected_conv[0]) and torch.equal(state, expected_state[0])


@requires_native
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_split_returns_the_pieces_the_projections_were_built_from(case, native_isa):
    """split_projections undoes the checkpoint's per-key-head grouping exactly (pure copies)."""
    if delta_native.split_kernel() is None:
        pytest.skip("native kernel unavailable")
    tokens, key_heads, heads, key_dim, value_dim, _ = case
    t = inputs(case, seed=12)
    qkvz, ba = grouped_projections(case, t, seed=13)
    z = torch.randn(tokens, heads * value_dim, generator=torch.Generator().manual_seed(13)).to(torch.bfloat16)
    assert delta_native.supports_split(qkvz[None], ba[None])
    qkv, z_out, b, a = delta_native.split_projections(qkvz[None], ba[None], key_heads, key_dim, heads, value_dim)
    assert torch.equal(qkv, t["mixed"]) and torch.equal(b, t["b"]) and torch.equal(a, t["a"])
    assert torch.equal(z_out, z.view(1, tokens, heads, value_dim))


@requires_native
@pytest.mark.parametrize("threads", [1, 3])
def test_step_does_not_depend_on_the_thread_count(native_isa, threads):
    """Value heads split over the threads (3: unevenly, more than the cores) give the bits of 2 threads."""
    case = (5, 2, 6, 32, 48, 4)
    t = inputs(case, seed=21)
    expected = native_path(case, t)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(threads)
        got = native_path(case, t)
    finally:
        torch.set_num_threads(before)
    assert all(torch.equal(x, y) for x, y in zip(got, expected, strict=True))


@pytest.mark.skipif(len(isa_order()) < 2, reason="needs a CPU that runs several builds")
@requires_native
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_every_build_gives_the_same_bits(case):
    """Every state column is the same fused multiply-add chain in each build (no cross-lane sums)."""
    t = inputs(case, seed=17)
    results = []
    for isa in isa_order():
        with use_isa(isa):
            assert delta_native.STEP.isa() == isa
            results.append(native_path(case, t))
    for other in results[1:]:
        assert all(torch.equal(x, y) for x, y in zip(results[0], other, strict=True))


def test_every_build_compiles():
    if compiler() is None:
        pytest.skip("no C compiler")
    for entry in delta_native.KERNELS:
        assert set(entry.build_all()) == {"avx512", "avx512f", "avx2"}
