"""Causal depthwise conv: prefill against `F.conv1d` and transformers, steps against
transformers' per-step update, and state hand-over between prefill and decode."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from transformers.models.qwen3_next import modeling_qwen3_next as reference

from kernels.causal_conv1d import causal_conv1d, causal_conv1d_update, conv
from kernels.causal_conv1d import native as conv_native
from kernels.native import compiler

pytestmark = pytest.mark.native_kernels(conv_native.CONV)

# fp32: prefill runs the same F.conv1d as the reference (observed bitwise equal); the step sums
# the W products in another order: observed <= 7e-7 absolute on O(1) outputs, a few ulps.
FP32_ATOL, FP32_RTOL = 2e-6, 1e-5
# bf16: both sides accumulate in fp32 and round once to bf16 before the SiLU (observed bitwise
# equal); allow one bf16 ulp (2^-7 relative) for a summation-order rounding flip.
BF16_ATOL, BF16_RTOL = 1e-3, 2.0**-7


def make(batch: int, channels: int, length: int, width: int, seed: int, bias: bool = True):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, channels, length, generator=gen)
    weight = torch.randn(channels, width, generator=gen) / width
    b = torch.randn(channels, generator=gen) if bias else None
    return x, weight, b


def conv_reference(x, weight, bias, activation="silu"):
    """The model's depthwise `nn.Conv1d(groups=D, padding=W-1)`, cut to T, then SiLU."""
    channels, width = weight.shape
    y = F.conv1d(x, weight.unsqueeze(1), bias, padding=width - 1, groups=channels)[..., : x.shape[-1]]
    return F.silu(y) if activation else y


SHAPES = [(1, 8, 1, 4), (2, 8, 2, 4), (2, 6, 3, 4), (1, 16, 17, 4), (2, 5, 9, 2), (1, 4, 6, 1)]


def shape_id(shape) -> str:
    b, d, t, w = shape
    return f"B{b}-D{d}-T{t}-W{w}"


@pytest.mark.parametrize("activation", ["silu", None], ids=["silu", "no-act"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
def test_prefill_matches_conv1d(shape, bias: bool, activation) -> None:
    b, d, t, w = shape
    x, weight, bias_t = make(b, d, t, w, seed=1, bias=bias)
    y, state = causal_conv1d(x, weight, bias_t, activation=activation)
    torch.testing.assert_close(y, conv_reference(x, weight, bias_t, activation), atol=FP32_ATOL, rtol=FP32_RTOL)
    expected_state = F.pad(x, (w - 1, 0))[..., t:]  # the last W-1 inputs, zeros before the start
    assert state.shape == (b, d, w - 1) and state.is_contiguous()
    assert torch.equal(state, expected_state)


@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
def test_prefill_matches_transformers(shape) -> None:
    b, d, t, w = shape
    x, weight, bias = make(b, d, t, w, seed=2)
    y, _ = causal_conv1d(x, weight, bias)
    expected = reference.causal_conv1d_fn(x, weight, bias, activation="silu")
    torch.testing.assert_close(y, expected, atol=FP32_ATOL, rtol=FP32_RTOL)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_update_matches_transformers_steps(dtype: torch.dtype) -> None:
    x, weight, bias = make(2, 12, 6, 4, seed=3)
    x, weight, bias = x.to(dtype), weight.to(dtype), bias.to(dtype)
    state = torch.randn(2, 12, 3, generator=torch.Generator().manual_seed(4)).to(dtype)
    ref_state = state.clone()
    atol, rtol = (FP32_ATOL, FP32_RTOL) if dtype == torch.float32 else (BF16_ATOL, BF16_RTOL)
    for t in range(x.shape[-1]):
        y = causal_conv1d_update(x[..., t], state, weight, bias, "silu")
        ref = reference.causal_conv1d_update(x[..., t : t + 1], ref_state, weight, bias, "silu")[..., 0]
        assert y.shape == (2, 12) and y.dtype == dtype
        torch.testing.assert_close(y, ref, atol=atol, rtol=rtol)
        assert torch.equal(state, ref_state)


@pytest.mark.parametrize("prefill", [1, 2, 3, 7], ids=lambda t: f"prefill{t}")
def test_prefill_then_update_equals_whole_prefill(prefill: int) -> None:
    x, weight, bias = make(2, 10, 10, 4, seed=5)
    whole, whole_state = causal_conv1d(x, weight, bias)
    y, state = causal_conv1d(x[..., :prefill], weight, bias)
    outs = [y]
    for t in range(prefill, x.shape[-1]):
        outs.append(causal_conv1d_update(x[..., t], state, weight, bias)[..., None])
    torch.testing.assert_close(torch.cat(outs, dim=-1), whole, atol=FP32_ATOL, rtol=FP32_RTOL)
    assert torch.equal(state, whole_state)


@pytest.mark.parametrize(("first", "second"), [(1, 1), (2, 5), (5, 2), (6, 6)], ids=lambda t: f"T{t}")
def test_split_prefill_equals_whole(first: int, second: int) -> None:
    """Prefill in two parts, the second continuing from the first's state (also when T < W-1)."""
    x, weight, bias = make(1, 7, first + second, 4, seed=6)
    whole, whole_state = causal_conv1d(x, weight, bias)
    y1, state = causal_conv1d(x[..., :first], weight, bias)
    y2, state = causal_conv1d(x[..., first:], weight, bias, conv_state=state)
    torch.testing.assert_close(torch.cat([y1, y2], dim=-1), whole, atol=FP32_ATOL, rtol=FP32_RTOL)
    assert torch.equal(state, whole_state)


def test_prefill_does_not_modify_or_alias_inputs() -> None:
    x, weight, bias = make(1, 4, 3, 4, seed=7)
    conv_state = torch.randn(1, 4, 3)
    before = [t.clone() for t in (x, weight, bias, conv_state)]
    _, new_state = causal_conv1d(x, weight, bias, conv_state=conv_state)
    _, fresh_state = causal_conv1d(x, weight, bias)  # T == W-1: the state is exactly x
    new_state.add_(1.0)
    fresh_state.add_(1.0)
    for t, ref in zip((x, weight, bias, conv_state), before, strict=True):
        assert torch.equal(t, ref)


def test_update_writes_whole_state() -> None:
    """A NaN-filled history is fully replaced once W-1 steps have gone through."""
    x, weight, bias = make(1, 5, 3, 4, seed=8)
    state = torch.full((1, 5, 3), float("nan"))
    for t in range(3):
        causal_conv1d_update(x[..., t], state, weight, bias)
    assert torch.equal(state, x)


def test_bf16_prefill_close_to_reference() -> None:
    x, weight, bias = make(2, 16, 12, 4, seed=9)
    x, weight, bias = x.bfloat16(), weight.bfloat16(), bias.bfloat16()
    y, state = causal_conv1d(x, weight, bias)
    expected = reference.causal_conv1d_fn(x, weight, bias, activation="silu")
    assert y.dtype == torch.bfloat16 and state.dtype == torch.bfloat16
    torch.testing.assert_close(y, expected, atol=BF16_ATOL, rtol=BF16_RTOL)


def test_empty_prefill_keeps_state() -> None:
    x, weight, bias = make(2, 4, 0, 4, seed=11)
    y, state = causal_conv1d(x, weight, bias)
    assert y.shape == (2, 4, 0) and torch.equal(state, torch.zeros(2, 4, 3))
    previous = torch.randn(2, 4, 3)
    y, state = causal_conv1d(x, weight, bias, conv_state=previous)
    assert torch.equal(state, previous) and state.data_ptr() != previous.data_ptr()


def test_invalid_inputs() -> None:
    x, weight, bias = make(1, 4, 3, 4, seed=10)
    with pytest.raises(ValueError):
        causal_conv1d(x, weight[:2], bias)
    with pytest.raises(ValueError):
        causal_conv1d(x, weight, bias, conv_state=torch.zeros(1, 4, 4))
    with pytest.raises(ValueError):
        causal_conv1d(x, weight, bias, activation="relu")
    with pytest.raises(ValueError):
        causal_conv1d_update(x, torch.zeros(1, 4, 3), weight, bias)


requires_native = pytest.mark.skipif(
    conv_native.kernel() is None, reason="native kernel needs a C compiler and a CPU with AVX-512 BF16 or AVX2"
)


@requires_native
@pytest.mark.parametrize("with_state", [True, False], ids=["state", "fresh"])
@pytest.mark.parametrize("shape", [(1, 300, 1024, 4), (2, 5, 40, 4), (1, 1, 20, 3), (1, 2, 17, 4), (1, 9, 77, 16)],
                         ids=lambda s: "B{}-T{}-D{}-W{}".format(*s))
def test_native_conv_equals_pytorch_bitwise(shape, with_state, native_isa):
    """Taps summed in fp32 in order and rounded where the PyTorch path rounds (observed bitwise
    equal to oneDNN's conv here; BF16 tolerances allow a summation-order flip elsewhere)."""
    batch, length, channels, taps = shape
    generator = torch.Generator().manual_seed(sum(shape))
    x = torch.randn(batch, length, channels, generator=generator).bfloat16().transpose(1, 2)
    weight = torch.randn(channels, taps, generator=generator).bfloat16()
    state = torch.randn(batch, channels, taps - 1, generator=generator).bfloat16() if with_state else None
    before = None if state is None else state.clone()
    assert conv_native.supports(x, weight, None, state, "silu")
    ours, ours_state = causal_conv1d(x, weight, conv_state=state)
    expected, expected_state = conv.causal_conv1d(x, weight, conv_state=state)
    torch.testing.assert_close(ours.float(), expected.float(), atol=BF16_ATOL, rtol=BF16_RTOL)
    assert torch.equal(ours_state, expected_state)
    assert ours.transpose(1, 2).is_contiguous()
    if state is not None:
        assert torch.equal(state, before)


@requires_native
def test_native_conv_bits_do_not_depend_on_threads(native_isa):
    """Channels are lanes of their own: any split of them over threads gives the same bits."""
    generator = torch.Generator().manual_seed(21)
    x = torch.randn(1, 37, 1000, generator=generator).bfloat16().transpose(1, 2)
    weight = torch.randn(1000, 4, generator=generator).bfloat16()
    state = torch.randn(1, 1000, 3, generator=generator).bfloat16()
    expected, expected_state = conv_native.causal_conv1d(x, weight, state, "silu", threads=1)
    for threads in (2, 3):
        ours, ours_state = conv_native.causal_conv1d(x, weight, state, "silu", threads=threads)
        assert torch.equal(ours, expected) and torch.equal(ours_state, expected_state)


def test_every_build_compiles():
    if compiler() is None:
        pytest.skip("no C compiler")
    assert set(conv_native.CONV.build_all()) == {"avx512", "avx2"}
