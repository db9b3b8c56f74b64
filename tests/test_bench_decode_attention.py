"""bench/decode_attention.py measures the native kernel against PyTorch on the same inputs."""

from __future__ import annotations

import pytest

from bench import decode_attention
from kernels.attention import native
from kernels.native import cpu_runs


@pytest.mark.skipif(native.kernel() is None, reason="native kernel needs a C compiler")
@pytest.mark.parametrize("isa", [isa for isa in native.ATTENTION.isas if cpu_runs(isa)])
def test_entry_compares_the_build_with_pytorch(isa):
    entry = decode_attention.measure(300, 32, isa, threads=1, repeats=1, cold_bytes=0)
    assert (entry["length"], entry["dim"], entry["isa"], entry["threads"]) == (300, 32, isa, 1)
    assert entry["ours_ms"] > 0 and entry["pytorch_ms"] > 0
    # Same softmax in bf16 on both sides: one bf16 rounding of O(1) outputs apart at most.
    assert entry["max_abs_difference"] < 2e-2


def test_copies_exceed_the_cold_size_within_the_cap():
    q, caches = decode_attention.make_case(1024, 64, cold_bytes=4 * decode_attention.kv_bytes(1024, 64))
    assert q.shape == (1, 1, decode_attention.HEADS, 64)
    assert len(caches) == 4 and caches[0][0].shape == (1, decode_attention.KV_HEADS, 1024, 64)
    assert len(decode_attention.make_case(16, 16)[1]) == decode_attention.MAX_COPIES
