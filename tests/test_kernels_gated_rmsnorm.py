"""RMS norms against transformers' Qwen3NextRMSNorm and Qwen3NextRMSNormGated.

Both functions perform the reference's operations in the reference's order and dtypes, so the
expected result is bitwise equality, in fp32 and in bf16 alike.
"""

from __future__ import annotations

import pytest
import torch
from transformers.models.qwen3_next.modeling_qwen3_next import Qwen3NextRMSNorm, Qwen3NextRMSNormGated

from kernels.gated_rmsnorm import add_rms_norm, gated_rms_norm, norm, rms_norm
from kernels.gated_rmsnorm import native as norm_native
from kernels.native import compiler

pytestmark = pytest.mark.native_kernels(norm_native.RMS_NORM, norm_native.GATED_RMS_NORM, norm_native.ADD_RMS_NORM)

DTYPES = [torch.float32, torch.bfloat16]
SHAPES = [(3, 16), (2, 5, 4, 24), (1, 1, 128)]


def dtype_id(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def shape_id(shape: tuple[int, ...]) -> str:
    return "x".join(map(str, shape))


def randn(shape, seed: int, scale: float = 1.0, shift: float = 0.0) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * scale + shift


@pytest.mark.parametrize("eps", [1e-6, 1e-5], ids=lambda e: f"eps{e:g}")
@pytest.mark.parametrize("weight_dtype", DTYPES, ids=lambda d: f"w-{dtype_id(d)}")
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
def test_gated_rms_norm_matches_reference(shape, dtype, weight_dtype, eps: float) -> None:
    dim = shape[-1]
    x = (randn(shape, 1) * 3).to(dtype)
    z = randn(shape, 2).to(dtype)
    module = Qwen3NextRMSNormGated(dim, eps=eps)
    with torch.no_grad():
        module.weight.copy_(randn(dim, 3, scale=0.1, shift=1.0))  # plain weight, stored around 1
    module = module.to(weight_dtype)
    with torch.no_grad():
        expected = module(x, z)
    actual = gated_rms_norm(x, z, module.weight.detach(), eps)
    assert actual.dtype == expected.dtype == dtype
    assert torch.equal(actual, expected)


@pytest.mark.parametrize("weight_dtype", DTYPES, ids=lambda d: f"w-{dtype_id(d)}")
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
def test_rms_norm_matches_reference(shape, dtype, weight_dtype) -> None:
    dim = shape[-1]
    x = (randn(shape, 4) * 5).to(dtype)
    module = Qwen3NextRMSNorm(dim, eps=1e-6)
    with torch.no_grad():
        module.weight.copy_(randn(dim, 5, scale=0.1))  # zero-centred weight, stored around 0
    module = module.to(weight_dtype)
    with torch.no_grad():
        expected = module(x)
    actual = rms_norm(x, module.weight.detach(), 1e-6, zero_centered=True)
    assert actual.dtype == expected.dtype == dtype
    assert torch.equal(actual, expected)


def test_rms_norm_plain_weight() -> None:
    x = randn((4, 8), 6)
    weight = randn(8, 7, shift=1.0)
    expected = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * weight
    torch.testing.assert_close(rms_norm(x, weight, zero_centered=False), expected, atol=0, rtol=0)
    torch.testing.assert_close(rms_norm(x, weight - 1.0), expected, atol=1e-6, rtol=1e-6)


def test_norms_do_not_modify_inputs() -> None:
    x, z, w = randn((2, 8), 8), randn((2, 8), 9), randn(8, 10)
    before = [t.clone() for t in (x, z, w)]
    rms_norm(x, w)
    gated_rms_norm(x, z, w)
    for t, ref in zip((x, z, w), before, strict=True):
        assert torch.equal(t, ref)


requires_native = pytest.mark.skipif(
    norm_native.kernels() is None, reason="native kernel needs a C compiler and a CPU with AVX-512 BF16 or AVX2"
)


@requires_native
@pytest.mark.parametrize("gated", [False, True], ids=["plain", "gated"])
@pytest.mark.parametrize("shape", [(1, 70, 16, 256), (300, 512), (2, 3, 5, 7, 64), (5, 4096)], ids=shape_id)
def test_native_norms_match_pytorch_on_strided_rows(shape, gated, native_isa):
    """The native kernel sums squares in another order: outputs within one bf16 step (2^-8
    relative, 2^-8 * max absolute near zero) of norm.py; each row's bits independent of the batch
    and of the thread count."""
    x = (randn(shape, 8) * 3).bfloat16()[..., : shape[-1] // 2]  # every other half-row: a strided view
    dim = x.shape[-1]
    weight = randn(dim, 9, scale=0.1, shift=1.0 if gated else 0.0).bfloat16()
    z = randn(x.shape, 10).bfloat16()
    assert norm_native.supports(x, weight, z if gated else None)
    if gated:
        ours, expected = norm_native.gated_rms_norm(x, z, weight, 1e-6), norm.gated_rms_norm(x, z, weight, 1e-6)
    else:
        ours, expected = norm_native.rms_norm(x, weight, 1e-6, True), norm.rms_norm(x, weight, 1e-6, True)
    assert ours.is_contiguous() and ours.shape == x.shape and ours.dtype == torch.bfloat16
    bound = 2.0**-8 * expected.float().abs().max().item()
    torch.testing.assert_close(ours.float(), expected.float(), atol=bound, rtol=2.0**-8)
    flat_x, flat_z = x.reshape(-1, dim), z.reshape(-1, dim)
    for row in (0, flat_x.shape[0] - 1):
        alone = (norm_native.gated_rms_norm(flat_x[row], flat_z[row], weight, 1e-6) if gated
                 else norm_native.rms_norm(flat_x[row], weight, 1e-6, True))
        assert torch.equal(alone, ours.reshape(-1, dim)[row])
    single = (norm_native.gated_rms_norm(x, z, weight, 1e-6, threads=1) if gated
              else norm_native.rms_norm(x, weight, 1e-6, True, threads=1))
    assert torch.equal(single, ours)
    odd_split = (norm_native.gated_rms_norm(x, z, weight, 1e-6, threads=3) if gated
                 else norm_native.rms_norm(x, weight, 1e-6, True, threads=3))
    assert torch.equal(odd_split, ours)


def test_native_norms_decline_other_inputs():
    x = randn((4, 48), 11).bfloat16()
    weight = randn(48, 12).bfloat16()
    assert not norm_native.supports(x.float(), weight.float())
    assert not norm_native.supports(x[:, :40], weight[:40])
    assert not norm_native.supports(x.t(), randn(4, 12).bfloat16())


@requires_native
@pytest.mark.parametrize("rows, dim", [(1, 512), (7, 48), (16, 2048)], ids=lambda v: str(v))
def test_add_rms_norm_is_a_residual_add_then_the_native_norm(rows, dim, native_isa):
    """Bitwise: the residual rounds as torch's bf16 add does, and the norm is rms_norm's own arithmetic
    (in place, and into a new sum through the dispatching function)."""
    residual = (randn((rows, dim), 13) * 4).bfloat16()
    delta = randn((rows, dim), 14).bfloat16()
    weight = randn(dim, 15, scale=0.1).bfloat16()
    expected_sum = residual + delta
    expected = norm_native.rms_norm(expected_sum, weight, 1e-6, True)
    total, normed = add_rms_norm(residual, delta, weight, 1e-6)
    assert torch.equal(total, expected_sum) and torch.equal(normed, expected)
    out = torch.full((rows, dim), float("nan"), dtype=torch.bfloat16)
    norm_native.add_rms_norm(residual, delta, weight, 1e-6, True, out)
    assert torch.equal(residual, expected_sum)
    assert torch.equal(out, expected)


@requires_native
def test_add_rms_norm_rows_do_not_depend_on_batch_or_threads(native_isa):
    residual = (randn((16, 2048), 19) * 4).bfloat16()
    delta = randn((16, 2048), 20).bfloat16()
    weight = randn(2048, 21, scale=0.1).bfloat16()
    out, total = torch.empty_like(residual), torch.empty_like(residual)
    norm_native.add_rms_norm(residual, delta, weight, 1e-6, True, out, total, threads=2)
    for row, threads in ((0, 1), (9, 3)):
        alone, alone_total = torch.empty(1, 2048, dtype=torch.bfloat16), torch.empty(1, 2048, dtype=torch.bfloat16)
        norm_native.add_rms_norm(residual[row : row + 1], delta[row : row + 1], weight, 1e-6, True, alone,
                                 alone_total, threads=threads)
        assert torch.equal(alone, out[row : row + 1]) and torch.equal(alone_total, total[row : row + 1])


def test_every_build_compiles():
    if compiler() is None:
        pytest.skip("no C compiler")
    for kernel in (norm_native.RMS_NORM, norm_native.GATED_RMS_NORM, norm_native.ADD_RMS_NORM):
        assert set(kernel.build_all()) == {"avx512", "avx2"}


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_add_rms_norm_other_inputs_take_the_two_steps(dtype):
    x, delta = randn((2, 3, 24), 16).to(dtype), randn((2, 3, 24), 17).to(dtype)
    weight = randn(24, 18, scale=0.1).to(dtype)
    total, normed = add_rms_norm(x.transpose(0, 1), delta.transpose(0, 1), weight, 1e-6)
    assert torch.equal(total, x.transpose(0, 1) + delta.transpose(0, 1))
    assert torch.equal(normed, rms_norm(total, weight, 1e-6))
