"""Triton gated RMSNorm against `kernels.gated_rmsnorm.norm.gated_rms_norm`."""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before anything imports Triton

import pytest  # noqa: E402
import torch  # noqa: E402

from kernels.gated_rmsnorm import gated_rms_norm  # noqa: E402
from kernels.gated_rmsnorm import norm as reference  # noqa: E402
from tests.triton_support import (  # noqa: E402
    DEVICE,
    check_interpreted,
    dtype_id,
    load,
    prefill_new_tensors,
    requires_cuda,
)

# fp32: the mean of squares is summed in another order; a few ulps.
FP32_ATOL, FP32_RTOL = 1e-6, 1e-5
# bf16: same rounding points as the reference (observed bitwise equal under the interpreter);
# one bf16 ulp (2^-7 relative) allows a flip from the fp32 summation order on GPU.
BF16_ATOL, BF16_RTOL = 1e-3, 2.0**-7

DTYPES = [torch.float32, torch.bfloat16]
SHAPES = [(3, 16), (2, 5, 4, 24), (1, 1, 128), (37, 40)]


@pytest.fixture(autouse=True)
def _nan_buffers(monkeypatch: pytest.MonkeyPatch) -> None:
    prefill_new_tensors(monkeypatch)


@pytest.fixture(scope="module")
def triton_norm():
    return load("kernels.gated_rmsnorm.triton_norm")


def randn(shape, seed: int, scale: float = 1.0, shift: float = 0.0) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * scale + shift


def test_kernels_run_under_the_interpreter_as_requested(triton_norm) -> None:
    check_interpreted(triton_norm)


@pytest.mark.parametrize("weight_dtype", DTYPES, ids=lambda d: f"w-{dtype_id(d)}")
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_matches_reference(triton_norm, shape, dtype: torch.dtype, weight_dtype: torch.dtype) -> None:
    x = (randn(shape, 1) * 3).to(dtype).to(DEVICE)
    z = randn(shape, 2).to(dtype).to(DEVICE)
    weight = randn(shape[-1], 3, scale=0.1, shift=1.0).to(weight_dtype).to(DEVICE)
    out = triton_norm.gated_rms_norm_triton(x, z, weight, 1e-6)
    expected = reference.gated_rms_norm(x, z, weight, 1e-6)
    atol, rtol = (FP32_ATOL, FP32_RTOL) if dtype == torch.float32 else (BF16_ATOL, BF16_RTOL)
    assert out.dtype == dtype and out.shape == x.shape
    torch.testing.assert_close(out, expected, atol=atol, rtol=rtol)


def test_strided_rows_and_eps(triton_norm) -> None:
    """x and z as head slices of wider projections (rows strided, D contiguous)."""
    wide = randn((6, 3, 64), 4, scale=2.0).to(DEVICE)
    x, z = wide[..., :24], wide[..., 32:56]
    weight = randn(24, 5, scale=0.1, shift=1.0).to(DEVICE)
    out = triton_norm.gated_rms_norm_triton(x, z, weight, 1e-5)
    torch.testing.assert_close(out, reference.gated_rms_norm(x, z, weight, 1e-5), atol=FP32_ATOL, rtol=FP32_RTOL)


@requires_cuda
def test_cuda_tensors_dispatch_to_triton() -> None:
    load("kernels.gated_rmsnorm.triton_norm")
    x, z, weight = randn((4, 3, 128), 6).cuda(), randn((4, 3, 128), 7).cuda(), randn(128, 8).cuda()
    torch.testing.assert_close(
        gated_rms_norm(x, z, weight).cpu(),
        reference.gated_rms_norm(x.cpu(), z.cpu(), weight.cpu()),
        atol=FP32_ATOL,
        rtol=FP32_RTOL,
    )
