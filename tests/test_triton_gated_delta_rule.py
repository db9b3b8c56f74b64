"""Triton gated delta rule kernels (chunked prefill, recurrent decode, fused gates) against the
token-by-token PyTorch definition `naive_gated_delta_rule`."""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before anything imports Triton

from dataclasses import dataclass  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from kernels.gated_delta_rule import gated_delta_rule, gated_delta_rule_from_gates, naive_gated_delta_rule  # noqa: E402
from tests.triton_support import (  # noqa: E402
    DEVICE,
    check_interpreted,
    dtype_id,
    load,
    prefill_new_tensors,
    requires_cuda,
)

# fp32: the chunked kernels reorder sums over 64-token chunks and invert the triangular system
# by blocks, as the PyTorch chunked form does (observed <= 1e-6 absolute on O(1) values); the
# recurrent kernel does the naive per-token math (observed <= 5e-7). A wrong term is >= 1e-3.
CHUNK_ATOL, CHUNK_RTOL = 1e-5, 1e-4
RECURRENT_ATOL, RECURRENT_RTOL = 2e-6, 1e-5
# bf16 inputs: the output is rounded once to bf16 (2^-9 relative); on GPU the fp32 intermediates
# also pass through TF32 products (2^-11 relative each), hence 2^-8 relative plus a 2^-10 floor.
# The fp32 final state sees only the TF32 error.
BF16_ATOL, BF16_RTOL = 2.0**-10, 2.0**-8
BF16_STATE_ATOL, BF16_STATE_RTOL = 1e-3, 1e-3


@pytest.fixture(autouse=True)
def _nan_buffers(monkeypatch: pytest.MonkeyPatch) -> None:
    prefill_new_tensors(monkeypatch)


@pytest.fixture(scope="module")
def chunk():
    return load("kernels.gated_delta_rule.triton_chunk")


@pytest.fixture(scope="module")
def recurrent():
    return load("kernels.gated_delta_rule.triton_recurrent")


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


def make_inputs(case: Case, seed: int, dtype: torch.dtype = torch.float32, with_state: bool = False, states: int = 0):
    """Model-like inputs on DEVICE: g from the Gated DeltaNet formula, slow to fast decaying heads."""
    gen = torch.Generator().manual_seed(seed)
    b, t, h, hv, k, v = (case.batch, case.length, case.key_heads, case.value_heads, case.key_dim, case.value_dim)
    q = torch.randn(b, t, h, k, generator=gen)
    key = torch.randn(b, t, h, k, generator=gen)
    value = torch.randn(b, t, hv, v, generator=gen)
    g = -torch.linspace(0.02, 4.0, hv) * F.softplus(torch.randn(b, t, hv, generator=gen) - 1.0)
    beta = torch.sigmoid(torch.randn(b, t, hv, generator=gen))
    state = torch.randn(states or b, hv, k, v, generator=gen) if with_state else None
    inputs = tuple(x.to(DEVICE) for x in (q.to(dtype), key.to(dtype), value.to(dtype), g, beta.to(dtype)))
    return inputs, (state.to(DEVICE) if state is not None else None)


def reference(inputs, state, **kwargs):
    """naive_gated_delta_rule on CPU in fp32, results moved to DEVICE."""
    cpu = tuple(x.cpu().float() for x in inputs)
    out, final = naive_gated_delta_rule(*cpu, initial_state=None if state is None else state.cpu(), **kwargs)
    return out.to(DEVICE), (final.to(DEVICE) if final is not None else None)


def per_sequence_reference(inputs, state, offsets: list[int]):
    """The reference run on each packed sequence separately: outputs `[1, T, ...]`, states `[N, ...]`."""
    outs, finals = [], []
    for i, (start, end) in enumerate(zip(offsets[:-1], offsets[1:], strict=True)):
        part = tuple(x[:, start:end] for x in inputs)
        out, final = reference(part, None if state is None else state[i : i + 1])
        outs.append(out)
        finals.append(final)
    return torch.cat(outs, dim=1), torch.cat(finals)


def close(actual: torch.Tensor, expected: torch.Tensor, atol: float, rtol: float) -> None:
    torch.testing.assert_close(actual.float(), expected.float(), atol=atol, rtol=rtol)


CHUNK_CASES = [
    Case(1, 20, 1, 2, 8, 8),  # one partial chunk, two value heads per key head
    Case(2, 70, 1, 2, 16, 24),  # a full and a partial chunk per sequence, V not a power of two
    Case(1, 64, 2, 2, 32, 16),  # exactly one chunk, one value head per key head
]


def test_kernels_run_under_the_interpreter_as_requested(chunk, recurrent) -> None:
    """TRITON_INTERPRET set by this module took effect (or was deliberately 0 on a GPU machine)."""
    check_interpreted(chunk)
    check_interpreted(recurrent)


@pytest.mark.parametrize("with_state", [False, True], ids=["zero-state", "with-state"])
@pytest.mark.parametrize("case", CHUNK_CASES, ids=str)
def test_chunk_matches_naive(chunk, case: Case, with_state: bool) -> None:
    inputs, state = make_inputs(case, seed=1, with_state=with_state)
    out, final = chunk.chunk_gated_delta_rule_triton(*inputs, initial_state=state)
    ref_out, ref_final = reference(inputs, state)
    assert out.shape == ref_out.shape and out.dtype == torch.float32 and final.dtype == torch.float32
    close(out, ref_out, CHUNK_ATOL, CHUNK_RTOL)
    close(final, ref_final, CHUNK_ATOL, CHUNK_RTOL)


@pytest.mark.parametrize("lengths", [[5, 0, 70], [64, 1]], ids=lambda n: "L" + "-".join(map(str, n)))
def test_chunk_variable_lengths(chunk, lengths: list[int]) -> None:
    """Packed sequences (one empty, one spanning two chunks) equal separate runs of each."""
    offsets = [0, *torch.tensor(lengths).cumsum(0).tolist()]
    case = Case(1, offsets[-1], 1, 2, 16, 8)
    inputs, state = make_inputs(case, seed=2, with_state=True, states=len(lengths))
    cu = torch.tensor(offsets, dtype=torch.int32, device=DEVICE)
    out, final = chunk.chunk_gated_delta_rule_triton(*inputs, initial_state=state, cu_seqlens=cu)
    ref_out, ref_final = per_sequence_reference(inputs, state, offsets)
    close(out, ref_out, CHUNK_ATOL, CHUNK_RTOL)
    close(final, ref_final, CHUNK_ATOL, CHUNK_RTOL)


def test_chunk_bf16_inputs(chunk) -> None:
    case = Case(1, 40, 1, 2, 32, 16)
    inputs, state = make_inputs(case, seed=3, dtype=torch.bfloat16, with_state=True)
    out, final = chunk.chunk_gated_delta_rule_triton(*inputs, initial_state=state)
    ref_out, ref_final = reference(inputs, state)
    assert out.dtype == torch.bfloat16 and final.dtype == torch.float32
    close(out, ref_out, BF16_ATOL, BF16_RTOL)
    close(final, ref_final, BF16_STATE_ATOL, BF16_STATE_RTOL)


def test_chunk_options_and_empty_input(chunk) -> None:
    case = Case(1, 9, 1, 2, 8, 4)
    inputs, state = make_inputs(case, seed=4, with_state=True)
    out, final = chunk.chunk_gated_delta_rule_triton(
        *inputs, initial_state=state, scale=0.3, use_qk_l2norm=False, output_final_state=False
    )
    ref_out, _ = reference(inputs, state, scale=0.3, use_qk_l2norm=False)
    assert final is None
    close(out, ref_out, CHUNK_ATOL, CHUNK_RTOL)

    empty = tuple(x[:, :0] for x in inputs)
    out, final = chunk.chunk_gated_delta_rule_triton(*empty, initial_state=state)
    assert out.shape == (1, 0, 2, 4) and torch.equal(final, state)


def test_chunk_rejects_bad_shapes(chunk) -> None:
    inputs, state = make_inputs(Case(2, 4, 1, 2, 8, 8), seed=5, with_state=True)
    with pytest.raises(ValueError, match="B = 1"):
        chunk.chunk_gated_delta_rule_triton(*inputs, cu_seqlens=torch.tensor([0, 4], device=DEVICE))
    with pytest.raises(ValueError, match="initial_state"):
        chunk.chunk_gated_delta_rule_triton(*inputs, initial_state=state[:1])


RECURRENT_CASES = [
    Case(2, 1, 2, 4, 16, 8),  # a decode step
    Case(1, 7, 1, 2, 16, 24),  # a short prompt, V not a power of two
]


@pytest.mark.parametrize("with_state", [False, True], ids=["zero-state", "with-state"])
@pytest.mark.parametrize("case", RECURRENT_CASES, ids=str)
def test_recurrent_matches_naive(recurrent, case: Case, with_state: bool) -> None:
    inputs, state = make_inputs(case, seed=6, with_state=with_state)
    out, final = recurrent.recurrent_gated_delta_rule_triton(*inputs, initial_state=state)
    ref_out, ref_final = reference(inputs, state)
    close(out, ref_out, RECURRENT_ATOL, RECURRENT_RTOL)
    close(final, ref_final, RECURRENT_ATOL, RECURRENT_RTOL)
    if state is not None:
        assert final.data_ptr() != state.data_ptr()


def test_recurrent_decode_updates_state_in_place(recurrent) -> None:
    """Passing the state as state_out updates it in place; a NaN buffer is fully overwritten."""
    inputs, state = make_inputs(Case(2, 1, 2, 4, 16, 8), seed=7, with_state=True)
    ref_out, ref_final = reference(inputs, state)

    in_place = state.clone()
    out, final = recurrent.recurrent_gated_delta_rule_triton(*inputs, initial_state=in_place, state_out=in_place)
    assert final is in_place
    close(out, ref_out, RECURRENT_ATOL, RECURRENT_RTOL)
    close(in_place, ref_final, RECURRENT_ATOL, RECURRENT_RTOL)

    buffer = torch.full_like(state, float("nan"))
    recurrent.recurrent_gated_delta_rule_triton(*inputs, initial_state=state, state_out=buffer)
    close(buffer, ref_final, RECURRENT_ATOL, RECURRENT_RTOL)


def test_recurrent_strided_inputs(recurrent) -> None:
    """q, k, v as column slices of one projection, the way the model splits its conv output."""
    case = Case(2, 3, 2, 4, 16, 8)
    (q, k, v, g, beta), state = make_inputs(case, seed=8, with_state=True)
    width = 2 * 2 * 16 + 4 * 8
    mixed = torch.cat([q.flatten(2), k.flatten(2), v.flatten(2)], dim=-1)
    assert mixed.shape[-1] == width
    qs, ks, vs = mixed.split([32, 32, 32], dim=-1)
    qs, ks, vs = qs.view(2, 3, 2, 16), ks.view(2, 3, 2, 16), vs.view(2, 3, 4, 8)
    assert not qs.is_contiguous() and not vs.is_contiguous()
    out, final = recurrent.recurrent_gated_delta_rule_triton(qs, ks, vs, g, beta, initial_state=state)
    ref_out, ref_final = reference((q, k, v, g, beta), state)
    close(out, ref_out, RECURRENT_ATOL, RECURRENT_RTOL)
    close(final, ref_final, RECURRENT_ATOL, RECURRENT_RTOL)


def test_recurrent_variable_lengths(recurrent) -> None:
    offsets = [0, 3, 3, 7]
    inputs, state = make_inputs(Case(1, 7, 1, 2, 8, 8), seed=9, with_state=True, states=3)
    cu = torch.tensor(offsets, dtype=torch.int32, device=DEVICE)
    out, final = recurrent.recurrent_gated_delta_rule_triton(*inputs, initial_state=state, cu_seqlens=cu)
    ref_out, ref_final = per_sequence_reference(inputs, state, offsets)
    close(out, ref_out, RECURRENT_ATOL, RECURRENT_RTOL)
    close(final, ref_final, RECURRENT_ATOL, RECURRENT_RTOL)


def model_gates(a: torch.Tensor, b: torch.Tensor, A_log: torch.Tensor, dt_bias: torch.Tensor):
    """The gates as `model.layers.GatedDeltaNet.forward` computes them."""
    g = -A_log.float().exp() * F.softplus(a.float() + dt_bias)
    return g, b.sigmoid()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=dtype_id)
def test_recurrent_fused_gates_match_gates_in_pytorch(recurrent, dtype: torch.dtype) -> None:
    case = Case(2, 3, 1, 2, 16, 8)
    (q, k, v, _, _), state = make_inputs(case, seed=10, dtype=dtype, with_state=True)
    gen = torch.Generator().manual_seed(11)
    a = (torch.randn(2, 3, 2, generator=gen) * 8).to(dtype)
    a[0, 0, 0] = 30.0  # softplus above its threshold: returned as is
    a[1, 2, 1] = -40.0  # softplus far below fp32 epsilon: no decay at all
    b = (torch.randn(2, 3, 2, generator=gen) * 3).to(dtype)
    A_log = torch.randn(2, generator=gen)
    dt_bias = torch.randn(2, generator=gen).to(dtype)
    a, b, A_log, dt_bias = (x.to(DEVICE) for x in (a, b, A_log, dt_bias))

    out, final = recurrent.recurrent_gated_delta_rule_from_gates_triton(
        q, k, v, a, b, A_log, dt_bias, initial_state=state
    )
    g, beta = model_gates(a, b, A_log, dt_bias)
    ref_out, ref_final = reference((q, k, v, g, beta), state)
    if dtype == torch.float32:
        close(out, ref_out, RECURRENT_ATOL, RECURRENT_RTOL)
        close(final, ref_final, RECURRENT_ATOL, RECURRENT_RTOL)
    else:  # an fp32 sigmoid one ulp off can round beta to the neighbouring bf16 value
        close(out, ref_out, BF16_ATOL, BF16_RTOL)
        close(final, ref_final, BF16_STATE_ATOL, BF16_STATE_RTOL)


def test_from_gates_dispatch_on_cpu_matches_model_gates() -> None:
    """The dispatcher's PyTorch path computes the gates like the model, then runs the reference."""
    case = Case(1, 12, 1, 2, 8, 8)
    (q, k, v, _, _), state = make_inputs(case, seed=12, with_state=True)
    gen = torch.Generator().manual_seed(13)
    a, b = torch.randn(1, 12, 2, generator=gen), torch.randn(1, 12, 2, generator=gen)
    A_log, dt_bias = torch.randn(2, generator=gen), torch.randn(2, generator=gen)
    args = [x.cpu() for x in (q, k, v)]
    out, final = gated_delta_rule_from_gates(*args, a, b, A_log, dt_bias, initial_state=state.cpu())
    g, beta = model_gates(a, b, A_log, dt_bias)
    ref_out, ref_final = naive_gated_delta_rule(*args, g, beta, initial_state=state.cpu())
    close(out, ref_out, CHUNK_ATOL, CHUNK_RTOL)
    close(final, ref_final, CHUNK_ATOL, CHUNK_RTOL)


@pytest.mark.parametrize("mode", ["auto", "chunk", "recurrent"])
def test_variable_length_dispatch_on_cpu(mode: str) -> None:
    """`gated_delta_rule(cu_seqlens=...)` on CPU runs the PyTorch forms sequence by sequence."""
    offsets = [0, 2, 2, 30]
    inputs, state = make_inputs(Case(1, 30, 1, 2, 8, 8), seed=14, with_state=True, states=3)
    inputs, state = tuple(x.cpu() for x in inputs), state.cpu()
    out, final = gated_delta_rule(*inputs, initial_state=state, cu_seqlens=torch.tensor(offsets), mode=mode)
    ref_out, ref_final = per_sequence_reference(inputs, state, offsets)
    close(out, ref_out.cpu(), CHUNK_ATOL, CHUNK_RTOL)
    close(final, ref_final.cpu(), CHUNK_ATOL, CHUNK_RTOL)


@requires_cuda
@pytest.mark.parametrize("length", [1, 100], ids=lambda t: f"T{t}")
def test_cuda_tensors_dispatch_to_triton(length: int) -> None:
    load("kernels.gated_delta_rule.triton_chunk")
    inputs, state = make_inputs(Case(2, length, 2, 4, 32, 32), seed=15, with_state=True)
    cuda = tuple(x.cuda() for x in inputs)
    out, final = gated_delta_rule(*cuda, initial_state=state.cuda())
    ref_out, ref_final = naive_gated_delta_rule(*(x.cpu() for x in inputs), initial_state=state.cpu())
    assert out.is_cuda and final.is_cuda
    close(out.cpu(), ref_out, CHUNK_ATOL, CHUNK_RTOL)
    close(final.cpu(), ref_final, CHUNK_ATOL, CHUNK_RTOL)
