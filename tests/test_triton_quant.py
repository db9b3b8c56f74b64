"""Triton linear layer over quantized weights against `dequantize` followed by an fp64 product."""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before anything imports Triton

from dataclasses import dataclass  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from kernels.quant import FP8_BLOCK, INT4, INT8, QuantizedWeight, dequantize, fp8_block, quantize_int4, quantize_int8  # noqa: E402
from tests.triton_support import (  # noqa: E402
    DEVICE,
    check_interpreted,
    dtype_id,
    load,
    prefill_new_tensors,
    requires_cuda,
)

# Worst-case error of an fp32 dot product of depth K is about K unit roundoffs of sum |x_k w_k|;
# the kernel adds a scale multiply and an accumulation per K step and the bias, so allow
# 2 K + 8 of them. The result is then rounded once to x.dtype: half an ulp, i.e. its unit
# roundoff relative to the exact value.
FP32_UNIT = 2.0**-24
OUTPUT_UNIT = {torch.float32: 2.0**-24, torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}


@dataclass(frozen=True)
class Layout:
    format: str
    group: int = 0

    def __str__(self) -> str:
        return f"{self.format}-g{self.group}" if self.group else self.format


LAYOUTS = [Layout(FP8_BLOCK), Layout(INT8), Layout(INT4, 128), Layout(INT4, 32)]
# Odd sizes: partial fp8 blocks along both sides (130, 129, 257), partial int4 groups and an
# odd K whose last byte holds a padding nibble (1, 129, 200, 257).
SHAPES = [(7, 1), (7, 200), (130, 129), (130, 257)]
ROWS = [1, 5, 33]  # decode tiles (up to 16 rows) and prefill tiles


@pytest.fixture(autouse=True)
def _nan_buffers(monkeypatch: pytest.MonkeyPatch) -> None:
    prefill_new_tensors(monkeypatch)


@pytest.fixture(scope="module")
def tq():
    return load("kernels.quant.triton_quant")


def make_weight(layout: Layout, shape: tuple[int, int], seed: int, scale_dtype: torch.dtype) -> QuantizedWeight:
    """A quantized weight `[N, K]` on DEVICE with its scales stored in `scale_dtype`."""
    gen = torch.Generator().manual_seed(seed)
    if layout.format == FP8_BLOCK:
        data = (torch.randn(shape, generator=gen) * 100).clamp(-448, 448).to(torch.float8_e4m3fn)
        blocks = (-(-shape[0] // 128), -(-shape[1] // 128))
        weight = fp8_block(data, torch.rand(blocks, generator=gen) * 1e-3 + 1e-4)
    else:
        dense = torch.randn(shape, generator=gen) * 0.05
        weight = quantize_int8(dense) if layout.format == INT8 else quantize_int4(dense, layout.group)
    return QuantizedWeight(
        weight.format, weight.data.to(DEVICE), weight.scale.to(scale_dtype).to(DEVICE), weight.shape, weight.group_size
    )


def check_product(out: torch.Tensor, x: torch.Tensor, weight: QuantizedWeight, bias: torch.Tensor | None) -> None:
    """out `[M, N]` within the stated bound of the fp64 product of x and the dequantized weight."""
    w = dequantize(weight).double().cpu()
    xd = x.double().cpu()
    exact = xd @ w.T + (bias.double().cpu() if bias is not None else 0.0)
    magnitude = xd.abs() @ w.abs().T + (bias.double().abs().cpu() if bias is not None else 0.0)
    unit = OUTPUT_UNIT[out.dtype]
    bound = unit * exact.abs() + (1 + unit) * (2 * x.shape[-1] + 8) * FP32_UNIT * magnitude
    error = (out.double().cpu() - exact).abs()
    assert out.shape == exact.shape and out.dtype == x.dtype
    assert bool((error <= bound).all()), f"worst error / bound: {(error / bound).nan_to_num(float('inf')).max():.3g}"


def test_kernels_run_under_the_interpreter_as_requested(tq) -> None:
    check_interpreted(tq)


@pytest.mark.parametrize("scale_dtype", [torch.float32, torch.bfloat16], ids=lambda d: f"scale-{dtype_id(d)}")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=dtype_id)
@pytest.mark.parametrize("rows", ROWS, ids=lambda m: f"M{m}")
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"N{s[0]}-K{s[1]}")
@pytest.mark.parametrize("layout", LAYOUTS, ids=str)
def test_matches_dequantized_fp64_product(tq, layout, shape, rows, dtype, scale_dtype) -> None:
    weight = make_weight(layout, shape, seed=rows + shape[1], scale_dtype=scale_dtype)
    gen = torch.Generator().manual_seed(shape[0] * rows)
    x = torch.randn(rows, shape[1], generator=gen).to(dtype).to(DEVICE)
    bias = torch.randn(shape[0], generator=gen).to(dtype).to(DEVICE)
    check_product(tq.quantized_linear_triton(x, weight, bias), x, weight, bias)


@pytest.mark.parametrize("layout", LAYOUTS, ids=str)
def test_no_bias_and_leading_dims(tq, layout) -> None:
    weight = make_weight(layout, (130, 129), seed=1, scale_dtype=torch.float32)
    x = torch.randn(2, 3, 129, generator=torch.Generator().manual_seed(2)).to(DEVICE)
    out = tq.quantized_linear_triton(x, weight)
    assert out.shape == (2, 3, 130)
    check_product(out.view(6, 130), x.view(6, 129), weight, None)


@pytest.mark.parametrize("rows", [1, 33], ids=lambda m: f"M{m}")
@pytest.mark.parametrize("layout", LAYOUTS, ids=str)
def test_float16_inputs(tq, layout, rows) -> None:
    weight = make_weight(layout, (130, 200), seed=9, scale_dtype=torch.float16)
    gen = torch.Generator().manual_seed(10)
    x = torch.randn(rows, 200, generator=gen).to(torch.float16).to(DEVICE)
    bias = torch.randn(130, generator=gen).to(torch.float16).to(DEVICE)
    check_product(tq.quantized_linear_triton(x, weight, bias), x, weight, bias)


def test_no_rows(tq) -> None:
    weight = make_weight(Layout(INT8), (7, 200), seed=11, scale_dtype=torch.float32)
    assert tq.quantized_linear_triton(torch.zeros(0, 200, device=DEVICE), weight).shape == (0, 7)


def test_fp8_decodes_every_code_exactly(tq) -> None:
    """All 256 e4m3 codes (subnormals, zeros, NaN) as a weight `[256, 1]` times x = 1 (a sum that
    starts from +0, so -0.0 comes out as +0.0, as any product with fp32 accumulation gives)."""
    codes = torch.arange(256, dtype=torch.int32).to(torch.uint8).view(torch.float8_e4m3fn).view(256, 1)
    weight = fp8_block(codes.to(DEVICE), torch.ones(2, 1, device=DEVICE))
    out = tq.quantized_linear_triton(torch.ones(1, 1, device=DEVICE), weight)
    expected = codes.float().view(1, 256)
    torch.testing.assert_close(out.cpu(), expected, atol=0, rtol=0, equal_nan=True)


@pytest.mark.parametrize("rows", ROWS, ids=lambda m: f"M{m}")
def test_fp8_hardware_conversion_path(tq, monkeypatch, rows) -> None:
    """The branch taken on GPUs with fp8 support (float8e4nv loads cast by Triton) computes the
    same products; under the interpreter its cast differs only for the NaN codes, absent here."""
    monkeypatch.setattr(tq, "fp8_native", lambda device: True)
    weight = make_weight(Layout(FP8_BLOCK), (130, 257), seed=3, scale_dtype=torch.float32)
    x = torch.randn(rows, 257, generator=torch.Generator().manual_seed(4)).to(torch.bfloat16).to(DEVICE)
    check_product(tq.quantized_linear_triton(x, weight), x, weight, None)


@pytest.mark.parametrize("layout", LAYOUTS, ids=str)
def test_a_rows_bits_do_not_depend_on_the_other_decode_rows(tq, layout) -> None:
    """Up to 16 rows share one tile shape, so decode and draft verification give the same bits."""
    weight = make_weight(layout, (130, 257), seed=5, scale_dtype=torch.bfloat16)
    x = torch.randn(16, 257, generator=torch.Generator().manual_seed(6)).to(torch.bfloat16).to(DEVICE)
    together = tq.quantized_linear_triton(x, weight)
    for row in (0, 7, 15):
        assert torch.equal(tq.quantized_linear_triton(x[row : row + 1], weight), together[row : row + 1])


@pytest.mark.parametrize("layout", LAYOUTS, ids=str)
def test_cpu_tensors_do_not_dispatch_to_triton(tq, layout) -> None:
    weight = make_weight(layout, (7, 200), seed=7, scale_dtype=torch.float32)
    weight = QuantizedWeight(weight.format, weight.data.cpu(), weight.scale.cpu(), weight.shape, weight.group_size)
    x = torch.randn(3, 200)
    assert tq.unsupported(x, weight) is None  # the layout is fine: only the device rules it out
    assert not tq.supports_triton(x, weight)


def test_unsupported_layouts_are_named(tq) -> None:
    dense = torch.randn(3, 7, 96)
    x = torch.randn(2, 96)
    assert "multiple of 32" in tq.unsupported(x, quantize_int4(dense[0], 48))
    assert "2-D" in tq.unsupported(x, quantize_int8(dense))
    assert "does not fit" in tq.unsupported(torch.randn(2, 95), quantize_int8(dense[0]))
    assert "dtype" in tq.unsupported(x.double(), quantize_int8(dense[0]))
    with pytest.raises(ValueError, match="multiple of 32"):
        tq.quantized_linear_triton(x, quantize_int4(dense[0], 48))


@requires_cuda
@pytest.mark.parametrize("layout", LAYOUTS, ids=str)
def test_cuda_tensors_dispatch_to_triton(tq, layout) -> None:
    weight = make_weight(layout, (130, 257), seed=8, scale_dtype=torch.bfloat16)
    weight = QuantizedWeight(weight.format, weight.data.cuda(), weight.scale.cuda(), weight.shape, weight.group_size)
    x = torch.randn(5, 257, device="cuda", dtype=torch.bfloat16)
    assert tq.supports_triton(x, weight)
    assert not tq.supports_triton(x.cpu(), weight)
    assert not tq.supports_triton(x, quantize_int4(torch.randn(7, 96, device="cuda"), 48))
