"""`per_token`: short inputs get, token by token, the bits of one-token calls."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from kernels.rowwise import PER_TOKEN_MAX, per_token

FUNCTIONS = {
    "exp": torch.exp,
    "sigmoid": torch.sigmoid,
    "softplus": F.softplus,
    "cos": torch.cos,
}


@pytest.mark.parametrize("length", [1, 2, 5, PER_TOKEN_MAX, PER_TOKEN_MAX + 1], ids=lambda n: f"T{n}")
@pytest.mark.parametrize("name", sorted(FUNCTIONS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_each_token_equals_a_one_token_call(name, length, dtype):
    fn = FUNCTIONS[name]
    x = (torch.randn(1, length, 3, generator=torch.Generator().manual_seed(length)) * 4).to(dtype)
    out = per_token(fn, x)
    assert out.shape == x.shape
    if length <= PER_TOKEN_MAX:
        for t in range(length):
            assert torch.equal(out[:, t : t + 1], fn(x[:, t : t + 1]))
    else:
        assert torch.equal(out, fn(x))


def test_tuple_results_and_other_dims():
    x, y = torch.randn(4, 6), torch.randn(4, 6)
    first, second = per_token(lambda a, b: (a + b, a * b), x, y, dim=0)
    assert torch.equal(first, x + y) and torch.equal(second, x * y)
