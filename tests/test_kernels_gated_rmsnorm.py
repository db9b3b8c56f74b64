"""RMS norms against transformers' Qwen3NextRMSNorm and Qwen3NextRMSNormGated.

Both functions perform the reference's operations in the reference's order and dtypes, so the
expected result is bitwise equality, in fp32 and in bf16 alike.
"""

from __future__ import annotations

import pytest
import torch
from transformers.models.qwen3_next.modeling_qwen3_next import Qwen3NextRMSNorm, Qwen3NextRMSNormGated

from kernels.gated_rmsnorm import gated_rms_norm, rms_norm

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
