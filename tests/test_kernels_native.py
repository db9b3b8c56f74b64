"""Process-wide settings of the native kernels' shared thread pool."""

from __future__ import annotations

import pytest
import torch

from kernels.native import flush_denormals


def underflowing_products() -> int:
    """How many of 4M products that underflow to denormals stay nonzero (PyTorch shares the work out
    over the pool's threads)."""
    tiny = torch.full((1 << 22,), 1e-20)
    return int((tiny * tiny != 0).sum())


def test_denormals_are_flushed_on_every_pool_thread():
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(max(2, threads))
        if not flush_denormals(False):
            pytest.skip("the native helper needs a C compiler and a CPU with AVX-512 BF16")
        assert underflowing_products() == 1 << 22
        flush_denormals()
        assert underflowing_products() == 0
    finally:
        flush_denormals()
        torch.set_num_threads(threads)
