"""bench/prefill_attention.py measures the native kernel against the PyTorch path on the same inputs."""

from __future__ import annotations

import pytest

from bench import prefill_attention
from kernels.attention import native
from kernels.native import cpu_runs


@pytest.mark.skipif(native.kernel() is None, reason="native kernel needs a C compiler")
@pytest.mark.parametrize("isa", [isa for isa in native.ATTENTION.isas if cpu_runs(isa)])
def test_entry_compares_the_build_with_pytorch(isa):
    entry = prefill_attention.measure(40, 90, 32, isa, repeats=1)
    assert (entry["new_tokens"], entry["cached"], entry["dim"], entry["isa"]) == (40, 90, 32, isa)
    assert entry["ours_ms"] > 0 and entry["pytorch_ms"] > 0
    # Same softmax in bf16 on both sides: one bf16 rounding of O(1) outputs apart at most.
    assert entry["max_abs_difference"] < 2e-2


def test_products_count_only_the_keys_a_row_sees():
    # 3 new tokens after 5 cached see 6, 7 and 8 keys.
    assert prefill_attention.products(3, 5, 8) == 4 * prefill_attention.HEADS * 8 * (6 + 7 + 8)
