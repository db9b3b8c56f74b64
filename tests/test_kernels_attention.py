"""Blocked causal attention over a K/V cache against the naive definition."""

from __future__ import annotations

import pytest
import torch

from kernels.attention import causal_attention, naive_causal_attention
from kernels.attention import native as attention_native
from kernels.native import FEW_TOKENS, compiler, isa_order, matmul_has_amx, use_isa

# The native kernel itself (the dispatcher may send prefill-sized calls to PyTorch's GEMM path).
native_attention = attention_native.native_causal_attention

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


def operands(case, dtype):
    batch, length, heads, kv_heads, past, dim = case
    generator = torch.Generator().manual_seed(sum(case))
    q = torch.randn(batch, length, heads, dim, generator=generator).to(dtype)
    k = torch.randn(batch, kv_heads, past + length, dim, generator=generator).to(dtype)
    v = torch.randn(batch, kv_heads, past + length, dim, generator=generator).to(dtype)
    return q, k, v


@pytest.mark.parametrize("case", CASES, ids=case_id)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_blocked_matches_naive(case, dtype):
    q, k, v = operands(case, dtype)
    dim = q.shape[-1]
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


@pytest.fixture
def native_build(native_isa):
    """Each build of the kernel the CPU runs (the native_isa fixture), skipped where it cannot run."""
    if attention_native.kernel() is None:
        pytest.skip("native kernel needs a C compiler")
    return native_isa


def skip_without_tiles(amx: bool, isa: str) -> None:
    if amx and isa != "avx512":
        pytest.skip("the tile path is part of the AVX-512 build only")

NATIVE_CASES = [
    # batch, queries, heads, kv heads, cached positions before the queries, head dim
    (1, 1, 16, 2, 4095, 128),
    (1, 3, 16, 2, 61, 128),
    (2, 5, 6, 3, 130, 48),
    (1, 16, 4, 1, 0, 256),
    (1, 2, 8, 8, 64, 16),
    (1, 7, 12, 2, 200, 80),
    (1, 130, 16, 2, 70, 128),  # more rows than two tiles of 512, odd keys per block
    (1, 70, 16, 2, 300, 128),  # keys across a 256-key block boundary, rows of a group seeing none of it
    (1, 33, 4, 1, 250, 64),
    (1, 40, 6, 2, 0, 96),
    (1, 65, 4, 2, 0, 64),
    (1, 4, 8, 2, 100, 256),  # whole 64-key blocks: rows taken two at a time
    (1, 9, 16, 2, 191, 128),
    (1, 3, 8, 1, 4500, 64),  # several 2048-key chunks, split over threads
    (1, 20, 8, 2, 4090, 32),  # rows on both sides of a chunk boundary
    (1, 4, 16, 2, 300, 256),  # the most rows the few-row tiles take (32), keys across a block boundary
]


def native_operands(case, capacity_extra: int = 0):
    batch, length, heads, kv_heads, past, dim = case
    generator = torch.Generator().manual_seed(sum(case))
    q = torch.randn(batch, length, heads, dim, generator=generator).bfloat16()
    total = past + length
    k = torch.full((batch, kv_heads, total + capacity_extra, dim), float("nan"), dtype=torch.bfloat16)
    v = torch.full_like(k, float("nan"))
    k[:, :, :total] = torch.randn(batch, kv_heads, total, dim, generator=generator).bfloat16()
    v[:, :, :total] = (torch.randn(batch, kv_heads, total, dim, generator=generator) * 2).bfloat16()
    return q, k[:, :, :total], v[:, :, :total]


# The pair dot-product chains everywhere; the AMX tile path where the CPU has it (head dims that are
# not a multiple of 32 fall back to the chains inside the kernel).
TILE_UNITS = [
    pytest.param(False, id="pairs"),
    pytest.param(True, id="amx", marks=pytest.mark.skipif(not matmul_has_amx(), reason="CPU without AMX tiles")),
]


@pytest.mark.parametrize("amx", TILE_UNITS)
@pytest.mark.parametrize("case", NATIVE_CASES, ids=case_id)
def test_native_kernel_matches_naive(case, amx, native_build):
    skip_without_tiles(amx, native_build)
    q, k, v = native_operands(case, capacity_extra=37)
    dim = q.shape[-1]
    assert attention_native.supports(q, k, v)
    ours = native_attention(q, k, v, dim**-0.5, amx=amx)
    reference = naive_causal_attention(q.float(), k.float(), v.float(), dim**-0.5)
    assert ours.dtype == torch.bfloat16 and ours.shape == q.shape
    assert not torch.isnan(ours).any(), "read past the live K/V (NaN-filled spare capacity)"
    torch.testing.assert_close(ours.float(), reference, atol=BF16_ATOL, rtol=0)


@pytest.mark.parametrize("amx", TILE_UNITS)
@pytest.mark.parametrize("case", NATIVE_CASES, ids=case_id)
def test_native_rows_equal_one_token_calls(case, amx, native_build):
    """Query t alone, over the keys it sees, gives the bits it gets beside the others, and any thread
    count the same bits (more threads than (K/V head, row tile) items split the keys by chunk), on
    either path as long as both calls take it."""
    skip_without_tiles(amx, native_build)
    q, k, v = native_operands(case)
    length, past, scale = q.shape[1], k.shape[2] - q.shape[1], q.shape[-1] ** -0.5
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        together = native_attention(q, k, v, scale, amx=amx)
        torch.set_num_threads(5)
        for t in range(length):
            visible = past + t + 1
            alone = native_attention(q[:, t : t + 1], k[:, :, :visible], v[:, :, :visible], scale, amx=amx)
            assert torch.equal(alone, together[:, t : t + 1]), f"query {t}"
        assert torch.equal(native_attention(q, k, v, scale, amx=amx), together)
    finally:
        torch.set_num_threads(threads)


def strided_gate(q: torch.Tensor, seed: int) -> torch.Tensor:
    """A gate shaped like q and laid out as the model's q projection gives it: the second half of each head."""
    generator = torch.Generator().manual_seed(seed)
    both = (torch.randn(*q.shape[:-1], 2 * q.shape[-1], generator=generator) * 3).bfloat16()
    return both[..., q.shape[-1] :]


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_gate_multiplies_by_its_sigmoid(case):
    q, k, v = operands(case, torch.bfloat16)
    gate = strided_gate(q, sum(case))
    scale = q.shape[-1] ** -0.5
    ungated = naive_causal_attention(q.float(), k.float(), v.float(), scale)
    reference = naive_causal_attention(q.float(), k.float(), v.float(), scale, gate=gate.float())
    torch.testing.assert_close(reference, ungated * torch.sigmoid(gate.float()), atol=0, rtol=0)
    ours = causal_attention(q, k, v, scale, gate=gate)
    torch.testing.assert_close(ours.float(), reference, atol=BF16_ATOL, rtol=0)


@pytest.mark.parametrize("amx", TILE_UNITS)
@pytest.mark.parametrize("case", NATIVE_CASES, ids=case_id)
def test_native_gate_rounds_like_pytorch(case, amx, native_build):
    """The fused gate gives the bits of `attn * torch.sigmoid(gate)` in bf16, but where the kernel's
    own exp lands a sigmoid on the other side of a bf16 rounding boundary: one bf16 step at most."""
    skip_without_tiles(amx, native_build)
    q, k, v = native_operands(case, capacity_extra=5)
    gate = strided_gate(q, sum(case) + 1)
    assert attention_native.supports(q, k, v, gate)
    scale = q.shape[-1] ** -0.5
    fused = native_attention(q, k, v, scale, gate=gate, amx=amx)
    separate = native_attention(q, k, v, scale, amx=amx) * torch.sigmoid(gate)
    assert not torch.isnan(fused).any()
    torch.testing.assert_close(fused.float(), separate.float(), atol=1e-30, rtol=2**-7)
    assert (fused != separate).float().mean().item() <= 0.01


def test_native_gated_rows_equal_one_token_calls(native_build):
    q, k, v = native_operands((1, 9, 16, 2, 191, 128))
    gate = strided_gate(q, 3)
    past, scale = k.shape[2] - q.shape[1], q.shape[-1] ** -0.5
    together = native_attention(q, k, v, scale, gate=gate)
    for t in range(q.shape[1]):
        visible = past + t + 1
        alone = native_attention(q[:, t : t + 1], k[:, :, :visible], v[:, :, :visible], scale, gate=gate[:, t : t + 1])
        assert torch.equal(alone, together[:, t : t + 1]), f"query {t}"


@pytest.mark.parametrize("case", [(1, 1, 16, 2, 5000, 64), (1, 5, 8, 1, 4500, 32), (1, 16, 4, 1, 2100, 16),
                                  (1, 2, 8, 1, 70000, 16)],  # runs of 4 and 2 chunks a work item, a shorter last one
                         ids=case_id)
def test_native_bits_do_not_depend_on_threads(case, native_build):
    """Few rows over a long cache: with more threads than K/V heads the keys are split between
    threads by chunk (in runs of chunks where there are many); the bits stay those of one thread."""
    q, k, v = native_operands(case)
    scale = q.shape[-1] ** -0.5
    threads = torch.get_num_threads()
    try:
        results = []
        for count in (1, 2, 3, 5):
            torch.set_num_threads(count)
            results.append(native_attention(q, k, v, scale))
    finally:
        torch.set_num_threads(threads)
    for count, result in zip((2, 3, 5), results[1:], strict=True):
        assert torch.equal(result, results[0]), f"{count} threads"


def test_native_keeps_future_keys_out(native_build):
    """Keys past a row's position score far higher than the ones it sees (a leak of the causal mask
    would dominate its output), and scores are large enough that a clamped exp would show."""
    q, k, v = native_operands((1, 6, 8, 2, 40, 64))
    past = k.shape[2] - q.shape[1]
    # Positive queries score ~50 against the later keys (all 2), ~N(0, 4) against the earlier ones.
    q = (q.abs() * 4).bfloat16()
    k[:, :, past + 1 :] = 2
    scale = q.shape[-1] ** -0.5
    ours = native_attention(q, k, v, scale)
    reference = naive_causal_attention(q.float(), k.float(), v.float(), scale)
    torch.testing.assert_close(ours.float(), reference, atol=BF16_ATOL, rtol=0)


def test_every_build_compiles():
    if compiler() is None:
        pytest.skip("no C compiler")
    builds = attention_native.ATTENTION.build_all()
    assert set(builds) == {"avx512", "avx512f", "avx2"} and all(path.exists() for path in builds.values())


@pytest.mark.parametrize("dim", [16, 48, 80])
def test_head_dims_the_wide_fp32_build_cannot_take_run_the_avx2_one(dim):
    """The AVX-512-without-BF16 build widens 32 channels at a time: other head dims get the AVX2
    build's bits, every call alike."""
    if not {"avx512f", "avx2"} <= set(isa_order()) or attention_native.kernel() is None:
        pytest.skip("needs a CPU that runs both builds")
    q, k, v = native_operands((1, 5, 8, 2, 70, dim))
    with use_isa("avx512f"):
        assert attention_native.ATTENTION.isa() == "avx512f"
        wide = native_attention(q, k, v, dim**-0.5)
    with use_isa("avx2"):
        assert torch.equal(native_attention(q, k, v, dim**-0.5), wide)


def test_native_kernel_declines_other_inputs():
    q, k, v = native_operands((1, 3, 4, 2, 5, 32))
    assert not attention_native.supports(q.float(), k.float(), v.float())
    assert not attention_native.supports(q[..., :24], k[..., :24], v[..., :24])
    wide = torch.zeros(1, 3, 4, attention_native.MAX_HEAD_DIM + 16, dtype=torch.bfloat16)
    assert not attention_native.supports(wide, wide.transpose(1, 2), wide.transpose(1, 2))


def test_few_token_calls_take_the_native_kernel(native_build):
    """Decode and draft verification (up to FEW_TOKENS queries) always get the native kernel's bits, on
    which exact speculative decoding relies; longer calls may take PyTorch's GEMM path instead."""
    q, k, v = native_operands((1, FEW_TOKENS, 16, 2, 40, 128))
    gate = strided_gate(q, 11)
    scale = q.shape[-1] ** -0.5
    assert torch.equal(causal_attention(q, k, v, scale, gate=gate), native_attention(q, k, v, scale, gate=gate))
    assert torch.equal(causal_attention(q[:, :1], k[:, :, :41], v[:, :, :41], scale, gate=gate[:, :1]),
                       native_attention(q[:, :1], k[:, :, :41], v[:, :, :41], scale, gate=gate[:, :1]))
