"""The native rotary embedding against the PyTorch reference: equal bit for bit (both round each
product and the sum to bf16), on partial and full rotation, odd head counts and strided outputs,
in each build (AVX-512 BF16, AVX2 + FMA) this CPU runs."""

from __future__ import annotations

import pytest
import torch

from kernels.native import compiler
from kernels.rotary import apply_rotary, apply_rotary_reference
from kernels.rotary import native as rotary_native

pytestmark = pytest.mark.native_kernels(rotary_native.ROTARY)

requires_native = pytest.mark.skipif(
    rotary_native.kernel() is None, reason="native kernel needs a C compiler and a CPU with AVX-512 BF16 or AVX2"
)

# batch, tokens, heads, head dim, rotated dims
CASES = [(1, 1, 16, 128, 32), (2, 5, 3, 24, 12), (1, 300, 2, 64, 64), (1, 7, 4, 32, 0), (1, 3, 2, 256, 64),
         (1, 2, 3, 40, 38)]


def case_id(case) -> str:
    return "B{}-T{}-H{}-D{}-R{}".format(*case)


def inputs(case, seed: int):
    batch, tokens, heads, dim, rot = case
    generator = torch.Generator().manual_seed(seed)
    x = (torch.randn(batch, tokens, heads, dim, generator=generator) * 3).bfloat16()
    angles = torch.rand(tokens, rot, generator=generator) * 6.3
    return x, (angles.cos() * 1.1).bfloat16(), (angles.sin() * 1.1).bfloat16()


@requires_native
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_native_rotary_equals_reference(case, native_isa):
    x, cos, sin = inputs(case, seed=sum(case))
    assert rotary_native.supports(x, cos, sin)
    assert torch.equal(apply_rotary(x, cos, sin), apply_rotary_reference(x, cos, sin))


@requires_native
def test_rotary_writes_strided_rows_in_place(native_isa):
    """A key rotated straight into a `[KVH, capacity, D]` cache slice: only that slice changes."""
    x, cos, sin = inputs((1, 5, 3, 32, 16), seed=4)
    cache = torch.full((3, 12, 32), float("nan"), dtype=torch.bfloat16)
    rotary_native.rotate_into(x[0], cos, sin, cache[:, 4:9].transpose(0, 1))
    assert torch.equal(cache[:, 4:9].transpose(0, 1), apply_rotary_reference(x, cos, sin)[0])
    assert cache[:, :4].isnan().all() and cache[:, 9:].isnan().all()


@requires_native
@pytest.mark.parametrize("threads", [1, 3])
def test_native_rotary_is_exact_on_any_thread_count(native_isa, threads):
    x, cos, sin = inputs((1, 200, 4, 128, 64), seed=6)
    out = torch.empty(x.shape[1:], dtype=torch.bfloat16)
    rotary_native.rotate_into(x[0], cos, sin, out, threads=threads)
    assert torch.equal(out, apply_rotary_reference(x, cos, sin)[0])


def test_every_build_compiles():
    if compiler() is None:
        pytest.skip("no C compiler")
    assert set(rotary_native.ROTARY.build_all()) == {"avx512", "avx2"}


def test_other_inputs_take_the_reference():
    x, cos, sin = inputs((1, 3, 2, 16, 8), seed=5)
    assert not rotary_native.supports(x.float(), cos.float(), sin.float())
    assert not rotary_native.supports(x, cos[:, :7], sin[:, :7])
    assert torch.equal(apply_rotary(x.float(), cos.float(), sin.float()),
                       apply_rotary_reference(x.float(), cos.float(), sin.float()))
