"""Input checks and q/k preparation shared by the gated delta rule implementations."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

L2NORM_EPS = 1e-6


@dataclass(frozen=True)
class Dims:
    """Sizes of one gated delta rule call."""

    batch: int
    length: int
    key_heads: int
    value_heads: int
    key_dim: int
    value_dim: int

    @property
    def group(self) -> int:
        """Value heads served by each key head."""
        return self.value_heads // self.key_heads


def check_inputs(q: Tensor, k: Tensor, v: Tensor, g: Tensor, beta: Tensor, initial_state: Tensor | None) -> Dims:
    """Validate the shared layout and return the sizes.

    q, k: `[B, T, H, K]`; v: `[B, T, HV, V]` with HV a multiple of H; g, beta: `[B, T, HV]`;
    initial_state: `[B, HV, K, V]` or None.
    """
    if q.dim() != 4 or q.shape != k.shape:
        raise ValueError(f"q and k must both be [B, T, H, K], got {tuple(q.shape)} and {tuple(k.shape)}")
    if v.dim() != 4 or v.shape[:2] != q.shape[:2]:
        raise ValueError(f"v must be [B, T, HV, V] matching q's [B, T], got {tuple(v.shape)}")
    batch, length, key_heads, key_dim = q.shape
    value_heads, value_dim = v.shape[2], v.shape[3]
    if key_heads == 0 or value_heads % key_heads != 0:
        raise ValueError(f"value heads ({value_heads}) must be a multiple of key heads ({key_heads})")
    if g.shape != v.shape[:3] or beta.shape != v.shape[:3]:
        raise ValueError(
            f"g and beta must be [B, T, HV] = {tuple(v.shape[:3])}, got {tuple(g.shape)} and {tuple(beta.shape)}"
        )
    state_shape = (batch, value_heads, key_dim, value_dim)
    if initial_state is not None and tuple(initial_state.shape) != state_shape:
        raise ValueError(f"initial_state must be {state_shape}, got {tuple(initial_state.shape)}")
    return Dims(batch, length, key_heads, value_heads, key_dim, value_dim)


def l2norm(x: Tensor, eps: float = L2NORM_EPS) -> Tensor:
    """`x / sqrt(sum(x^2) + eps)` over the last dim, written as an rsqrt multiply.

    The eps sits inside the square root, as in the reference model, not as a clamp on the norm.
    """
    return x * torch.rsqrt((x * x).sum(dim=-1, keepdim=True) + eps)


def prepare_qk(q: Tensor, k: Tensor, scale: float | None, use_qk_l2norm: bool) -> tuple[Tensor, Tensor]:
    """fp32 copies of q and k `[B, T, H, K]`: optionally L2-normalised, q then multiplied by scale.

    The scale is applied after the normalisation, so a normalised query has norm `scale`.
    """
    if scale is None:
        scale = q.shape[-1] ** -0.5
    q32 = q.to(torch.float32)
    k32 = k.to(torch.float32)
    if use_qk_l2norm:
        q32 = l2norm(q32)
        k32 = l2norm(k32)
    return q32 * scale, k32


def initial_state_fp32(initial_state: Tensor | None, dims: Dims, device: torch.device) -> Tensor:
    """A fresh fp32 state `[B, HV, K, V]` the caller may modify: a copy of initial_state, or zeros."""
    if initial_state is None:
        shape = (dims.batch, dims.value_heads, dims.key_dim, dims.value_dim)
        return torch.zeros(shape, dtype=torch.float32, device=device)
    return initial_state.to(device=device, dtype=torch.float32, memory_format=torch.contiguous_format, copy=True)
