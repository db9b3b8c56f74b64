"""Native small-row kernels over quantized weights (kernels/quant/small_m_quant.c).

Each build (AVX-512, AVX2 + FMA) is compiled on every machine with a C compiler, and run and checked
wherever the CPU runs it, against x times the dequantized weight in float64.

Tolerance: the kernel sums in fp32, in lanes of 8 or 16 and then a tree, with at most two
roundings per product (a weight or x times its scale, then the product), so a result is within
about (K / 8 + 8) * 2^-24 * sum_k |x_k w_k| of the exact sum: under 2.5e-6 of that sum for the K
here. The tests allow 1e-5 of it (plus 1e-30 for sums that are exactly zero). int4 by pair products
(bf16 x) adds exact products two at a time into 16 lanes and a group's sum times its scale into
the row's total: fewer roundings per weight, the same bound.
"""

from __future__ import annotations

import pytest
import torch

from kernels import native as native_build
from kernels.linear import linear
from kernels.quant import (
    FP8_BLOCK,
    INT4,
    INT8,
    QuantizedWeight,
    dequantize,
    fp8_block,
    native,
    pack_int4,
    quantize_int4,
    quantize_int8,
    quantized_linear,
    quantized_linear_reference,
    uses_native,
)

RELATIVE_TOLERANCE = 1e-5
FORMATS = [FP8_BLOCK, INT8, INT4]
ROWS = [1, 3, 16]
SHAPES = [(n, k) for n in (1, 7, 300) for k in (1, 129, 200, 257)]
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


@pytest.fixture
def isa(native_isa):
    """Each build this CPU runs (passed explicitly too, so a test names the build it checks)."""
    if native.kernel(native_isa) is None:
        pytest.skip(f"the {native_isa} build cannot run here: it needs a C compiler (and DOCANALYST_NATIVE unset)")
    return native_isa


def weight_of(format_name: str, shape: tuple[int, int], scale_dtype: torch.dtype = torch.float32, seed: int = 0,
              group: int = 128) -> QuantizedWeight:
    """A random weight `[N, K]` in `format_name`, its scales stored in `scale_dtype`."""
    generator = torch.Generator().manual_seed(seed)
    if format_name == FP8_BLOCK:
        # Spread over e4m3's whole range, subnormals (below 2^-6) included.
        magnitude = torch.exp2(torch.rand(shape, generator=generator) * 18 - 9)
        sign = torch.where(torch.rand(shape, generator=generator) < 0.5, -1.0, 1.0)
        data = (sign * magnitude).clamp(-448, 448).to(torch.float8_e4m3fn)
        blocks = (-(-shape[0] // 128), -(-shape[1] // 128))
        scale = torch.rand(blocks, generator=generator) * 1e-3 + 1e-4
        return fp8_block(data, scale.to(scale_dtype))
    dense = torch.randn(shape, generator=generator) * 0.05
    quantized = quantize_int8(dense) if format_name == INT8 else quantize_int4(dense, group)
    return QuantizedWeight(quantized.format, quantized.data, quantized.scale.to(scale_dtype), quantized.shape,
                           quantized.group_size)


def half_conversion_keeps_denormals() -> bool:
    """Whether converting a denormal fp16 to fp32 keeps it with denormals-are-zero set. x86's F16C
    conversion (VCVTPH2PS, which PyTorch's conversion uses here too) ignores that setting by definition,
    and the fp8 products rely on it; QEMU's emulated CPUs (7.2) flush the input instead."""
    flushing = float((torch.tensor([1e-39]) * 2).item()) == 0.0
    torch.set_flush_denormal(True)
    try:
        return bool((torch.full((64,), 2.0**-24, dtype=torch.float16).float() != 0).all())
    finally:
        torch.set_flush_denormal(flushing)


EMULATOR_FLUSHES_HALF_DENORMALS = not half_conversion_keeps_denormals()


def random_x(rows: int, columns: int, dtype: torch.dtype, seed: int = 1) -> torch.Tensor:
    return torch.randn(rows, columns, generator=torch.Generator().manual_seed(seed)).to(dtype)


def run(x: torch.Tensor, weight: QuantizedWeight, isa: str, threads: int = 1, int4_pairs: bool = False) -> torch.Tensor:
    """The kernel's fp32 output, written over NaNs so that an element it skips fails the checks
    (int4 by the table unless `int4_pairs`, whatever this CPU prefers)."""
    if weight.format == FP8_BLOCK and EMULATOR_FLUSHES_HALF_DENORMALS:
        pytest.skip("this CPU flushes denormal halves in the F16C conversion, which hardware never does")
    out = torch.full((x.shape[0], weight.shape[0]), float("nan"))
    result = native.quantized_linear_small_m(x, weight, out=out, isa=isa, threads=threads, int4_pairs=int4_pairs)
    assert result.data_ptr() == out.data_ptr()
    return out


def assert_close_to_exact(out: torch.Tensor, x: torch.Tensor, weight: QuantizedWeight) -> None:
    w = dequantize(weight).double()
    exact = x.double() @ w.T
    magnitude = x.double().abs() @ w.abs().T
    assert not out.isnan().any(), "an output was not written"
    error = (out.double() - exact).abs()
    worst = (error / (magnitude + 1e-300)).max().item()
    assert bool((error <= RELATIVE_TOLERANCE * magnitude + 1e-30).all()), f"relative error {worst:.2e}"


@pytest.mark.parametrize("scale_dtype", ["fp32", "bf16"], ids=lambda d: f"scale_{d}")
@pytest.mark.parametrize("x_dtype", ["fp32", "bf16"], ids=lambda d: f"x_{d}")
@pytest.mark.parametrize(("n", "k"), SHAPES, ids=[f"{n}x{k}" for n, k in SHAPES])
@pytest.mark.parametrize("rows", ROWS, ids=lambda r: f"{r}rows")
@pytest.mark.parametrize("format_name", FORMATS)
def test_matches_the_dequantized_product(isa, format_name, rows, n, k, x_dtype, scale_dtype):
    weight = weight_of(format_name, (n, k), DTYPES[scale_dtype])
    x = random_x(rows, k, DTYPES[x_dtype])
    assert_close_to_exact(run(x, weight, isa), x, weight)


@pytest.mark.parametrize("bias_dtype", ["none", "fp32", "bf16"], ids=lambda d: f"bias_{d}")
@pytest.mark.parametrize("out_dtype", ["fp32", "bf16"], ids=lambda d: f"out_{d}")
@pytest.mark.parametrize("format_name", FORMATS)
def test_bias_and_output_dtype_round_once_as_the_reference_does(isa, format_name, out_dtype, bias_dtype):
    """The fp32 sum plus the bias, rounded once to the output's dtype, bit for bit."""
    weight = weight_of(format_name, (300, 200))
    x = random_x(3, 200, torch.bfloat16)
    bias = None if bias_dtype == "none" else torch.randn(300).to(DTYPES[bias_dtype])
    out = torch.full((3, 300), float("nan"), dtype=DTYPES[out_dtype])
    native.quantized_linear_small_m(x, weight, bias, out=out, isa=isa, threads=1, int4_pairs=False)
    expected = run(x, weight, isa) + (0 if bias is None else bias.float())
    assert torch.equal(out, expected.to(DTYPES[out_dtype]))


@pytest.mark.parametrize("group", [32, 64, 256], ids=lambda g: f"group{g}")
@pytest.mark.parametrize(("n", "k"), [(7, 129), (300, 257)], ids=["7x129", "300x257"])
def test_int4_groups_other_than_128(isa, n, k, group):
    weight = weight_of(INT4, (n, k), group=group)
    for rows in ROWS:
        x = random_x(rows, k, torch.bfloat16)
        assert_close_to_exact(run(x, weight, isa), x, weight)


@pytest.mark.parametrize("group", [64, 128, 256], ids=lambda g: f"group{g}")
@pytest.mark.parametrize("x_dtype", ["fp32", "bf16"], ids=lambda d: f"x_{d}")
@pytest.mark.parametrize(("n", "k"), SHAPES, ids=[f"{n}x{k}" for n, k in SHAPES])
@pytest.mark.parametrize("rows", ROWS, ids=lambda r: f"{r}rows")
def test_int4_by_pair_products_matches_the_dequantized_product(isa, rows, n, k, x_dtype, group):
    weight = weight_of(INT4, (n, k), torch.bfloat16, group=group)
    x = random_x(rows, k, DTYPES[x_dtype])
    assert_close_to_exact(run(x, weight, isa, int4_pairs=True), x, weight)


def test_pair_products_take_bf16_x_and_groups_of_whole_steps(isa):
    """Pair products (the AVX-512 build) give other bits than the table where they apply: bf16 x
    and groups of a multiple of 64 columns; fp32 x, groups of 32 or 96, and the AVX2 build keep the
    table's bits."""
    x = random_x(3, 257, torch.bfloat16)
    applies = isa == "avx512"
    for group in (64, 128):
        weight = weight_of(INT4, (300, 257), group=group)
        assert torch.equal(run(x, weight, isa, int4_pairs=True), run(x, weight, isa)) is not applies
        assert torch.equal(run(x.float(), weight, isa, int4_pairs=True), run(x.float(), weight, isa))
    for group in (32, 96):
        weight = weight_of(INT4, (300, 257), group=group)
        assert torch.equal(run(x, weight, isa, int4_pairs=True), run(x, weight, isa))


def test_x_rows_with_a_stride(isa):
    """x may be a view whose rows are further apart than K (a slice of a wider activation)."""
    weight = weight_of(FP8_BLOCK, (40, 200))
    wide = random_x(5, 300, torch.bfloat16)
    x = wide[:, 50:250]
    assert x.stride() == (300, 1)
    assert torch.equal(run(x, weight, isa), run(x.contiguous(), weight, isa))


@pytest.mark.parametrize("flush_denormals", [False, True], ids=["denormals", "flush_denormals"])
def test_every_finite_fp8_value_converts_exactly(isa, flush_denormals):
    """All 254 finite e4m3 codes, subnormals included, even with denormals-are-zero set: a one-hot x
    and a scale of 1 read each weight back exactly."""
    codes = torch.arange(256, dtype=torch.int32)
    codes = codes[(codes & 0x7F) != 0x7F].to(torch.uint8)
    columns = codes.numel()
    data = codes.view(torch.float8_e4m3fn).reshape(1, columns).repeat(3, 1)
    weight = fp8_block(data, torch.ones(1, -(-columns // 128)))
    # This thread's setting, as other tests left it: a denormal product survives unless flushed.
    previous = float((torch.tensor([1e-39]) * 2).item()) == 0.0
    torch.set_flush_denormal(flush_denormals)
    try:
        # threads=1 runs on this thread, whose setting was just made.
        out = torch.cat([run(torch.eye(columns)[start : start + 16], weight, isa) for start in range(0, columns, 16)])
    finally:
        torch.set_flush_denormal(previous)
    assert torch.equal(out, data.float().T)


@pytest.mark.parametrize("int4_pairs", [False, True], ids=["table", "pairs"])
def test_every_int4_value_converts_exactly(isa, int4_pairs):
    """Nibbles 0..15 (values -8..7), odd K so the last byte's high nibble is padding."""
    columns = 33
    values = (torch.arange(2 * columns) % 16 - 8).to(torch.int8).reshape(2, columns)
    weight = QuantizedWeight(INT4, pack_int4(values), torch.ones(2, 1), (2, columns), 128)
    out = run(torch.eye(columns, dtype=torch.bfloat16), weight, isa, int4_pairs=int4_pairs)
    assert torch.equal(out, values.float().T)


def test_fp8_nan_weights_give_nan_outputs_in_their_rows_only(isa):
    """0x7f and 0xff are e4m3's NaNs; dequantize() keeps them, and so must the product."""
    weight = weight_of(FP8_BLOCK, (20, 257))
    data = weight.data.view(torch.uint8).clone()
    data[3, 0] = 0x7F
    data[11, 256] = 0xFF  # in the partial last line
    data[19, 130] = 0x7F  # the last row, in a partial block of rows
    broken = fp8_block(data.view(torch.float8_e4m3fn), weight.scale)
    for rows in (1, 6):
        x = random_x(rows, 257, torch.bfloat16)
        out = run(x, broken, isa)
        nan_rows = {3, 11, 19}
        assert out[:, sorted(nan_rows)].isnan().all()
        finite = [n for n in range(20) if n not in nan_rows]
        assert_close_to_exact(out[:, finite], x, QuantizedWeight(FP8_BLOCK, weight.data[finite], weight.scale[:1],
                                                                  (17, 257)))


# Each format, int4 also by pair products.
METHODS = [(FP8_BLOCK, False), (INT8, False), (INT4, False), (INT4, True)]
METHOD_IDS = ["fp8_block", "int8", "int4", "int4_pairs"]


@pytest.mark.parametrize("x_dtype", ["fp32", "bf16"], ids=lambda d: f"x_{d}")
@pytest.mark.parametrize(("format_name", "int4_pairs"), METHODS, ids=METHOD_IDS)
def test_a_rows_bits_do_not_depend_on_the_batch(isa, format_name, int4_pairs, x_dtype):
    """Each row alone, and each run of rows as its own batch, gives the bits it has in a batch of 16."""
    weight = weight_of(format_name, (300, 257))
    x = random_x(16, 257, DTYPES[x_dtype])
    together = run(x, weight, isa, int4_pairs=int4_pairs)
    for row in range(16):
        assert torch.equal(run(x[row : row + 1], weight, isa, int4_pairs=int4_pairs), together[row : row + 1])
    for start, stop in [(0, 3), (5, 12), (9, 16), (1, 6)]:
        assert torch.equal(run(x[start:stop], weight, isa, int4_pairs=int4_pairs), together[start:stop])


@pytest.mark.parametrize(("format_name", "int4_pairs"), METHODS, ids=METHOD_IDS)
def test_the_thread_count_does_not_change_the_bits(isa, format_name, int4_pairs):
    """Large enough to be split over threads: 1, 2 and 3 threads agree bit for bit."""
    weight = weight_of(format_name, (1003, 300))
    for rows in (1, 16):
        x = random_x(rows, 300, torch.bfloat16)
        single = run(x, weight, isa, threads=1, int4_pairs=int4_pairs)
        assert_close_to_exact(single, x, weight)
        for threads in (2, 3):
            assert torch.equal(run(x, weight, isa, threads=threads, int4_pairs=int4_pairs), single)


@pytest.mark.parametrize("isa_name", native.SMALL_M.isas)
def test_every_build_compiles(isa_name):
    """Every build compiles here whatever this CPU runs (a build check for the other machines)."""
    if native_build.compiler() is None:
        pytest.skip("no C compiler")
    assert native_build.build(native.SOURCE, isa_name).exists()


def test_each_build_is_the_instruction_set_it_claims(isa):
    assert native.lanes(isa) == {"avx512": 16, "avx512f": 16, "avx2": 8}[isa]


@pytest.mark.parametrize("format_name", FORMATS)
def test_a_bound_weight_gives_the_kernels_bits(isa, format_name):
    """BoundWeight (the few-token forward's calls) converts the arguments once, with the same result."""
    weight = weight_of(format_name, (300, 257), torch.bfloat16)
    bias = torch.randn(300, dtype=torch.bfloat16)
    bound = native.BoundWeight(weight, bias)
    x = random_x(5, 257, torch.bfloat16)
    out = torch.empty(5, 300, dtype=torch.bfloat16)
    assert bound(x, out, isa=isa, threads=2) is out
    assert torch.equal(out, native.quantized_linear_small_m(x, weight, bias, out_dtype=torch.bfloat16, isa=isa))
    # By default int4 goes the way this CPU prefers.
    preferred = native.quantized_linear_small_m(x, weight, bias, out_dtype=torch.bfloat16, isa=isa,
                                                int4_pairs=native_build.int4_pairs_preferred())
    assert torch.equal(out, preferred)
    with pytest.raises(ValueError):
        native.BoundWeight(weight_of(INT4, (30, 64), group=48))


def test_quantized_linear_takes_the_native_kernel_for_a_few_rows():
    if native.kernel() is None:
        pytest.skip("no native build runs here")
    weight = weight_of(INT4, (300, 257))
    bias = torch.randn(300)
    x = random_x(12, 257, torch.bfloat16).reshape(3, 4, 257)
    assert uses_native(x, weight)
    out = quantized_linear(x, weight, bias)
    expected = (native.quantized_linear_small_m(x.reshape(12, 257), weight) + bias).to(torch.bfloat16)
    one_dim = quantized_linear(x[0, 0], weight, bias)
    assert one_dim.shape == (300,) and torch.equal(one_dim, expected[0])
    assert out.dtype == torch.bfloat16 and out.shape == (3, 4, 300)
    assert torch.equal(out.reshape(12, 300), expected)
    assert torch.equal(linear(x, weight, bias), out)
    # One bf16 rounding from the reference at most.
    torch.testing.assert_close(out, quantized_linear_reference(x, weight, bias), rtol=1e-2, atol=1e-3)


def test_quantized_linear_keeps_the_reference_where_the_kernel_does_not_apply():
    weight = weight_of(INT8, (30, 64))
    few = random_x(16, 64, torch.float32)
    assert not uses_native(random_x(17, 64, torch.float32), weight)  # above 16 rows
    assert not uses_native(few.half(), weight)  # fp16 x
    assert not uses_native(few.requires_grad_(), weight)  # a gradient may be asked for
    stacked = quantize_int8(torch.randn(2, 30, 64))
    assert not uses_native(few.detach(), stacked)  # a stack of experts, not one weight
    assert not uses_native(few.detach(), weight_of(INT4, (30, 64), group=48))  # steps would straddle groups
    x = random_x(17, 64, torch.float32)
    assert torch.equal(quantized_linear(x, weight), quantized_linear_reference(x, weight))
