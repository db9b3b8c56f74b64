"""Routed MoE: the PyTorch reference against `model.layers.Router` / `Experts`, and the Triton
router and grouped SwiGLU expert kernels against the reference."""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before anything imports Triton

from dataclasses import dataclass  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from kernels.moe import moe_experts, moe_route, reference  # noqa: E402
from model.config import ModelConfig  # noqa: E402
from model.layers import Experts, Router  # noqa: E402
from tests.triton_support import (  # noqa: E402
    DEVICE,
    check_interpreted,
    dtype_id,
    load,
    prefill_new_tensors,
    requires_cuda,
)

# fp32: the same products summed in another order (tiled K loop, fp32 sum of a token's k
# slots instead of sequential index_add): a few ulps of O(1) values.
FP32_ATOL, FP32_RTOL = 1e-5, 1e-5
# bf16: every intermediate is rounded where the reference rounds it; the k slots are summed in
# fp32 then rounded once, where index_add rounds after each slot: allow two bf16 ulps.
BF16_ATOL, BF16_RTOL = 2e-3, 2.0**-6


@dataclass(frozen=True)
class MoECase:
    tokens: int
    hidden: int
    experts: int
    width: int
    top_k: int

    def __str__(self) -> str:
        return f"N{self.tokens}-D{self.hidden}-E{self.experts}-I{self.width}-k{self.top_k}"


# Few slots per expert (decode tiles) and many (N k >= 16 E: prefill tiles).
DECODE = MoECase(3, 24, 12, 20, 3)
PREFILL = MoECase(40, 32, 4, 24, 2)
ROUTER_CASES = [MoECase(1, 24, 12, 8, 3), MoECase(9, 40, 7, 8, 2), MoECase(5, 16, 33, 8, 5)]


@pytest.fixture(autouse=True)
def _nan_buffers(monkeypatch: pytest.MonkeyPatch) -> None:
    prefill_new_tensors(monkeypatch)


@pytest.fixture(scope="module")
def moe():
    return load("kernels.moe.triton_moe")


def make(case: MoECase, seed: int, dtype: torch.dtype):
    """x `[N, hidden]`, router `[E, hidden]`, gate_up `[E, 2I, hidden]`, down `[E, hidden, I]` on DEVICE."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(case.tokens, case.hidden, generator=gen)
    router = torch.randn(case.experts, case.hidden, generator=gen)
    gate_up = torch.randn(case.experts, 2 * case.width, case.hidden, generator=gen) / case.hidden**0.5
    down = torch.randn(case.experts, case.hidden, case.width, generator=gen) / case.width**0.5
    return tuple(t.to(dtype).to(DEVICE) for t in (x, router, gate_up, down))


def tolerance(dtype: torch.dtype) -> tuple[float, float]:
    return (FP32_ATOL, FP32_RTOL) if dtype == torch.float32 else (BF16_ATOL, BF16_RTOL)


@pytest.mark.parametrize("normalize", [True, False], ids=["norm-topk", "raw-topk"])
def test_reference_matches_model_layers(normalize: bool) -> None:
    config = ModelConfig(
        hidden_size=32, moe_intermediate_size=24, num_experts=6, num_experts_per_tok=2, norm_topk_prob=normalize
    )
    router, experts = Router(config), Experts(config)
    x, weight, gate_up, down = make(MoECase(7, 32, 6, 24, 2), seed=1, dtype=torch.float32)
    with torch.no_grad():
        router.weight.copy_(weight.cpu())
        experts.gate_up_proj.copy_(gate_up.cpu())
        experts.down_proj.copy_(down.cpu())
        x = x.cpu()
        weights, ids = router(x)
        expected = experts(x, weights, ids)
    ref_weights, ref_ids = reference.route(x, weight.cpu(), 2, normalize)
    assert torch.equal(ref_weights, weights) and torch.equal(ref_ids, ids)
    assert torch.equal(reference.experts_swiglu(x, weights, ids, gate_up.cpu(), down.cpu()), expected)


def test_kernels_run_under_the_interpreter_as_requested(moe) -> None:
    check_interpreted(moe)


@pytest.mark.parametrize("normalize", [True, False], ids=["norm-topk", "raw-topk"])
@pytest.mark.parametrize("case", ROUTER_CASES, ids=str)
def test_route_fp32_matches_reference(moe, case: MoECase, normalize: bool) -> None:
    x, router, _, _ = make(case, seed=2, dtype=torch.float32)
    weights, ids = moe.route_triton(x, router, case.top_k, normalize)
    ref_weights, ref_ids = reference.route(x, router, case.top_k, normalize)
    assert torch.equal(ids, ref_ids)
    torch.testing.assert_close(weights, ref_weights, atol=FP32_ATOL, rtol=FP32_RTOL)


def test_route_bf16_picks_a_valid_top_k(moe) -> None:
    """bf16 logits can tie, and the order among equal probabilities is the implementation's:
    check that the picked experts carry the reference's top-k probabilities, in order."""
    case = MoECase(16, 48, 24, 8, 4)
    x, router, _, _ = make(case, seed=3, dtype=torch.bfloat16)
    weights, ids = moe.route_triton(x, router, case.top_k, False)
    probs = torch.nn.functional.linear(x, router).softmax(dim=-1, dtype=torch.float32)
    ref_weights, _ = reference.route(x, router, case.top_k, False)
    assert ids.unique(dim=1).shape == ids.shape  # k distinct experts per token
    torch.testing.assert_close(probs.gather(1, ids).to(torch.bfloat16), ref_weights, atol=0, rtol=0)
    torch.testing.assert_close(weights, ref_weights, atol=0, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=dtype_id)
@pytest.mark.parametrize("case", [DECODE, PREFILL], ids=["decode-tiles", "prefill-tiles"])
def test_experts_match_reference(moe, case: MoECase, dtype: torch.dtype) -> None:
    x, router, gate_up, down = make(case, seed=4, dtype=dtype)
    weights, ids = reference.route(x, router, case.top_k, True)
    out = moe.experts_swiglu_triton(x, weights, ids, gate_up, down)
    expected = reference.experts_swiglu(x, weights, ids, gate_up, down)
    assert out.dtype == dtype
    torch.testing.assert_close(out, expected, atol=tolerance(dtype)[0], rtol=tolerance(dtype)[1])


def test_unrouted_experts_are_never_read(moe) -> None:
    """NaN weights in experts nobody chose leave the output finite."""
    x, router, gate_up, down = make(DECODE, seed=5, dtype=torch.float32)
    weights, ids = reference.route(x, router, DECODE.top_k, True)
    unused = torch.ones(DECODE.experts, dtype=torch.bool, device=DEVICE)
    unused[ids.flatten()] = False
    assert unused.any()
    gate_up[unused], down[unused] = float("nan"), float("nan")
    out = moe.experts_swiglu_triton(x, weights, ids, gate_up, down)
    expected = reference.experts_swiglu(x, weights, ids, gate_up, down)
    torch.testing.assert_close(out, expected, atol=FP32_ATOL, rtol=FP32_RTOL)


def test_sparse_moe_is_route_then_experts(moe) -> None:
    x, router, gate_up, down = make(DECODE, seed=6, dtype=torch.float32)
    out = moe.sparse_moe_triton(x, router, gate_up, down, DECODE.top_k, True)
    weights, ids = reference.route(x, router, DECODE.top_k, True)
    expected = reference.experts_swiglu(x, weights, ids, gate_up, down)
    torch.testing.assert_close(out, expected, atol=FP32_ATOL, rtol=FP32_RTOL)


@pytest.mark.parametrize("block_m", [1, 4, 16])
def test_align_slots_groups_each_expert_in_padded_blocks(moe, block_m: int) -> None:
    experts = torch.tensor([[3, 0], [3, 1], [0, 3], [5, 4]], device=DEVICE)
    slots = experts.numel()
    sorted_slots, block_expert = moe.align_slots(experts, 6, block_m)
    assert sorted_slots.numel() == block_expert.numel() * block_m
    live = sorted_slots[sorted_slots < slots]
    assert sorted(live.tolist()) == list(range(slots))  # every slot exactly once
    blocks = sorted_slots.view(-1, block_m)
    for block, expert in zip(blocks.tolist(), block_expert.tolist(), strict=True):
        members = [s for s in block if s < slots]
        if expert == 6:  # spare block past the last run
            assert not members
        else:
            assert all(experts.flatten()[s].item() == expert for s in members)
    assert block_expert[block_expert < 6].diff().ge(0).all()  # runs in expert order


@requires_cuda
def test_cuda_tensors_dispatch_to_triton() -> None:
    load("kernels.moe.triton_moe")
    x, router, gate_up, down = (t.cuda() for t in make(DECODE, seed=7, dtype=torch.float32))
    weights, ids = moe_route(x, router, DECODE.top_k, True)
    out = moe_experts(x, weights, ids, gate_up, down)
    ref_weights, ref_ids = reference.route(x.cpu(), router.cpu(), DECODE.top_k, True)
    expected = reference.experts_swiglu(x.cpu(), ref_weights, ref_ids, gate_up.cpu(), down.cpu())
    assert torch.equal(ids.cpu(), ref_ids)
    torch.testing.assert_close(out.cpu(), expected, atol=FP32_ATOL, rtol=FP32_RTOL)
