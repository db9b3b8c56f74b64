"""Triton causal depthwise conv1d (prefill and decode step) against the PyTorch reference in
`kernels/causal_conv1d/conv.py`."""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before anything imports Triton

import pytest  # noqa: E402
import torch  # noqa: E402

from kernels.causal_conv1d import causal_conv1d, causal_conv1d_update  # noqa: E402
from kernels.causal_conv1d import conv as reference  # noqa: E402
from tests.triton_support import (  # noqa: E402
    DEVICE,
    check_interpreted,
    dtype_id,
    load,
    prefill_new_tensors,
    requires_cuda,
)

# fp32: the same W products summed in another order: a few ulps of O(1) outputs.
FP32_ATOL, FP32_RTOL = 2e-6, 1e-5
# bf16: both sides sum in fp32 and round at the same points (observed bitwise equal); allow one
# bf16 ulp (2^-7 relative) for a rounding flip from the summation order.
BF16_ATOL, BF16_RTOL = 1e-3, 2.0**-7

# (B, D, T, W): T below, at and beyond W - 1; W = 1 has no tail; D = 300 spans two channel tiles.
SHAPES = [(1, 8, 1, 4), (2, 6, 3, 4), (2, 5, 9, 4), (1, 4, 6, 1), (1, 300, 5, 3)]


@pytest.fixture(autouse=True)
def _nan_buffers(monkeypatch: pytest.MonkeyPatch) -> None:
    prefill_new_tensors(monkeypatch)


@pytest.fixture(scope="module")
def triton_conv():
    return load("kernels.causal_conv1d.triton_conv")


def shape_id(shape) -> str:
    b, d, t, w = shape
    return f"B{b}-D{d}-T{t}-W{w}"


def tolerance(dtype: torch.dtype) -> tuple[float, float]:
    return (FP32_ATOL, FP32_RTOL) if dtype == torch.float32 else (BF16_ATOL, BF16_RTOL)


def make(shape, seed: int, dtype: torch.dtype, bias: bool = True, state: bool = True):
    """x as the model passes it: a `[B, D, T]` view of a `[B, T, D]` tensor (channels contiguous)."""
    b, d, t, w = shape
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(b, t, d, generator=gen).to(dtype).to(DEVICE).transpose(1, 2)
    weight = (torch.randn(d, w, generator=gen) / w).to(dtype).to(DEVICE)
    bias_t = torch.randn(d, generator=gen).to(dtype).to(DEVICE) if bias else None
    conv_state = torch.randn(b, d, w - 1, generator=gen).to(dtype).to(DEVICE) if state else None
    return x, weight, bias_t, conv_state


def test_kernels_run_under_the_interpreter_as_requested(triton_conv) -> None:
    check_interpreted(triton_conv)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=dtype_id)
@pytest.mark.parametrize("options", [(True, True, "silu"), (False, False, None)], ids=["bias-state-silu", "plain"])
@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
def test_prefill_matches_reference(triton_conv, shape, options, dtype: torch.dtype) -> None:
    bias, state, activation = options
    x, weight, bias_t, conv_state = make(shape, seed=1, dtype=dtype, bias=bias, state=state)
    y, new_state = triton_conv.causal_conv1d_triton(x, weight, bias_t, conv_state=conv_state, activation=activation)
    ref_y, ref_state = reference.causal_conv1d(x, weight, bias_t, conv_state=conv_state, activation=activation)
    assert y.dtype == dtype and y.stride() == x.stride()  # same layout as x: channels contiguous
    torch.testing.assert_close(y, ref_y, atol=tolerance(dtype)[0], rtol=tolerance(dtype)[1])
    assert new_state.is_contiguous() and torch.equal(new_state, ref_state)


def test_prefill_contiguous_input_and_empty(triton_conv) -> None:
    x, weight, bias, conv_state = make((2, 6, 5, 4), seed=2, dtype=torch.float32)
    x = x.contiguous()
    y, new_state = triton_conv.causal_conv1d_triton(x, weight, bias, conv_state=conv_state)
    ref_y, ref_state = reference.causal_conv1d(x, weight, bias, conv_state=conv_state)
    torch.testing.assert_close(y, ref_y, atol=FP32_ATOL, rtol=FP32_RTOL)
    assert torch.equal(new_state, ref_state)

    y, new_state = triton_conv.causal_conv1d_triton(x[..., :0], weight, bias, conv_state=conv_state)
    assert y.shape == (2, 6, 0) and torch.equal(new_state, conv_state)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=dtype_id)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
@pytest.mark.parametrize("shape", [(2, 8, 1, 4), (1, 300, 1, 3), (1, 4, 1, 1)], ids=shape_id)
def test_update_matches_reference(triton_conv, shape, bias: bool, dtype: torch.dtype) -> None:
    x, weight, bias_t, conv_state = make(shape, seed=3, dtype=dtype, bias=bias)
    step = x[..., 0]  # [B, D], strided like a decode slice of the projection
    ours_state, ref_state = conv_state.clone(), conv_state.clone()
    y = triton_conv.causal_conv1d_update_triton(step, ours_state, weight, bias_t)
    ref_y = reference.causal_conv1d_update(step, ref_state, weight, bias_t)
    torch.testing.assert_close(y, ref_y, atol=tolerance(dtype)[0], rtol=tolerance(dtype)[1])
    assert torch.equal(ours_state, ref_state)


def test_prefill_then_steps_equal_one_prefill(triton_conv) -> None:
    """The conv state handed from prefill to decode steps continues the sequence exactly."""
    x, weight, bias, _ = make((2, 6, 7, 4), seed=4, dtype=torch.float32, state=False)
    whole, _ = reference.causal_conv1d(x, weight, bias)
    y, state = triton_conv.causal_conv1d_triton(x[..., :4], weight, bias)
    steps = [triton_conv.causal_conv1d_update_triton(x[..., t], state, weight, bias) for t in range(4, 7)]
    joined = torch.cat([y, torch.stack(steps, dim=-1)], dim=-1)
    torch.testing.assert_close(joined, whole, atol=FP32_ATOL, rtol=FP32_RTOL)


@requires_cuda
def test_cuda_tensors_dispatch_to_triton() -> None:
    load("kernels.causal_conv1d.triton_conv")
    x, weight, bias, conv_state = make((2, 40, 9, 4), seed=5, dtype=torch.float32)
    y, new_state = causal_conv1d(x.cuda(), weight.cuda(), bias.cuda(), conv_state=conv_state.cuda())
    ref_y, ref_state = reference.causal_conv1d(x.cpu(), weight.cpu(), bias.cpu(), conv_state=conv_state.cpu())
    torch.testing.assert_close(y.cpu(), ref_y, atol=FP32_ATOL, rtol=FP32_RTOL)
    assert torch.equal(new_state.cpu(), ref_state)
    step_state = conv_state.cuda()
    out = causal_conv1d_update(x[..., 0].cuda(), step_state, weight.cuda(), bias.cuda())
    ref_out = reference.causal_conv1d_update(x[..., 0].cpu(), conv_state.cpu(), weight.cpu(), bias.cpu())
    torch.testing.assert_close(out.cpu(), ref_out, atol=FP32_ATOL, rtol=FP32_RTOL)
