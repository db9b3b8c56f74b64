"""The native MoE kernels (the sparse-MoE block for a few bf16 tokens, the routed experts for many)
against the PyTorch paths they mirror, each test under every instruction set's build the CPU runs.

The native block rounds to bf16 at the same steps as the PyTorch path; what may differ is the
last bit of exp/sigmoid and the fp32 summation order inside dot products, which a later bf16
rounding can turn into one bf16 step. Tolerance: two bf16 steps at the output's largest
magnitude (2 * 2^-8 * max |reference|). Tokens must be bitwise independent of the batch.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from kernels.moe import native as moe_native
from kernels.moe import reference
from kernels.native import FEW_TOKENS, compiler, isa_order, matmul_has_amx, use_isa

# The block's tests: sets it has no build for are skipped (conftest's native_isa).
block_tests = pytest.mark.native_kernels(moe_native.SPARSE_MOE)


@pytest.fixture
def block_kernel(native_isa):
    """The sparse-MoE block's build for `native_isa` (skipped where it cannot run)."""
    if moe_native.kernel() is None:
        pytest.skip("native kernel needs a C compiler")
    return native_isa


@pytest.fixture
def experts_kernel(native_isa):
    """The routed-experts kernel's build for `native_isa` (skipped where it cannot run)."""
    if moe_native.experts_kernel() is None:
        pytest.skip("native kernel needs a C compiler")
    return native_isa


@pytest.mark.skipif(compiler() is None, reason="needs a C compiler")
def test_every_build_compiles():
    assert set(moe_native.SPARSE_MOE.build_all()) == {"avx512", "avx2"}
    assert set(moe_native.EXPERTS.build_all()) == {"avx512", "avx512f", "avx2"}

# tokens, hidden, experts, top-k, expert width, shared width, normalise (hidden 400: more columns than
# one thread's piece of the block output, kernels/moe/block_steps.h)
CASES = [(1, 64, 8, 2, 32, 32, True), (3, 80, 10, 3, 48, 16, False), (16, 128, 64, 4, 64, 96, True),
         (2, 400, 8, 3, 48, 40, False)]


def case_id(case) -> str:
    tokens, hidden, experts, top_k, width, shared, normalize = case
    return f"N{tokens}-H{hidden}-E{experts}-k{top_k}-I{width}-S{shared}-{'norm' if normalize else 'raw'}"


def block(case, seed: int):
    tokens, hidden, experts, top_k, width, shared, normalize = case
    generator = torch.Generator().manual_seed(seed)

    def rand(*shape, scale):
        return (torch.randn(*shape, generator=generator) * scale).bfloat16()

    weights = dict(
        router=rand(experts, hidden, scale=0.5), gate_up=rand(experts, 2 * width, hidden, scale=hidden**-0.5),
        down=rand(experts, hidden, width, scale=width**-0.5), shared_gate_proj=rand(shared, hidden, scale=hidden**-0.5),
        shared_up_proj=rand(shared, hidden, scale=hidden**-0.5), shared_down=rand(hidden, shared, scale=shared**-0.5),
        shared_gate=rand(1, hidden, scale=hidden**-0.5),
    )
    return rand(tokens, hidden, scale=1.0), weights, top_k, normalize


def torch_path(x, w, top_k, normalize):
    routing, experts = reference.route(x, w["router"], top_k, normalize)
    routed = reference.experts_swiglu(x, routing, experts, w["gate_up"], w["down"])
    shared = F.linear(F.silu(F.linear(x, w["shared_gate_proj"])) * F.linear(x, w["shared_up_proj"]), w["shared_down"])
    return routed + torch.sigmoid(F.linear(x, w["shared_gate"])) * shared


def native_path(x, w, top_k, normalize):
    return moe_native.sparse_moe(x, w["router"], top_k, normalize, w["gate_up"], w["down"], w["shared_gate_proj"],
                                 w["shared_up_proj"], w["shared_down"], w["shared_gate"])


@block_tests
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_native_block_matches_pytorch_path(case, block_kernel):
    x, w, top_k, normalize = block(case, seed=sum(case))
    assert moe_native.supports(x, *w.values(), top_k=top_k)
    ours = native_path(x, w, top_k, normalize)
    expected = torch_path(x, w, top_k, normalize)
    assert ours.dtype == torch.bfloat16 and ours.shape == x.shape and torch.isfinite(ours).all()
    tolerance = 2 * 2.0**-8 * expected.float().abs().max().item()
    torch.testing.assert_close(ours.float(), expected.float(), atol=tolerance, rtol=0)


@block_tests
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_tokens_do_not_depend_on_the_batch_or_threads(case, block_kernel):
    x, w, top_k, normalize = block(case, seed=7)
    together = native_path(x, w, top_k, normalize)
    for token in range(x.shape[0]):
        assert torch.equal(native_path(x[token : token + 1], w, top_k, normalize), together[token : token + 1])
    threads = torch.get_num_threads()
    try:
        for count in (1, 3):  # one thread, and an uneven split of the rows
            torch.set_num_threads(count)
            assert torch.equal(native_path(x, w, top_k, normalize), together)
            assert torch.equal(native_path(x[:1], w, top_k, normalize), together[:1])
    finally:
        torch.set_num_threads(threads)


@block_tests
def test_a_nan_token_gives_nan_in_its_row_only(block_kernel):
    """A NaN in one token's x makes every router probability of it NaN: its routing must still name
    real experts (the lowest ids), so its row comes out NaN and the others' rows are untouched."""
    x, w, top_k, normalize = block(CASES[1], seed=3)
    x[1, 5] = float("nan")
    out = native_path(x, w, top_k, normalize)
    assert out[1].isnan().all()
    assert torch.equal(out[[0, 2]], native_path(x[[0, 2]], w, top_k, normalize))


@block_tests
def test_native_block_declines_other_inputs(block_kernel):
    x, w, top_k, _ = block(CASES[0], seed=1)
    assert not moe_native.supports(x.float(), *w.values(), top_k=top_k)
    many = torch.zeros(FEW_TOKENS + 1, x.shape[1], dtype=torch.bfloat16)
    assert not moe_native.supports(many, *w.values(), top_k=top_k)
    assert not moe_native.supports(x, w["router"].t(), top_k=top_k)


# tokens, hidden, experts, top-k, expert width: odd sizes leave partial tiles of 4 rows and of
# 64 columns, and input widths whose pairs are not a multiple of 16; one routes ~200 tokens to each
# expert (more than a kernel takes at a time); the last has the widths and top-k of the 80B checkpoint
EXPERT_CASES = [
    (300, 512, 64, 4, 256), (37, 80, 10, 3, 48), (2, 64, 4, 4, 32), (129, 96, 7, 2, 80), (403, 64, 4, 2, 48),
    (40, 2048, 16, 10, 512),
]


# The pair dot-product path (AVX-512) or the fp32 one (AVX2) everywhere; the AMX tile path where the
# CPU has it (odd widths in the cases fall back to the pair path inside the kernel).
TILE_UNITS = [
    pytest.param(False, id="pairs"),
    pytest.param(True, id="amx", marks=pytest.mark.skipif(not matmul_has_amx(), reason="CPU without AMX tiles")),
]


def skip_tiles_without_them(amx: bool, isa: str) -> None:
    if amx and isa != "avx512":
        pytest.skip("only the AVX-512 build has a tile path")


def expert_operands(case, seed: int):
    """x, the routing weights and experts chosen for it, gate_up and down for a case of EXPERT_CASES' shape."""
    tokens, hidden, experts, top_k, width = case
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, hidden, generator=generator).bfloat16()
    router = torch.randn(experts, hidden, generator=generator).bfloat16()
    gate_up = (torch.randn(experts, 2 * width, hidden, generator=generator) * hidden**-0.5).bfloat16()
    down = (torch.randn(experts, hidden, width, generator=generator) * width**-0.5).bfloat16()
    weights, chosen = reference.route(x, router, top_k, True)
    return x, weights, chosen, gate_up, down


@pytest.mark.parametrize("amx", TILE_UNITS)
@pytest.mark.parametrize("case", EXPERT_CASES, ids=lambda c: "N{}-H{}-E{}-k{}-I{}".format(*c))
def test_native_experts_match_the_grouped_pytorch_path(case, amx, experts_kernel):
    """Same bf16 rounding steps as reference.experts_swiglu: two bf16 steps at the largest output."""
    skip_tiles_without_them(amx, experts_kernel)
    x, weights, chosen, gate_up, down = expert_operands(case, seed=sum(case))
    experts = case[2]
    assert moe_native.supports_experts(x, weights, gate_up, down)
    ours = moe_native.moe_experts(x, weights, chosen, gate_up, down, amx=amx)
    expected = reference.experts_swiglu(x, weights, chosen, gate_up, down)
    assert ours.dtype == torch.bfloat16 and ours.shape == expected.shape
    bound = 2 * 2.0**-8 * expected.float().abs().max().item()
    assert (ours.float() - expected.float()).abs().max().item() <= bound
    assert not moe_native.supports_experts(x, weights, gate_up[..., :-8], down)
    # Experts nobody chose cost nothing and change nothing: poisoning them leaves the output alone.
    unused = sorted(set(range(experts)) - set(chosen.flatten().tolist()))
    if unused:
        gate_up[unused] = float("nan")
        assert torch.equal(moe_native.moe_experts(x, weights, chosen, gate_up, down, amx=amx), ours)


@pytest.mark.parametrize("amx", TILE_UNITS)
@pytest.mark.parametrize(
    "case", [EXPERT_CASES[0], EXPERT_CASES[1], EXPERT_CASES[4]], ids=["tile-widths", "odd-widths", "long-groups"]
)
def test_native_experts_do_not_depend_on_the_thread_count(case, amx, experts_kernel):
    skip_tiles_without_them(amx, experts_kernel)
    x, weights, chosen, gate_up, down = expert_operands(case, seed=7)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        alone = moe_native.moe_experts(x, weights, chosen, gate_up, down, amx=amx)
        torch.set_num_threads(max(2, threads))
        assert torch.equal(moe_native.moe_experts(x, weights, chosen, gate_up, down, amx=amx), alone)
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("case", [EXPERT_CASES[1], (9, 64, 6, 2, 48)], ids=["hidden-80", "width-48"])
def test_widths_the_wide_fp32_build_cannot_take_run_the_avx2_one(case):
    """The AVX-512-without-BF16 build widens 32 channels at a time: other widths get the AVX2
    build's bits, every call alike."""
    if not {"avx512f", "avx2"} <= set(isa_order()) or moe_native.experts_kernel() is None:
        pytest.skip("needs a CPU that runs both builds")
    x, weights, chosen, gate_up, down = expert_operands(case, seed=5)
    with use_isa("avx512f"):
        assert moe_native.EXPERTS.isa() == "avx512f"
        wide = moe_native.moe_experts(x, weights, chosen, gate_up, down)
    with use_isa("avx2"):
        assert torch.equal(moe_native.moe_experts(x, weights, chosen, gate_up, down), wide)


def test_few_tokens_never_take_the_tile_path(experts_kernel):
    """Decode and draft verification must give a token the same bits whatever the call's size."""
    tokens = FEW_TOKENS
    x, weights, chosen, gate_up, down = expert_operands((tokens, 512, 8, 2, 64), seed=3)
    pairs = moe_native.moe_experts(x, weights, chosen, gate_up, down, amx=False)
    assert torch.equal(moe_native.moe_experts(x, weights, chosen, gate_up, down), pairs)
    for row in range(0, tokens, 5):
        alone = moe_native.moe_experts(x[row:row + 2], weights[row:row + 2], chosen[row:row + 2], gate_up, down)
        assert torch.equal(alone, pairs[row:row + 2])
