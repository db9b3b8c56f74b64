"""Gated delta rule: chunked and recurrent forms against the naive definition and the
transformers reference implementation (the numerical oracle)."""

from __future__ import annotations

import importlib
import math
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from transformers.models.qwen3_next import modeling_qwen3_next as reference
from transformers.utils import logging as hf_logging

from kernels.gated_delta_rule import (
    RECURRENT_MAX_LEN,
    chunk_gated_delta_rule,
    gated_delta_rule,
    naive_gated_delta_rule,
    recurrent_gated_delta_rule,
)

# fp32 tolerances, for O(1) inputs. The recurrent form does the naive per-token math with
# batched matmuls, so only summation order differs: observed <= 5e-7 absolute (naive vs the
# transformers loop likewise), bound 2e-6 / 1e-5. The chunked form reorders sums over up to 64
# tokens and goes through a triangular solve: observed <= 1.5e-6 absolute (transformers' own
# chunked form shows the same), bound 1e-5 / 1e-4. A wrong term in the algebra shows up >= 1e-3.
RECURRENT_ATOL, RECURRENT_RTOL = 2e-6, 1e-5
CHUNK_ATOL, CHUNK_RTOL = 1e-5, 1e-4
# bf16 inputs, fp32 internals: the only extra error of the chunked output is its final rounding
# to bf16, at most the bf16 unit roundoff 2^-8 relative; the fp32 error sits well inside atol.
BF16_ATOL, BF16_RTOL = 1e-5, 2.0**-8

hf_logging.set_verbosity_error()
# The package re-exports a function of the same name, so reach the module through sys.modules.
gdr = importlib.import_module("kernels.gated_delta_rule")


@dataclass(frozen=True)
class Case:
    batch: int
    length: int
    key_heads: int
    value_heads: int
    key_dim: int
    value_dim: int

    def __str__(self) -> str:
        return f"B{self.batch}-T{self.length}-H{self.key_heads}-HV{self.value_heads}-K{self.key_dim}-V{self.value_dim}"


CASES = [
    Case(1, 1, 2, 2, 16, 8),  # a single decode token
    Case(2, 5, 1, 3, 8, 16),  # shorter than a chunk, HV = 3 H
    Case(1, 63, 2, 6, 16, 8),  # one short of a chunk, HV = 3 H
    Case(1, 64, 2, 2, 32, 32),  # exactly one chunk
    Case(2, 130, 2, 4, 16, 24),  # several chunks and a partial one
]


def make_inputs(case: Case, seed: int, dtype: torch.dtype = torch.float32, with_state: bool = False):
    """Model-like inputs: g from the Gated DeltaNet formula with slow to fast decaying heads."""
    gen = torch.Generator().manual_seed(seed)
    b, t, h, hv, k, v = (
        case.batch,
        case.length,
        case.key_heads,
        case.value_heads,
        case.key_dim,
        case.value_dim,
    )
    q = torch.randn(b, t, h, k, generator=gen)
    key = torch.randn(b, t, h, k, generator=gen)
    value = torch.randn(b, t, hv, v, generator=gen)
    decay_rate = torch.linspace(0.02, 4.0, hv)  # exp(A_log) per value head
    g = -decay_rate * F.softplus(torch.randn(b, t, hv, generator=gen) - 1.0)
    beta = torch.sigmoid(torch.randn(b, t, hv, generator=gen))
    state = torch.randn(b, hv, k, v, generator=gen) if with_state else None
    return (q.to(dtype), key.to(dtype), value.to(dtype), g, beta.to(dtype)), state


def close(actual: torch.Tensor, expected: torch.Tensor, atol: float, rtol: float) -> None:
    torch.testing.assert_close(actual, expected, atol=atol, rtol=rtol)


def reference_args(inputs, state):
    """transformers takes the same [B, T, heads, dim] layout and repeats q/k heads itself."""
    q, k, v, g, beta = inputs
    return dict(
        query=q,
        key=k,
        value=v,
        g=g,
        beta=beta,
        initial_state=state,
        output_final_state=True,
        use_qk_l2norm_in_kernel=True,
    )


@pytest.mark.parametrize("with_state", [False, True], ids=["zero-state", "with-state"])
@pytest.mark.parametrize("case", CASES, ids=str)
def test_recurrent_matches_naive(case: Case, with_state: bool) -> None:
    inputs, state = make_inputs(case, seed=1, with_state=with_state)
    out, final = recurrent_gated_delta_rule(*inputs, initial_state=state)
    ref_out, ref_final = naive_gated_delta_rule(*inputs, initial_state=state)
    close(out, ref_out, RECURRENT_ATOL, RECURRENT_RTOL)
    close(final, ref_final, RECURRENT_ATOL, RECURRENT_RTOL)


@pytest.mark.parametrize("chunk_size", [16, 64], ids=lambda c: f"C{c}")
@pytest.mark.parametrize("with_state", [False, True], ids=["zero-state", "with-state"])
@pytest.mark.parametrize("case", CASES, ids=str)
def test_chunk_matches_naive(case: Case, with_state: bool, chunk_size: int) -> None:
    inputs, state = make_inputs(case, seed=2, with_state=with_state)
    out, final = chunk_gated_delta_rule(*inputs, initial_state=state, chunk_size=chunk_size)
    ref_out, ref_final = naive_gated_delta_rule(*inputs, initial_state=state)
    assert out.shape == ref_out.shape and out.dtype == torch.float32
    close(out, ref_out, CHUNK_ATOL, CHUNK_RTOL)
    close(final, ref_final, CHUNK_ATOL, CHUNK_RTOL)


@pytest.mark.parametrize("with_state", [False, True], ids=["zero-state", "with-state"])
@pytest.mark.parametrize("case", CASES, ids=str)
def test_naive_matches_transformers_recurrent(case: Case, with_state: bool) -> None:
    inputs, state = make_inputs(case, seed=3, with_state=with_state)
    out, final = naive_gated_delta_rule(*inputs, initial_state=state)
    ref_out, ref_final = reference.torch_recurrent_gated_delta_rule(**reference_args(inputs, state))
    close(out, ref_out, RECURRENT_ATOL, RECURRENT_RTOL)
    close(final, ref_final, RECURRENT_ATOL, RECURRENT_RTOL)


@pytest.mark.parametrize("chunk_size", [16, 64], ids=lambda c: f"C{c}")
@pytest.mark.parametrize("with_state", [False, True], ids=["zero-state", "with-state"])
@pytest.mark.parametrize("case", CASES, ids=str)
def test_chunk_matches_transformers_chunk(case: Case, with_state: bool, chunk_size: int) -> None:
    inputs, state = make_inputs(case, seed=4, with_state=with_state)
    out, final = chunk_gated_delta_rule(*inputs, initial_state=state, chunk_size=chunk_size)
    ref_out, ref_final = reference.torch_chunk_gated_delta_rule(**reference_args(inputs, state), chunk_size=chunk_size)
    close(out, ref_out, CHUNK_ATOL, CHUNK_RTOL)
    close(final, ref_final, CHUNK_ATOL, CHUNK_RTOL)


def test_grouped_heads_match_explicit_repeat() -> None:
    """Value head j reads key head j // (HV // H): same as repeating q/k heads consecutively."""
    case = Case(1, 20, 2, 6, 8, 8)
    (q, k, v, g, beta), state = make_inputs(case, seed=5, with_state=True)
    repeated = (q.repeat_interleave(3, dim=2), k.repeat_interleave(3, dim=2), v, g, beta)
    for fn in (chunk_gated_delta_rule, recurrent_gated_delta_rule):
        out, final = fn(q, k, v, g, beta, initial_state=state)
        ref_out, ref_final = naive_gated_delta_rule(*repeated, initial_state=state)
        close(out, ref_out, CHUNK_ATOL, CHUNK_RTOL)
        close(final, ref_final, CHUNK_ATOL, CHUNK_RTOL)


@pytest.mark.parametrize(("first", "second"), [(1, 40), (37, 60), (64, 64), (100, 1)], ids=lambda n: f"T{n}")
def test_split_sequence_resume(first: int, second: int) -> None:
    """Running T1 then T2 from the returned state equals running T1 + T2 at once."""
    case = Case(2, first + second, 2, 4, 16, 8)
    (q, k, v, g, beta), state = make_inputs(case, seed=6, with_state=True)
    head = tuple(x[:, :first] for x in (q, k, v, g, beta))
    tail = tuple(x[:, first:] for x in (q, k, v, g, beta))
    whole_out, whole_final = naive_gated_delta_rule(q, k, v, g, beta, initial_state=state)
    for fn in (chunk_gated_delta_rule, recurrent_gated_delta_rule, gated_delta_rule):
        out1, mid = fn(*head, initial_state=state)
        out2, final = fn(*tail, initial_state=mid)
        close(torch.cat([out1, out2], dim=1), whole_out, CHUNK_ATOL, CHUNK_RTOL)
        close(final, whole_final, CHUNK_ATOL, CHUNK_RTOL)


@pytest.mark.parametrize("chunk_size", [16, 20], ids=lambda c: f"C{c}")
def test_chunk_long_input_in_several_passes(monkeypatch: pytest.MonkeyPatch, chunk_size: int) -> None:
    """Inputs longer than one pass are processed pass by pass with the state carried over."""
    monkeypatch.setattr(importlib.import_module("kernels.gated_delta_rule.chunk"), "MAX_TOKENS_PER_PASS", 40)
    (q, k, v, g, beta), state = make_inputs(Case(2, 101, 1, 2, 8, 8), seed=16, with_state=True)
    out, final = chunk_gated_delta_rule(q, k, v, g, beta, initial_state=state, chunk_size=chunk_size)
    ref_out, ref_final = naive_gated_delta_rule(q, k, v, g, beta, initial_state=state)
    close(out, ref_out, CHUNK_ATOL, CHUNK_RTOL)
    close(final, ref_final, CHUNK_ATOL, CHUNK_RTOL)


def test_chunk_prefill_then_recurrent_decode() -> None:
    case = Case(1, 50, 2, 4, 16, 16)
    (q, k, v, g, beta), _ = make_inputs(case, seed=7)
    whole_out, whole_final = naive_gated_delta_rule(q, k, v, g, beta)
    prefill = 45
    outs = []
    out, state = chunk_gated_delta_rule(
        q[:, :prefill], k[:, :prefill], v[:, :prefill], g[:, :prefill], beta[:, :prefill]
    )
    outs.append(out)
    for t in range(prefill, case.length):
        step = slice(t, t + 1)
        out, state = recurrent_gated_delta_rule(
            q[:, step], k[:, step], v[:, step], g[:, step], beta[:, step], initial_state=state, state_out=state
        )
        outs.append(out)
    close(torch.cat(outs, dim=1), whole_out, CHUNK_ATOL, CHUNK_RTOL)
    close(state, whole_final, CHUNK_ATOL, CHUNK_RTOL)


@pytest.mark.parametrize(
    "fn", [chunk_gated_delta_rule, recurrent_gated_delta_rule, naive_gated_delta_rule], ids=lambda f: f.__name__
)
def test_inputs_are_not_modified(fn) -> None:
    (q, k, v, g, beta), state = make_inputs(Case(1, 20, 1, 2, 8, 8), seed=8, with_state=True)
    before = [x.clone() for x in (q, k, v, g, beta, state)]
    out, final = fn(q, k, v, g, beta, initial_state=state)
    assert out.is_contiguous() and final.is_contiguous()
    assert final.untyped_storage().nbytes() == final.numel() * 4  # owns just its own memory
    final.add_(1.0)  # the returned state is not a view of the input state
    for x, y in zip((q, k, v, g, beta, state), before, strict=True):
        assert torch.equal(x, y)


@pytest.mark.parametrize("length", [1, 7], ids=lambda t: f"T{t}")
def test_recurrent_state_out(length: int) -> None:
    (q, k, v, g, beta), state = make_inputs(Case(2, length, 2, 4, 8, 8), seed=9, with_state=True)
    ref_out, ref_final = naive_gated_delta_rule(q, k, v, g, beta, initial_state=state)

    buffer = torch.full_like(state, float("nan"))  # anything left unwritten fails loudly
    out, final = recurrent_gated_delta_rule(q, k, v, g, beta, initial_state=state, state_out=buffer)
    assert final is buffer
    close(out, ref_out, RECURRENT_ATOL, RECURRENT_RTOL)
    close(buffer, ref_final, RECURRENT_ATOL, RECURRENT_RTOL)

    in_place = state.clone()
    recurrent_gated_delta_rule(q, k, v, g, beta, initial_state=in_place, state_out=in_place)
    close(in_place, ref_final, RECURRENT_ATOL, RECURRENT_RTOL)

    zero_ref_out, zero_ref_final = naive_gated_delta_rule(q, k, v, g, beta)
    buffer = torch.full_like(state, float("nan"))
    out, _ = recurrent_gated_delta_rule(q, k, v, g, beta, state_out=buffer)
    close(out, zero_ref_out, RECURRENT_ATOL, RECURRENT_RTOL)
    close(buffer, zero_ref_final, RECURRENT_ATOL, RECURRENT_RTOL)


@pytest.mark.parametrize(
    "fn", [chunk_gated_delta_rule, recurrent_gated_delta_rule, naive_gated_delta_rule], ids=lambda f: f.__name__
)
def test_options_and_empty_input(fn) -> None:
    inputs, state = make_inputs(Case(1, 9, 1, 2, 8, 4), seed=10, with_state=True)
    out, final = fn(*inputs, initial_state=state, output_final_state=False)
    assert final is None and out.shape == (1, 9, 2, 4)

    # Explicit scale and no L2 norm: compare with the naive form on pre-normalised inputs.
    q, k, v, g, beta = inputs
    out, final = fn(q, k, v, g, beta, initial_state=state, scale=0.3, use_qk_l2norm=False)
    ref_out, ref_final = naive_gated_delta_rule(q, k, v, g, beta, initial_state=state, scale=0.3, use_qk_l2norm=False)
    close(out, ref_out, CHUNK_ATOL, CHUNK_RTOL)
    close(final, ref_final, CHUNK_ATOL, CHUNK_RTOL)

    empty = tuple(x[:, :0] for x in inputs)
    out, final = fn(*empty, initial_state=state)
    assert out.shape == (1, 0, 2, 4)
    assert torch.equal(final, state) and final.data_ptr() != state.data_ptr()


def test_bf16_chunk_close_to_fp32() -> None:
    case = Case(1, 100, 2, 4, 32, 32)
    inputs, state = make_inputs(case, seed=11, dtype=torch.bfloat16, with_state=True)
    out, final = chunk_gated_delta_rule(*inputs, initial_state=state)
    assert out.dtype == torch.bfloat16 and final.dtype == torch.float32
    upcast = tuple(x.float() for x in inputs)
    ref_out, ref_final = naive_gated_delta_rule(*upcast, initial_state=state)
    close(out.float(), ref_out, BF16_ATOL, BF16_RTOL)
    close(final, ref_final, CHUNK_ATOL, CHUNK_RTOL)


def test_dispatch(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[str] = []
    for name in ("chunk_gated_delta_rule", "recurrent_gated_delta_rule"):
        original = getattr(gdr, name)

        def spy(*args, _name=name, _original=original, **kwargs):
            calls.append(_name)
            return _original(*args, **kwargs)

        monkeypatch.setattr(gdr, name, spy)

    for length, expected in [(RECURRENT_MAX_LEN, "recurrent"), (RECURRENT_MAX_LEN + 1, "chunk")]:
        inputs, state = make_inputs(Case(1, length, 1, 2, 8, 8), seed=12, with_state=True)
        out, final = gated_delta_rule(*inputs, initial_state=state)
        ref_out, ref_final = naive_gated_delta_rule(*inputs, initial_state=state)
        assert calls[-1] == f"{expected}_gated_delta_rule"
        close(out, ref_out, CHUNK_ATOL, CHUNK_RTOL)
        close(final, ref_final, CHUNK_ATOL, CHUNK_RTOL)

    inputs, _ = make_inputs(Case(1, 3, 1, 1, 4, 4), seed=13)
    close(
        gated_delta_rule(*inputs, mode="naive")[0], gated_delta_rule(*inputs, mode="chunk")[0], CHUNK_ATOL, CHUNK_RTOL
    )
    with pytest.raises(ValueError, match="unknown mode"):
        gated_delta_rule(*inputs, mode="fast")  # type: ignore[arg-type]


def test_cuda_seam_is_not_used_for_cpu_tensors() -> None:
    def fail(*args, **kwargs):
        raise AssertionError("CUDA implementation used for CPU tensors")

    gdr.register_cuda_implementation(fail)
    try:
        inputs, _ = make_inputs(Case(1, 4, 1, 1, 4, 4), seed=14)
        gated_delta_rule(*inputs)
    finally:
        gdr.register_cuda_implementation(None)


@pytest.mark.parametrize(
    "bad",
    ["k-shape", "hv-not-multiple", "g-shape", "state-shape", "chunk-size"],
)
def test_invalid_inputs(bad: str) -> None:
    (q, k, v, g, beta), state = make_inputs(Case(1, 4, 2, 4, 8, 8), seed=15, with_state=True)
    kwargs: dict = {"initial_state": state}
    if bad == "k-shape":
        k = k[..., :4]
    elif bad == "hv-not-multiple":
        v, g, beta = v[:, :, :3], g[:, :, :3], beta[:, :, :3]
        kwargs["initial_state"] = None
    elif bad == "g-shape":
        g = g[:, :, :2]
    elif bad == "state-shape":
        kwargs["initial_state"] = state[:, :2]
    else:
        kwargs["chunk_size"] = 0
    with pytest.raises(ValueError):
        chunk_gated_delta_rule(q, k, v, g, beta, **kwargs)


def test_unit_state_sanity() -> None:
    """One token into a zero state: o = (q.k) beta v with unit q, k and scale 1/sqrt(K)."""
    q = torch.tensor([[[[1.0, 0.0, 0.0, 0.0]]]])
    k = torch.tensor([[[[1.0, 0.0, 0.0, 0.0]]]])
    v = torch.tensor([[[[2.0, -4.0]]]])
    g = torch.tensor([[[-0.5]]])
    beta = torch.tensor([[[0.5]]])
    for fn in (naive_gated_delta_rule, recurrent_gated_delta_rule, chunk_gated_delta_rule):
        out, final = fn(q, k, v, g, beta)
        l2 = 1.0 / math.sqrt(1.0 + 1e-6)
        torch.testing.assert_close(out, torch.tensor([[[[1.0, -2.0]]]]) * l2 * l2 * 0.5)
        torch.testing.assert_close(final[0, 0, 0], torch.tensor([1.0, -2.0]) * l2)
