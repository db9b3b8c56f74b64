"""The small-row bf16 linear kernel against its fp32-accumulating reference.

Both sum exact bf16 products in fp32, in different orders, then round once to bf16. Tolerance:
one bf16 rounding step of the result (2^-8 relative) plus the worst fp32 reordering error,
K * 2^-24 * sum_k |x_k w_k|. Rows must also be bitwise independent of the batch they sit in and
of the thread count: that is what lets draft verification reproduce decode steps exactly. The
native tests run once per build (AVX-512 BF16, AVX2 + FMA) this CPU runs.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from kernels import linear as linear_module
from kernels.linear import linear, linear_reference, native, uses_native
from kernels.native import FEW_TOKENS, compiler

pytestmark = pytest.mark.native_kernels(native.LINEAR)

requires_native = pytest.mark.skipif(
    native.kernel() is None, reason="native kernel needs a C compiler and a CPU with AVX-512 BF16 or AVX2"
)

SHAPES = [(1, 1, 1), (1, 17, 31), (2, 33, 32), (3, 300, 100), (5, 64, 512), (16, 129, 2048), (7, 16, 33),
          (13, 70, 2050)]


def shape_id(shape) -> str:
    return "M{}-N{}-K{}".format(*shape)


def operands(shape, seed: int):
    rows, outputs, depth = shape
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, depth, generator=generator).bfloat16()
    weight = torch.randn(outputs, depth, generator=generator).bfloat16()
    return x, weight


def assert_close_to_reference(actual: torch.Tensor, x: torch.Tensor, weight: torch.Tensor) -> None:
    expected = linear_reference(x, weight, torch.float32)
    magnitude = x.float().abs() @ weight.float().abs().T
    bound = expected.abs() * 2.0**-8 + magnitude * x.shape[-1] * 2.0**-24
    error = (actual.float() - expected).abs()
    assert torch.all(error <= bound), f"max excess {(error - bound).max().item()}"


@requires_native
@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
def test_native_matches_reference(shape, native_isa) -> None:
    x, weight = operands(shape, seed=sum(shape))
    with torch.no_grad():
        assert uses_native(x, weight)
        actual = linear(x, weight)
    assert actual.dtype == torch.bfloat16 and actual.shape == (shape[0], shape[1])
    assert_close_to_reference(actual, x, weight)


@requires_native
@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
def test_native_fp32_output_matches_reference(shape, native_isa) -> None:
    x, weight = operands(shape, seed=7)
    actual = native.linear_small_m(x, weight, torch.float32)
    expected = linear_reference(x, weight, torch.float32)
    magnitude = x.float().abs() @ weight.float().abs().T
    assert torch.all((actual - expected).abs() <= magnitude * x.shape[-1] * 2.0**-24)


@requires_native
@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
def test_rows_do_not_depend_on_batch_or_threads(shape, native_isa) -> None:
    x, weight = operands(shape, seed=3)
    with torch.no_grad():
        batch = linear(x, weight)
        for row in range(x.shape[0]):
            assert torch.equal(linear(x[row : row + 1], weight), batch[row : row + 1])
        threads = torch.get_num_threads()
        try:
            torch.set_num_threads(1)
            single_thread = linear(x, weight)
        finally:
            torch.set_num_threads(threads)
    assert torch.equal(single_thread, batch)


@requires_native
@pytest.mark.parametrize("threads", [3, 5])
def test_rows_do_not_depend_on_uneven_thread_splits(native_isa, threads) -> None:
    """More threads than this CPU has cores, splitting the weight rows into uneven parts."""
    x, weight = operands((9, 1000, 300), seed=12)
    expected = native.linear_small_m(x, weight, torch.float32, threads=1)
    assert torch.equal(native.linear_small_m(x, weight, torch.float32, threads=threads), expected)
    assert torch.equal(native.linear_small_m(x[4:5], weight, torch.float32, threads=threads), expected[4:5])


def test_every_build_compiles() -> None:
    if compiler() is None:
        pytest.skip("no C compiler")
    assert set(native.LINEAR.build_all()) == {"avx512", "avx2"}


@requires_native
def test_strided_rows_bias_and_leading_dims(native_isa) -> None:
    x, weight = operands((4, 40, 96), seed=11)
    bias = torch.randn(40, generator=torch.Generator().manual_seed(1)).bfloat16()
    wide = torch.cat([x, x], dim=-1)[:, :96]  # row stride 192
    with torch.no_grad():
        plain = linear(x, weight, bias)
        assert torch.equal(linear(wide, weight, bias), plain)
        assert torch.equal(linear(x.view(2, 2, 96), weight, bias).view(4, 40), plain)
    assert torch.equal(plain, linear(x, weight) + bias)


@requires_native
def test_special_values_propagate(native_isa) -> None:
    x, weight = operands((2, 20, 64), seed=5)
    x[0, 3] = float("nan")
    x[1, 5] = float("inf")
    with torch.no_grad():
        out = linear(x, weight)
    assert torch.isnan(out[0]).all()
    assert not torch.isfinite(out[1]).any()


def test_other_cases_take_pytorch_path(monkeypatch) -> None:
    x, weight = operands((3, 24, 40), seed=2)
    many = torch.randn(FEW_TOKENS + 1, 40).bfloat16()
    assert not uses_native(x.float(), weight.float())
    assert not uses_native(many, weight)
    assert not uses_native(x, weight.t().contiguous().t())
    trainable = weight.clone().requires_grad_()
    assert not uses_native(x, trainable)
    with torch.no_grad():
        assert uses_native(x, trainable) == (native.kernel() is not None)
    monkeypatch.setattr(linear_module.native, "kernel", lambda: None)
    assert not uses_native(x, weight)
    with torch.no_grad():
        assert torch.equal(linear(x, weight), F.linear(x, weight))


def test_build_native_kernels_reports_each_op():
    from kernels import build_native_kernels

    ready = build_native_kernels()
    assert set(ready) == {"attention", "conv", "delta_rule", "linear", "moe", "norms", "rotary"}
    assert ready["linear"] == (native.kernel() is not None)


@pytest.mark.parametrize("rows, columns, depth", [(17, 2500, 96), (40, 1024, 128), (3, 7, 33)],
                         ids=["tiles-2.4", "one-tile", "few-rows"])
def test_bf16_products_without_native_bf16_are_fp32_rounded_once(rows, columns, depth, monkeypatch):
    """Where bf16 products are not native (the AVX2 builds), many-row bf16 linear layers widen the
    weight to fp32 tile by tile: each output is the fp32 product plus bias rounded once to bf16."""
    import kernels.linear as linear_module
    from kernels import native as native_module

    generator = torch.Generator().manual_seed(rows)
    x = torch.randn(rows, depth, generator=generator).bfloat16()
    weight = torch.randn(columns, depth, generator=generator).bfloat16()
    bias = torch.randn(columns, generator=generator).bfloat16()
    widened = []
    original = linear_module._linear_widened
    monkeypatch.setattr(linear_module, "_linear_widened", lambda *a: widened.append(1) or original(*a))
    with native_module.use_isa("avx2"):
        out = linear_module.linear(x, weight, bias)
    exact = x.double() @ weight.double().T + bias.double()
    assert out.dtype == torch.bfloat16 and out.shape == (rows, columns)
    assert widened == ([1] if rows > native_module.FEW_TOKENS or not linear_module.native.kernel() else [])
    # fp32 sums of `depth` products, then one bf16 rounding: within half a bf16 step plus fp32 error.
    step = torch.finfo(torch.bfloat16).eps * exact.abs()
    magnitude = x.double().abs() @ weight.double().abs().T
    assert ((out.double() - exact).abs() <= 0.5 * step + 1e-5 * depth * magnitude).all()


def test_widened_linear_passes_gradients_through_every_tile():
    """The widened path writes tiles into their output columns: gradients still reach x, every weight
    tile and the bias, equal to the fp32 products' gradients rounded to bf16."""
    import kernels.linear as linear_module

    generator = torch.Generator().manual_seed(7)
    rows, columns, depth = 5, linear_module.WIDEN_ROWS + 37, 24
    x = torch.randn(rows, depth, generator=generator).bfloat16().requires_grad_()
    weight = torch.randn(columns, depth, generator=generator).bfloat16().requires_grad_()
    bias = torch.randn(columns, generator=generator).bfloat16().requires_grad_()
    upstream = torch.randn(rows, columns, generator=generator).bfloat16()
    linear_module._linear_widened(x, weight, bias).backward(upstream)
    up = upstream.float()
    assert torch.equal(bias.grad, up.sum(0).bfloat16())
    assert torch.equal(weight.grad, (up.T @ x.detach().float()).bfloat16())
    torch.testing.assert_close(x.grad.float(), up @ weight.detach().float(), rtol=1e-2, atol=1e-2)
