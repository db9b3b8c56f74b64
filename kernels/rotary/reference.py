"""Rotary position embedding in PyTorch: the reference the native kernel is tested against."""

from __future__ import annotations

import torch


def apply_rotary_reference(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x `[B, T, H, D]`, cos/sin `[T, R]` -> `[B, T, H, D]`: the first R dims of each head rotated
    (NeoX halves), the rest passed through."""
    rot_dim = cos.shape[-1]
    rotated, passed = x[..., :rot_dim], x[..., rot_dim:]
    half = rot_dim // 2
    first, second = rotated[..., :half], rotated[..., half:]
    cos, sin = cos[None, :, None, :], sin[None, :, None, :]
    turned = torch.cat((-second, first), dim=-1)
    return torch.cat((rotated * cos + turned * sin, passed), dim=-1)
