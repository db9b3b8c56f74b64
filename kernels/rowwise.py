"""Elementwise maths that gives a token the same bits however many tokens share the call.

PyTorch's CPU elementwise kernels run full SIMD vectors and finish the remainder with scalar
code, and the two paths of `exp`, `sigmoid`, `softplus` or `cos` may differ in the last bit. A
tensor's length along the token axis therefore decides which path a token's values take. For a
few tokens (draft verification, short prompts) `per_token` runs the function on one token at a
time, exactly as a one-token decode step does; longer inputs keep one call.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from .native import FEW_TOKENS

# As many tokens as the row-independent linear and attention kernels take in one call.
PER_TOKEN_MAX = FEW_TOKENS


def per_token(fn: Callable[..., Tensor | tuple[Tensor, ...]], *tensors: Tensor, dim: int = 1):
    """`fn(*tensors)` (a tensor or a tuple of tensors), computed token by token along `dim` when
    there are 2..PER_TOKEN_MAX tokens."""
    length = tensors[0].shape[dim]
    if length <= 1 or length > PER_TOKEN_MAX:
        return fn(*tensors)
    pieces = [fn(*(t.narrow(dim, i, 1) for t in tensors)) for i in range(length)]
    if isinstance(pieces[0], tuple):
        return tuple(torch.cat(parts, dim=dim) for parts in zip(*pieces, strict=True))
    return torch.cat(pieces, dim=dim)
