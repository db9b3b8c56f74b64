"""Quantized weight formats: exact dequantization, the compressed-tensors byte layout, rounding
bounds of the quantizers, and the linear layer against dequantize-then-fp32-matmul."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kernels.linear import linear
from kernels.quant import (
    FP8_BLOCK,
    QuantizedWeight,
    dequantize,
    fp8_block,
    pack_int4,
    quantize_int4,
    quantize_int8,
    quantized_linear,
    unpack_int4,
)

SHAPES = [(1, 1), (7, 129), (130, 257), (300, 200), (256, 384)]
SHAPE_IDS = [f"{n}x{k}" for n, k in SHAPES]


def random_weight(shape, seed=0, lead=()):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(*lead, *shape, generator=generator) * 0.05


def random_fp8(shape, seed=0):
    """FP8 values and block scales as an official checkpoint holds them."""
    generator = torch.Generator().manual_seed(seed)
    data = (torch.randn(*shape, generator=generator) * 100).clamp(-448, 448).to(torch.float8_e4m3fn)
    blocks = (-(-shape[0] // 128), -(-shape[1] // 128))
    scale = torch.rand(*blocks, generator=generator) * 1e-3 + 1e-4
    return data, scale


@pytest.mark.parametrize(("rows", "columns"), SHAPES, ids=SHAPE_IDS)
def test_fp8_dequantization_is_value_times_its_block_scale(rows, columns):
    data, scale = random_fp8((rows, columns))
    expected = torch.empty(rows, columns)
    values = data.to(torch.float32)
    for i in range(rows):
        for j0 in range(0, columns, 128):
            expected[i, j0 : j0 + 128] = values[i, j0 : j0 + 128] * scale[i // 128, j0 // 128]
    weight = fp8_block(data, scale)
    assert torch.equal(dequantize(weight), expected)
    assert torch.equal(dequantize(weight, slice(3, rows)), expected[3:]) if rows > 3 else True


@pytest.mark.parametrize("columns", [1, 2, 7, 8, 129], ids=lambda c: f"k{c}")
def test_int4_packing_round_trips_and_matches_the_compressed_tensors_words(columns):
    generator = torch.Generator().manual_seed(columns)
    values = torch.randint(-8, 8, (5, columns), generator=generator, dtype=torch.int8)
    packed = pack_int4(values)
    assert torch.equal(unpack_int4(packed, columns), values)
    # compressed-tensors: column 8j+i sits in nibble i of int32 word j, stored as value + 8.
    words = np.zeros((5, -(-columns // 8)), dtype=np.uint32)
    for column in range(columns):
        stored = (values[:, column].numpy().astype(np.int32) + 8).astype(np.uint32)
        words[:, column // 8] |= stored << (4 * (column % 8))
    padded = torch.nn.functional.pad(packed, (0, words.shape[1] * 4 - packed.shape[1]))
    assert np.array_equal(padded.contiguous().view(torch.int32).numpy(), words.view(np.int32))


@pytest.mark.parametrize(("rows", "columns"), SHAPES, ids=SHAPE_IDS)
def test_int8_rounding_is_within_half_a_step(rows, columns):
    weight = random_weight((rows, columns))
    quantized = quantize_int8(weight)
    error = (dequantize(quantized) - weight).abs()
    assert bool((error <= quantized.scale.float() / 2 + 1e-8).all())


@pytest.mark.parametrize(("rows", "columns"), SHAPES, ids=SHAPE_IDS)
@pytest.mark.parametrize("group", [32, 128], ids=lambda g: f"group{g}")
def test_int4_rounding_is_within_half_a_step_of_its_group(rows, columns, group):
    weight = random_weight((rows, columns), seed=1)
    quantized = quantize_int4(weight, group)
    step = quantized.scale.float().repeat_interleave(group, dim=-1)[:, :columns]
    assert bool(((dequantize(quantized) - weight).abs() <= step / 2 + 1e-8).all())


def quantized(format_name, shape, seed=0):
    if format_name == FP8_BLOCK:
        return fp8_block(*random_fp8(shape, seed))
    weight = random_weight(shape, seed)
    return quantize_int8(weight) if format_name == "int8" else quantize_int4(weight)


@pytest.mark.parametrize("format_name", ["fp8_block", "int8", "int4"])
@pytest.mark.parametrize(
    ("tokens", "dtype"),
    [(1, torch.bfloat16), (5, torch.bfloat16), (16, torch.bfloat16), (17, torch.float32), (40, torch.float32)],
    ids=["1rows-bf16", "5rows-bf16", "16rows-bf16", "17rows-fp32", "40rows-fp32"],
)
def test_linear_equals_dequantize_then_fp32_product(format_name, tokens, dtype):
    """Decode-sized calls in bf16 and every fp32 call compute in fp32 on the exact weights (bf16
    prefill chunks are the bf16 product, tested below)."""
    weight = quantized(format_name, (300, 200))
    generator = torch.Generator().manual_seed(tokens)
    x = torch.randn(tokens, 200, generator=generator).to(dtype)
    bias = torch.randn(300, generator=generator)
    expected = (x.float() @ dequantize(weight).T + bias).to(dtype)
    out = linear(x, weight, bias)
    assert out.dtype == dtype and out.shape == (tokens, 300)
    torch.testing.assert_close(out, expected, rtol=1e-2, atol=1e-3)  # one bf16 rounding apart at most


@pytest.mark.parametrize("format_name", ["fp8_block", "int8", "int4"])
def test_a_rows_bits_do_not_depend_on_the_other_rows(format_name):
    weight = quantized(format_name, (130, 257))
    x = torch.randn(16, 257, generator=torch.Generator().manual_seed(3))
    together = quantized_linear(x, weight)
    for row in range(16):
        assert torch.equal(quantized_linear(x[row : row + 1], weight), together[row : row + 1])


def test_stacked_weights_index_by_expert():
    weight = quantize_int4(random_weight((40, 130), lead=(3,)))
    assert weight.shape == (3, 40, 130)
    for expert in range(3):
        assert torch.equal(dequantize(weight[expert]), dequantize(weight)[expert])


def test_scales_of_the_wrong_shape_are_refused():
    data, scale = random_fp8((300, 200))
    with pytest.raises(ValueError, match="scale of shape"):
        QuantizedWeight(FP8_BLOCK, data, scale[:2, :1], (300, 200))


@pytest.mark.parametrize("format_name", ["fp8_block", "int8", "int4"])
@pytest.mark.parametrize("tokens", [17, 64], ids=lambda t: f"{t}rows")
def test_bf16_prefill_path_is_the_bf16_product_of_the_exact_weights(format_name, tokens):
    from kernels.quant import prefill

    weight = quantized(format_name, (300, 200))
    generator = torch.Generator().manual_seed(tokens)
    x = torch.randn(tokens, 200, generator=generator).to(torch.bfloat16)
    assert prefill.supports(x, weight) and not prefill.supports(x[:16], weight)
    out = quantized_linear(x, weight)
    expected = x.float() @ dequantize(weight).to(torch.bfloat16).float().T
    # bf16 GEMM accumulates in fp32 and rounds once: within a bf16 step of the fp32 product.
    torch.testing.assert_close(out.float(), expected, rtol=8e-3, atol=1e-3)
