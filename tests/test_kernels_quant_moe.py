"""The quantized sparse MoE block kernel (kernels/quant/sparse_moe_quant.c) against its readable
definition (kernels/quant/moe_reference.py), under each build this CPU runs.

Tolerance. Kernel and reference round to bf16 at the same steps (router logits, projections, SiLU
and its product, expert outputs, weighted outputs, the routed sum, the gated shared expert, the
output); they differ only in how an fp32 sum is ordered (the kernel's lane chains against exact
float64 products), about 1e-6 of the sum. That moves a bf16-rounded intermediate by one bf16 step
(2^-8 of it) only when it lies that close to a rounding boundary, so outputs agree bit for bit
except a few, and those by at most two bf16 steps of the largest output of their token
(STEPS * 2^-8 * max |row|, STEPS = 2): an intermediate's step reaches the output scaled by at most
its weight, far below that, and the final roundings add one step each. At most MISMATCH_SHARE of
the outputs may differ at all. A different routing (a probability that close to another) would
break both bounds; the seeds here have none.
"""

from __future__ import annotations

import pytest
import torch

from kernels import native as native_build
from kernels.quant import (
    FP8_BLOCK,
    INT4,
    INT8,
    QuantizedRows,
    QuantizedWeight,
    fp8_block,
    moe_native,
    quantize_int4,
    quantize_int8,
)
from kernels.quant.moe_reference import route_reference, sparse_moe_reference

STEPS = 2
MISMATCH_SHARE = 0.01
BF16_STEP = 2.0**-8

# (experts, hidden, expert width, shared width, top-k): one 128-block and partial ones, odd widths;
# "tall" outputs more columns than one thread's piece of the block output (kernels/moe/block_steps.h).
SHAPES = {"demo": (8, 128, 64, 64, 2), "odd": (16, 160, 72, 136, 4), "wide": (32, 256, 256, 192, 8),
          "tall": (8, 400, 48, 40, 3)}


def fp8_of(weight: torch.Tensor, scale_dtype: torch.dtype) -> QuantizedWeight:
    """Official block quantization of a weight `[*, N, K]`: scale = max |block| / 448 per 128 x 128 block."""
    *lead, rows, columns = weight.shape
    blocks = (-(-rows // 128), -(-columns // 128))
    padded = torch.nn.functional.pad(weight.float(), (0, blocks[1] * 128 - columns, 0, blocks[0] * 128 - rows))
    tiles = padded.view(*lead, blocks[0], 128, blocks[1], 128)
    scale = (tiles.abs().amax(dim=(-3, -1)) / 448).clamp(min=1e-12).to(scale_dtype)
    expanded = scale.float().repeat_interleave(128, -2).repeat_interleave(128, -1)[..., :rows, :columns]
    data = (weight.float() / expanded).to(torch.float8_e4m3fn)
    if not lead:
        return fp8_block(data, scale)
    return QuantizedWeight(FP8_BLOCK, data, scale, tuple(weight.shape))


def stored(weight: torch.Tensor, format_name: str, scale_dtype: torch.dtype = torch.float32, group: int = 128):
    """`weight` as the block would hold it: bf16, or quantized with scales in `scale_dtype` (int4 in
    groups of `group` columns)."""
    if format_name == "bf16":
        return weight.to(torch.bfloat16)
    if format_name == FP8_BLOCK:
        return fp8_of(weight, scale_dtype)
    quantized = quantize_int8(weight) if format_name == INT8 else quantize_int4(weight, group)
    return QuantizedWeight(quantized.format, quantized.data, quantized.scale.to(scale_dtype), quantized.shape,
                           quantized.group_size)


def block_of(shape: str, experts_format: str, shared_format: str | None = None, scale_dtype=torch.float32,
             seed: int = 0, normalize: bool = True, group: int = 128) -> tuple:
    """A random MoE block's arguments (router, top_k, normalize, gate_up, down, shared gate, up, down,
    shared expert gate), the router and the shared expert gate in bf16."""
    experts, hidden, width, shared, top_k = SHAPES[shape]
    generator = torch.Generator().manual_seed(seed)

    def randn(*size: int, scale: float) -> torch.Tensor:
        return torch.randn(*size, generator=generator) * scale

    shared_format = shared_format or experts_format
    gate = stored(randn(experts, width, hidden, scale=hidden**-0.5), experts_format, scale_dtype, group)
    up = stored(randn(experts, width, hidden, scale=hidden**-0.5), experts_format, scale_dtype, group)
    gate_up = torch.cat([gate, up], dim=1) if experts_format == "bf16" else QuantizedRows((gate, up))
    return (
        randn(experts, hidden, scale=hidden**-0.5).to(torch.bfloat16), top_k, normalize, gate_up,
        stored(randn(experts, hidden, width, scale=width**-0.5), experts_format, scale_dtype, group),
        stored(randn(shared, hidden, scale=hidden**-0.5), shared_format, scale_dtype, group),
        stored(randn(shared, hidden, scale=hidden**-0.5), shared_format, scale_dtype, group),
        stored(randn(hidden, shared, scale=shared**-0.5), shared_format, scale_dtype, group),
        randn(1, hidden, scale=hidden**-0.5).to(torch.bfloat16),
    )


def tokens(count: int, hidden: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(count, hidden, generator=torch.Generator().manual_seed(seed)).to(torch.bfloat16)


def assert_close_to_reference(out: torch.Tensor, x: torch.Tensor, block: tuple) -> None:
    expected = sparse_moe_reference(x, *block)
    assert out.dtype == torch.bfloat16 and out.shape == expected.shape
    differ = out != expected
    assert differ.float().mean() <= MISMATCH_SHARE, f"{int(differ.sum())} of {out.numel()} outputs differ"
    bound = STEPS * BF16_STEP * expected.float().abs().amax(dim=-1, keepdim=True)
    error = (out.float() - expected.float()).abs()
    assert bool((error <= bound).all()), f"worst error {float((error / bound).max()):.2f} of the bound"


@pytest.fixture
def isa(native_isa):
    if moe_native.SPARSE_MOE.entry(native_isa) is None:
        pytest.skip(f"the {native_isa} build of the quantized MoE kernel cannot run here")
    return native_isa


@pytest.mark.parametrize("count", [1, 3, 16], ids=lambda n: f"{n}tokens")
@pytest.mark.parametrize("shape", sorted(SHAPES))
@pytest.mark.parametrize("format_name", [FP8_BLOCK, INT8, INT4])
def test_matches_the_reference(isa, format_name, shape, count):
    block = block_of(shape, format_name)
    x = tokens(count, SHAPES[shape][1])
    assert_close_to_reference(moe_native.QuantizedMoE(*block)(x), x, block)


@pytest.mark.parametrize("int4_pairs", [False, True], ids=["table", "pairs"])
@pytest.mark.parametrize("count", [1, 3, 16], ids=lambda n: f"{n}tokens")
@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_int4_by_table_and_by_pair_products_match_the_reference(isa, shape, count, int4_pairs):
    """Both ways of multiplying int4 weights, whatever this CPU prefers (down's inputs, SiLU's
    bf16-rounded products, are exact in bf16 as pair products need)."""
    block = block_of(shape, INT4)
    x = tokens(count, SHAPES[shape][1])
    assert_close_to_reference(moe_native.QuantizedMoE(*block)(x, int4_pairs=int4_pairs), x, block)


def test_int4_pair_products_apply_to_groups_of_whole_steps(isa):
    """Pair products (the AVX-512 build) give other bits than the table for groups of a multiple of
    64 columns; groups of 32 and the AVX2 build keep the table's bits. The block rounds to bf16 at
    every step, so only a few outputs differ (a handful of these 48 tokens' 12,288)."""
    x = torch.cat([tokens(16, SHAPES["wide"][1], seed=seed) for seed in (1, 2, 3)])
    for group, applies in ((128, isa == "avx512"), (64, isa == "avx512"), (32, False)):
        block = block_of("wide", INT4, group=group)
        moe = moe_native.QuantizedMoE(*block)
        pairs = moe(x, int4_pairs=True)
        assert torch.equal(pairs, moe(x, int4_pairs=False)) is not applies, group
        assert_close_to_reference(pairs, x, block)


@pytest.mark.parametrize(("experts_format", "shared_format"), [(INT4, "bf16"), ("bf16", INT8), (FP8_BLOCK, INT4)])
def test_formats_can_differ_between_the_experts_and_the_shared_expert(isa, experts_format, shared_format):
    block = block_of("odd", experts_format, shared_format)
    x = tokens(5, SHAPES["odd"][1])
    assert_close_to_reference(moe_native.QuantizedMoE(*block)(x), x, block)


@pytest.mark.parametrize("format_name", [FP8_BLOCK, INT8, INT4])
def test_scales_stored_in_bf16_and_weights_not_renormalised(isa, format_name):
    block = block_of("odd", format_name, scale_dtype=torch.bfloat16, normalize=False, seed=2)
    x = tokens(4, SHAPES["odd"][1], seed=3)
    assert_close_to_reference(moe_native.QuantizedMoE(*block)(x), x, block)


@pytest.mark.parametrize(("format_name", "int4_pairs"), [(FP8_BLOCK, False), (INT8, False), (INT4, False),
                                                         (INT4, True)],
                         ids=["fp8_block", "int8", "int4", "int4_pairs"])
def test_a_tokens_bits_do_not_depend_on_the_call_or_the_threads(isa, format_name, int4_pairs):
    """Alone, in any run of the batch and over 1, 2 or 3 threads: the bits it has among 16 tokens
    (draft verification must reproduce decode steps exactly)."""
    block = block_of("wide", format_name)
    moe = moe_native.QuantizedMoE(*block)
    x = tokens(16, SHAPES["wide"][1])
    together = moe(x, threads=2, int4_pairs=int4_pairs)
    for token in range(16):
        assert torch.equal(moe(x[token : token + 1], threads=1, int4_pairs=int4_pairs), together[token : token + 1])
    for start, stop in [(0, 3), (5, 12), (9, 16)]:
        assert torch.equal(moe(x[start:stop], threads=3, int4_pairs=int4_pairs), together[start:stop])
    for threads in (1, 3):
        assert torch.equal(moe(x, threads=threads, int4_pairs=int4_pairs), together)


def test_a_nan_token_gives_nan_in_its_row_only(isa):
    block = block_of("demo", INT4)
    moe = moe_native.QuantizedMoE(*block)
    x = tokens(3, SHAPES["demo"][1])
    x[1, 5] = float("nan")
    out = moe(x)
    assert out[1].isnan().all()
    assert torch.equal(out[[0, 2]], moe(x[[0, 2]]))


def test_many_tokens_go_through_in_runs_of_sixteen(isa):
    block = block_of("demo", INT8)
    moe = moe_native.QuantizedMoE(*block)
    x = tokens(37, SHAPES["demo"][1])
    assert torch.equal(moe(x), torch.cat([moe(x[start : start + 16]) for start in range(0, 37, 16)]))


def test_one_fused_gate_up_weight_reads_like_its_two_halves(isa):
    """gate_up may be one quantized stack `[E, 2I, H]` instead of gate and up apart."""
    block = list(block_of("odd", INT8))
    gate, up = block[3].parts
    block[3] = QuantizedWeight(INT8, torch.cat([gate.data, up.data], 1), torch.cat([gate.scale, up.scale], 1),
                               (gate.shape[0], 2 * gate.shape[1], gate.shape[2]))
    x = tokens(6, SHAPES["odd"][1])
    assert torch.equal(moe_native.QuantizedMoE(*block)(x), moe_native.QuantizedMoE(*block_of("odd", INT8))(x))


def test_writes_into_out(isa):
    block = block_of("demo", INT4)
    x = tokens(3, SHAPES["demo"][1])
    out = torch.full((3, SHAPES["demo"][1]), float("nan"), dtype=torch.bfloat16)
    assert moe_native.QuantizedMoE(*block)(x, out=out).data_ptr() == out.data_ptr()
    assert torch.equal(out, moe_native.QuantizedMoE(*block)(x))


def test_routing_takes_the_lowest_id_among_equal_probabilities():
    """The reference's tie rule (the kernel's too: ties of bf16 logits are common)."""
    router = torch.zeros(6, 4, dtype=torch.bfloat16)
    router[[1, 3, 4], 0] = 1.0
    weights, experts = route_reference(torch.tensor([[1.0, 0, 0, 0]], dtype=torch.bfloat16), router, 2, True)
    assert experts.tolist() == [[1, 3]]
    assert weights.tolist() == [[0.5, 0.5]]


def test_which_blocks_the_kernel_takes():
    if not moe_native.available():
        pytest.skip("no build of the quantized MoE kernel runs here")
    block = block_of("demo", INT4)
    router, top_k, _, *weights = block
    x = tokens(16, SHAPES["demo"][1])
    assert moe_native.supports(x, router, *weights, top_k=top_k)
    assert not moe_native.supports(tokens(17, SHAPES["demo"][1]), router, *weights, top_k=top_k)
    assert not moe_native.supports(x.float(), router, *weights, top_k=top_k)
    assert not moe_native.supports(x.requires_grad_(), router, *weights, top_k=top_k)
    bf16_router, _, _, *bf16_weights = block_of("demo", "bf16")
    assert not moe_native.supports(x.detach(), bf16_router, *bf16_weights, top_k=top_k), "bf16 has its own kernel"
    odd_groups = list(weights)
    odd_groups[1] = quantize_int4(torch.randn(8, 128, 64), group_size=48)
    assert not moe_native.supports(x.detach(), router, *odd_groups, top_k=top_k), "int4 steps would straddle groups"
    assert not moe_native.supports(x.detach(), router, *weights, top_k=router.shape[0] + 1)


def test_weights_of_the_wrong_shape_are_refused():
    router, top_k, normalize, gate_up, down, *shared = block_of("demo", INT8)
    narrow_down = quantize_int8(torch.randn(8, 128, 32))  # expert width 32, gate/up say 64
    with pytest.raises(ValueError, match="down"):
        moe_native.QuantizedMoE(router, top_k, normalize, gate_up, narrow_down, *shared)


@pytest.mark.parametrize("isa_name", moe_native.SPARSE_MOE.isas)
def test_every_build_compiles(isa_name):
    if native_build.compiler() is None:
        pytest.skip("no C compiler")
    assert native_build.build(moe_native.SOURCE, isa_name).exists()


def test_each_build_is_the_instruction_set_it_claims(isa):
    assert moe_native.lanes(isa) == {"avx512": 16, "avx512f": 16, "avx2": 8}[isa]
