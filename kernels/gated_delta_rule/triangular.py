"""Inverse of a batch of unit lower-triangular matrices by recursive block doubling.

LAPACK's batched triangular solve runs one small matrix at a time and is slow on CPU for the
many 64 x 64 systems of the chunked delta rule. Block forward substitution does the same
arithmetic as a handful of batched matmuls: with T1, T2 the inverses of the two diagonal
halves, the inverse of [[I + A11, 0], [A21, I + A22]] is [[T1, 0], [-T2 A21 T1, T2]].
Starting from 1 x 1 blocks and doubling gives the whole inverse in log2(C) steps.
"""

from __future__ import annotations

import torch
from torch import Tensor


def _diagonal_blocks(a: Tensor, size: int) -> Tensor:
    """`[..., C, C]` -> its diagonal blocks `[..., C // size, size, size]`."""
    count = a.shape[-1] // size
    blocks = a.unflatten(-2, (count, size)).unflatten(-1, (count, size))  # [..., n, s, n, s]
    return blocks.diagonal(dim1=-4, dim2=-2).movedim(-1, -3)


def unit_lower_inverse(a: Tensor) -> Tensor:
    """`(I + tril(a, -1))^-1` for `a` of shape `[..., C, C]` (C a power of two); entries on and
    above the diagonal of `a` are ignored."""
    size = a.shape[-1]
    if size & (size - 1):
        raise ValueError(f"matrix size must be a power of two, got {size}")
    inverse = torch.ones(*a.shape[:-2], size, 1, 1, dtype=a.dtype, device=a.device)
    block = 1
    while block < size:
        pairs = _diagonal_blocks(a, 2 * block)  # [..., n, 2b, 2b]
        lower_left = pairs[..., block:, :block]
        first, second = inverse[..., 0::2, :, :], inverse[..., 1::2, :, :]
        merged = torch.zeros(*pairs.shape, dtype=a.dtype, device=a.device)
        merged[..., :block, :block] = first
        merged[..., block:, block:] = second
        merged[..., block:, :block] = -(second @ (lower_left @ first))
        inverse = merged
        block *= 2
    return inverse.squeeze(-3)
