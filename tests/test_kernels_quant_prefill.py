"""Quantized prefill on the CPU: the native dequantizer against the reference dequantize(), bit for
bit in each build, and the prefill paths built on it (linear layers and routed experts) against the
same products on the reference's tiles."""

from __future__ import annotations

import pytest
import torch

from kernels.moe import moe_experts
from kernels.moe import native as moe_native
from kernels.native import matmul_has_amx
from kernels.quant import (
    FP8_BLOCK,
    INT4,
    INT8,
    QuantizedRows,
    QuantizedWeight,
    dequant_native,
    dequantize,
    fp8_block,
    prefill,
    quantize_int4,
    quantize_int8,
)

SHAPES = [(1, 1), (7, 129), (130, 257), (300, 200), (256, 384), (17, 33)]
SHAPE_IDS = [f"{n}x{k}" for n, k in SHAPES]

pytestmark = pytest.mark.skipif(not dequant_native.available(), reason="no native dequantizer build runs here")


def bits(t: torch.Tensor) -> torch.Tensor:
    """Integer view of a tensor's bits, so NaNs compare too."""
    return t.view(torch.int16 if t.element_size() == 2 else torch.int32)


def random_weight(format_name: str, shape, seed: int = 0, group: int = 128, scale_dtype=torch.float32):
    """A quantized weight of ``shape`` (a leading expert dimension allowed) with random values and scales."""
    generator = torch.Generator().manual_seed(seed)
    dense = torch.randn(*shape, generator=generator) * 0.05
    if format_name == INT8:
        weight = quantize_int8(dense)
    elif format_name == INT4:
        weight = quantize_int4(dense, group)
    else:
        data = (torch.randn(*shape, generator=generator) * 100).clamp(-448, 448).to(torch.float8_e4m3fn)
        blocks = (*shape[:-2], -(-shape[-2] // 128), -(-shape[-1] // 128))
        weight = fp8_block(data, torch.rand(*blocks, generator=generator) * 1e-3 + 1e-4)
    if scale_dtype != weight.scale.dtype:
        weight = QuantizedWeight(weight.format, weight.data, weight.scale.to(scale_dtype), weight.shape,
                                 weight.group_size)
    return weight


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize(("rows", "columns"), SHAPES, ids=SHAPE_IDS)
@pytest.mark.parametrize("format_name", [FP8_BLOCK, INT8, INT4])
def test_native_tiles_are_the_reference_dequantization_bit_for_bit(native_isa, format_name, rows, columns, dtype):
    assert dequant_native.DEQUANTIZE.isa() == native_isa  # the build under test, not a fallback
    weight = random_weight(format_name, (rows, columns), seed=rows * columns)
    assert torch.equal(bits(dequant_native.dequantize(weight, dtype=dtype)), bits(dequantize(weight).to(dtype)))
    # Row slices that start and end inside an FP8 block.
    for start, stop in [(rows // 3, rows), (rows // 2, max(rows // 2, rows - 5)), (129, rows)]:
        if start <= stop <= rows:
            expected = dequantize(weight, slice(start, stop)).to(dtype)
            assert torch.equal(bits(dequant_native.dequantize(weight, slice(start, stop), dtype)), bits(expected))


@pytest.mark.parametrize("scale_dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("group", [32, 50, 33, 128, 256], ids=lambda g: f"group{g}")
@pytest.mark.parametrize("columns", [1, 15, 64, 257, 300], ids=lambda c: f"k{c}")
def test_int4_groups_and_scale_dtypes(native_isa, group, columns, scale_dtype):
    """Groups that are no multiple of a vector (or odd, so a group starts inside a byte), odd
    widths, scales in each stored dtype."""
    weight = random_weight(INT4, (9, columns), seed=group + columns, group=group, scale_dtype=scale_dtype)
    expected = dequantize(weight).to(torch.bfloat16)
    assert torch.equal(bits(dequant_native.dequantize(weight)), bits(expected))


@pytest.mark.parametrize("scale_dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_int8_scale_dtypes(native_isa, scale_dtype):
    weight = random_weight(INT8, (33, 270), seed=4, scale_dtype=scale_dtype)
    assert torch.equal(bits(dequant_native.dequantize(weight)), bits(dequantize(weight).to(torch.bfloat16)))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_every_fp8_byte_with_special_scales(native_isa, dtype):
    """All 256 e4m3 bytes (zeros of both signs, subnormals, the largest values, NaN 0x7F / 0xFF) in
    every column position of a row, under ordinary, zero, infinite, NaN, tiny and bf16-overflowing
    block scales."""
    data = ((torch.arange(259) + 17 * torch.arange(300)[:, None]) % 256).to(torch.uint8)
    scale = torch.tensor([[1e-3, 0.0, float("inf")], [float("nan"), 1e-38, 3e36], [-2.0, 1.0, 7.5]])
    weight = fp8_block(data.view(torch.float8_e4m3fn), scale)
    expected = dequantize(weight).to(dtype)
    assert expected.isnan().any() and expected.isinf().any()  # the specials are exercised
    assert torch.equal(bits(dequant_native.dequantize(weight, dtype=dtype)), bits(expected))


# Row or group scales around the edges of the fast paths: zero of both signs, infinite, NaN, denormal,
# the smallest normal whose every nonzero product is normal (and one just below it for fp8's
# subnormals, 2^-9 and up), negative, and large enough that products overflow bf16.
SPECIAL_SCALES = [1e-3, 0.0, -0.0, float("inf"), float("nan"), 1e-39, 2.0**-126, 2.0**-117, 2.0**-118, -2.0, 3e36]


@pytest.mark.parametrize("format_name", [INT8, INT4])
def test_int_formats_with_special_scales(native_isa, format_name):
    """Every int8 byte, or every int4 nibble, in a row (twice, at odd and even columns) under each
    special scale, one scale per row (int8) or per group of 32 (int4)."""
    rows, columns = len(SPECIAL_SCALES), 2 * 256 + 35
    if format_name == INT8:
        data = ((torch.arange(columns) + 7 * torch.arange(rows)[:, None]) % 256).to(torch.uint8).view(torch.int8)
        scale = torch.tensor(SPECIAL_SCALES)[:, None]
        weight = QuantizedWeight(INT8, data, scale, (rows, columns))
    else:
        nibbles = (torch.arange(columns + 1) + 5 * torch.arange(rows)[:, None]) % 16
        data = (nibbles[:, 0::2] | nibbles[:, 1::2] << 4).to(torch.uint8)
        groups = -(-columns // 32)
        scale = torch.tensor(SPECIAL_SCALES)[(torch.arange(groups) + torch.arange(rows)[:, None]) % rows]
        weight = QuantizedWeight(INT4, data, scale, (rows, columns), 32)
    expected = dequantize(weight).to(torch.bfloat16)
    assert expected.isnan().any() and expected.isinf().any() and (bits(expected) == bits(torch.tensor(-0.0))).any()
    assert torch.equal(bits(dequant_native.dequantize(weight)), bits(expected))


def test_fp8_with_scales_at_the_edge_of_normal_products(native_isa):
    """fp8's subnormals (2^-9 and up) under scales whose products are just normal, or just not; and
    scales at the top of the range the AVX2 build's table serves (2^100), and one whose largest products
    overflow (1.5 * 2^119)."""
    data = ((torch.arange(300) + 11 * torch.arange(512)[:, None]) % 256).to(torch.uint8)
    scale = torch.tensor([[2.0**-117, 2.0**-118, -(2.0**-117)], [2.0**-126, -0.0, 1e-39], [0.0, 2.0, 3e36],
                          [2.0**100, -(2.0**100), 1.5 * 2.0**119]])
    weight = fp8_block(data.view(torch.float8_e4m3fn), scale)
    expected = dequantize(weight).to(torch.bfloat16)
    assert torch.equal(bits(dequant_native.dequantize(weight)), bits(expected))


@pytest.mark.parametrize("format_name", [FP8_BLOCK, INT8, INT4])
def test_stacked_experts_fill_only_the_listed_slots(native_isa, format_name):
    weight = random_weight(format_name, (6, 140, 96), seed=2)
    ids = torch.tensor([1, 4, 5])
    buffer = torch.full((3, 200, 96), 7.0, dtype=torch.bfloat16)
    out = dequant_native.dequantize_into(weight, buffer[:, 20:160], experts=ids)  # strided rows and experts
    for slot, expert in enumerate(ids.tolist()):
        assert torch.equal(bits(out[slot]), bits(dequantize(weight[expert]).to(torch.bfloat16)))
    assert (buffer[:, :20] == 7).all() and (buffer[:, 160:] == 7).all()


def test_bad_arguments_are_refused():
    weight = random_weight(INT8, (4, 3, 32))
    with pytest.raises(ValueError, match="expert ids"):
        dequant_native.dequantize_into(weight, torch.empty(1, 3, 32, dtype=torch.bfloat16), experts=torch.tensor([4]))
    with pytest.raises(ValueError, match="out must be"):
        dequant_native.dequantize_into(weight[0], torch.empty(3, 31, dtype=torch.bfloat16))


def reference_tiles(monkeypatch):
    """Makes the prefill path dequantize through the reference (as where no native build runs)."""
    monkeypatch.setattr(dequant_native, "available", lambda: False)


@pytest.mark.parametrize("format_name", [FP8_BLOCK, INT8, INT4])
@pytest.mark.parametrize(("tokens", "rows", "columns"), [(17, 300, 200), (40, 33, 257), (20, 2049, 2048)],
                         ids=["17x300x200", "40x33x257", "20x2049x2048-two-tiles"])
def test_prefill_linear_is_unchanged_by_the_native_tiles(native_isa, monkeypatch, format_name, tokens, rows, columns):
    weight = random_weight(format_name, (rows, columns), seed=tokens)
    generator = torch.Generator().manual_seed(tokens)
    x = torch.randn(2, tokens, columns, generator=generator).to(torch.bfloat16)
    bias = torch.randn(rows, generator=generator).to(torch.bfloat16)
    native = prefill.quantized_linear_bf16(x, weight, bias)
    with monkeypatch.context() as patch:
        reference_tiles(patch)
        expected = prefill.quantized_linear_bf16(x, weight, bias)
    assert native.shape == (2, tokens, rows) and torch.equal(bits(native), bits(expected))


@pytest.mark.parametrize("format_name", [FP8_BLOCK, INT8, INT4])
def test_prefill_linear_is_the_dense_bf16_layer_on_the_exact_weights(native_isa, format_name):
    """The same bits as kernels.linear on the exact weights rounded to bf16, in each build (where
    bf16 products are not native both multiply fp32 tiles of WIDEN_ROWS rows: two tiles here)."""
    from kernels.linear import WIDEN_ROWS, linear

    weight = random_weight(format_name, (WIDEN_ROWS + 37, 200), seed=5)
    x = torch.randn(2, 30, 200, generator=torch.Generator().manual_seed(5)).to(torch.bfloat16)
    out = prefill.quantized_linear_bf16(x, weight)
    assert out.shape == (2, 30, WIDEN_ROWS + 37)
    assert torch.equal(bits(out), bits(linear(x, dense_stack(weight))))


def routed_case(format_name: str, tokens: int, experts: int = 8, top_k: int = 3, hidden: int = 64, width: int = 32):
    generator = torch.Generator().manual_seed(tokens)
    gate = random_weight(format_name, (experts, width, hidden), seed=1)
    up = random_weight(format_name, (experts, width, hidden), seed=2)
    down = random_weight(format_name, (experts, hidden, width), seed=3)
    x = torch.randn(tokens, hidden, generator=generator).to(torch.bfloat16)
    # Expert 2 gets no token: it must not be needed.
    logits = torch.randn(tokens, experts, generator=generator)
    logits[:, 2] = -torch.inf
    weights, ids = logits.softmax(-1).topk(top_k, dim=-1)
    return x, weights.to(torch.bfloat16), ids, QuantizedRows((gate, up)), down


def dense_stack(weight) -> torch.Tensor:
    parts = weight.parts if isinstance(weight, QuantizedRows) else (weight,)
    return torch.cat([dequantize(part) for part in parts], dim=-2).to(torch.bfloat16)


@pytest.mark.parametrize("format_name", [FP8_BLOCK, INT8, INT4])
def test_quantized_experts_are_the_bf16_experts_on_the_exact_weights(native_isa, format_name):
    x, weights, ids, gate_up, down = routed_case(format_name, tokens=50)
    assert prefill.supports_experts(x, gate_up, down) and not prefill.supports_experts(x[:16], gate_up, down)
    out = prefill.quantized_experts(x, weights, ids, gate_up, down, moe_experts)
    expected = moe_experts(x, weights, ids, dense_stack(gate_up), dense_stack(down))
    assert torch.equal(bits(out), bits(expected))


TILES_OR_PAIRS = [pytest.param(False, id="pairs"),
                  pytest.param(True, id="amx", marks=pytest.mark.skipif(not matmul_has_amx(), reason="no AMX tiles"))]


@pytest.mark.parametrize("amx", TILES_OR_PAIRS)
@pytest.mark.parametrize("fused", [False, True], ids=["gate-and-up", "fused-gate-up"])
@pytest.mark.parametrize(("hidden", "width"), [(64, 32), (96, 48), (256, 128)], ids=["64x32", "96x48", "256x128"])
@pytest.mark.parametrize("format_name", [FP8_BLOCK, INT8, INT4])
def test_kernel_dequantizing_as_it_goes_gives_the_bf16_experts_bits(native_isa, format_name, hidden, width, fused,
                                                                      amx):
    """The experts kernel over quantized weights (each 16 or 32 rows dequantized as it reaches
    them) against the bf16 kernel on the exact weights rounded to bf16: tile and pair paths (the
    tile path needs widths of 32: 96x48 takes pairs either way), gate and up held apart or as one
    weight, experts with one to several blocks of 32 tokens."""
    if amx and native_isa != "avx512":
        pytest.skip("only the AVX-512 build has a tile path")
    x, weights, ids, gate_up, down = routed_case(format_name, tokens=150, hidden=hidden, width=width)
    if fused:
        gate_up = random_weight(format_name, (8, 2 * width, hidden), seed=6)
    if fused and format_name == FP8_BLOCK and width % 128:
        # Gate and up would split inside a 128-row scale block: the kernel declines such a weight.
        assert not moe_native.supports_quantized_experts(x, weights, gate_up, down)
        return
    assert moe_native.supports_quantized_experts(x, weights, gate_up, down)
    out = moe_native.moe_experts_quantized(x, weights, ids, gate_up, down, amx=amx)
    expected = moe_native.moe_experts(x, weights, ids, dense_stack(gate_up), dense_stack(down), amx=amx)
    assert torch.equal(bits(out), bits(expected))


@pytest.mark.parametrize("format_name", [FP8_BLOCK, INT8, INT4])
def test_kernel_dequantizing_experts_with_more_tokens_than_a_chunk(native_isa, format_name):
    """Experts chosen by ~170 tokens each, more than the AVX2 build takes at a time (96): every
    chunk of an expert's tokens reads the same dequantized weights."""
    x, weights, ids, gate_up, down = routed_case(format_name, tokens=400, hidden=96, width=48)
    assert torch.bincount(ids.flatten()).max() > 96
    out = moe_native.moe_experts_quantized(x, weights, ids, gate_up, down, amx=False)
    expected = moe_native.moe_experts(x, weights, ids, dense_stack(gate_up), dense_stack(down), amx=False)
    assert torch.equal(bits(out), bits(expected))


def test_kernel_declines_experts_it_cannot_read(native_isa):
    """Gate and up of unequal heights (the kernel reads I rows of each), a batch dimension on x."""
    x, weights, ids, gate_up, down = routed_case(INT8, tokens=40)
    assert moe_native.supports_quantized_experts(x, weights, gate_up, down)
    uneven = QuantizedRows((random_weight(INT8, (8, 48, 64), seed=7), random_weight(INT8, (8, 16, 64), seed=8)))
    assert uneven.shape == gate_up.shape and not moe_native.supports_quantized_experts(x, weights, uneven, down)
    assert not moe_native.supports_quantized_experts(x[None], weights, gate_up, down)


@pytest.mark.parametrize("scale_dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("group", [32, 48], ids=lambda g: f"group{g}")
def test_kernel_dequantizing_int4_groups_and_scale_dtypes(native_isa, group, scale_dtype):
    x, weights, ids, _, _ = routed_case(INT4, tokens=60)
    gate_up, down = (random_weight(INT4, shape, seed=seed, group=group, scale_dtype=scale_dtype)
                     for shape, seed in (((8, 64, 64), 4), ((8, 64, 32), 5)))
    out = moe_native.moe_experts_quantized(x, weights, ids, gate_up, down)
    expected = moe_native.moe_experts(x, weights, ids, dense_stack(gate_up), dense_stack(down))
    assert torch.equal(bits(out), bits(expected))


@pytest.mark.parametrize("format_name", [FP8_BLOCK, INT4])
def test_experts_in_groups_give_the_bits_of_one_call(native_isa, monkeypatch, format_name):
    """Five routed experts, more than one call takes: groups of two (0-1, 3-4, 5), each
    token-expert pair its own row, the sums in ascending expert order as one call takes them."""
    x, weights, ids, gate_up, down = routed_case(format_name, tokens=120, experts=6, top_k=2)
    assert torch.unique(ids).tolist() == [0, 1, 3, 4, 5]
    one_call = prefill.quantized_experts(x, weights, ids, gate_up, down, moe_experts)
    per_expert = 2 * (gate_up.shape[1] * gate_up.shape[2] + down.shape[1] * down.shape[2])
    monkeypatch.setattr(prefill, "EXPERT_BUFFER_BYTES", 4 * per_expert)
    monkeypatch.setattr(prefill, "EXPERT_GROUP_BYTES", 2 * per_expert)
    grouped = prefill.quantized_experts(x, weights, ids, gate_up, down, moe_experts)
    assert torch.equal(bits(grouped), bits(one_call))


def exact_bf16_copy(lm) -> None:
    """Replaces every quantized weight of ``lm`` by its exact dequantization rounded to bf16."""
    for module in lm.module.modules():
        for name, value in list(vars(module).items()):
            if isinstance(value, QuantizedRows | QuantizedWeight):
                setattr(module, name, dense_stack(value))


@pytest.mark.parametrize("weights", [FP8_BLOCK, INT8, INT4])
def test_quantized_prefill_is_the_bf16_model_on_the_rounded_exact_weights(native_isa, demo_checkpoint, tmp_path,
                                                                         weights):
    """A 40-token chunk (linear layers and routed experts on the prefill path) gives the bf16
    model's logits bit for bit when that model holds the same weights as bf16 tensors: in bf16
    products where they are native, in fp32 products of widened tiles where they are not."""
    from bench.fp8_checkpoint import write_fp8_checkpoint
    from model import load_model

    def load():
        if weights == FP8_BLOCK:
            folder = tmp_path / "fp8"
            if not folder.exists():
                write_fp8_checkpoint(demo_checkpoint, folder)
            return load_model(folder, dtype=torch.bfloat16)
        return load_model(demo_checkpoint, dtype=torch.bfloat16, weights=weights)

    quantized, dense = load(), load()
    assert weights in quantized.weight_formats
    exact_bf16_copy(dense)
    assert weights not in dense.weight_formats
    ids = torch.randint(0, quantized.config.vocab_size, (1, 40), generator=torch.Generator().manual_seed(0))
    ours = quantized.forward(ids, quantized.new_state())
    assert torch.equal(bits(ours), bits(dense.forward(ids, dense.new_state())))
