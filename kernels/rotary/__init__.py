"""Rotary position embedding on the leading slice of each head (NeoX layout).

bf16 on CPU takes the native kernel (`rotary_bf16.c`, equal to the reference bit for bit);
everything else runs the PyTorch reference in `reference.py`.
"""

from __future__ import annotations

from torch import Tensor

from . import native
from .reference import apply_rotary_reference

__all__ = ["apply_rotary", "apply_rotary_reference"]


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x `[B, T, H, D]`, cos/sin `[T, R]` -> `[B, T, H, D]`, the first R dims of each head rotated."""
    if native.supports(x, cos, sin):
        return native.apply_rotary(x, cos, sin)
    return apply_rotary_reference(x, cos, sin)
