"""Rotary position embedding: cos/sin tables for absolute positions, with YaRN (applied by kernels.rotary)."""

from __future__ import annotations

import math

import torch

from kernels.rowwise import per_token

from .config import ModelConfig, RopeSettings, yarn_attention_factor


def inverse_frequencies(rope: RopeSettings, rotary_dim: int) -> tuple[torch.Tensor, float]:
    """Per-pair inverse frequencies `[rotary_dim // 2]` (fp32) and the cos/sin scale."""
    exponents = torch.arange(0, rotary_dim, 2, dtype=torch.int64).float() / rotary_dim
    base_freq = rope.theta**exponents
    if rope.rope_type != "yarn":
        return 1.0 / base_freq, 1.0
    extrapolated = 1.0 / base_freq
    interpolated = 1.0 / (rope.factor * base_freq)
    original = rope.original_max_position_embeddings

    def correction_dim(rotations: float) -> float:
        return rotary_dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(rope.theta))

    low, high = correction_dim(rope.beta_fast), correction_dim(rope.beta_slow)
    if rope.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, rotary_dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(rotary_dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    keep_extrapolated = 1 - ramp
    inv_freq = interpolated * (1 - keep_extrapolated) + extrapolated * keep_extrapolated
    return inv_freq, yarn_attention_factor(rope)


class RotaryEmbedding:
    """Computes cos/sin for absolute positions; holds no per-sequence state."""

    def __init__(self, config: ModelConfig, device: torch.device | str = "cpu"):
        inv_freq, self.scale = inverse_frequencies(config.rope, config.rotary_dim)
        self.inv_freq = inv_freq.to(device)

    def cos_sin(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """positions `[T]` int64 -> cos, sin `[T, rotary_dim]` in `dtype`."""
        return per_token(lambda p: self._cos_sin(p, dtype), positions, dim=0)

    def _cos_sin(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = positions.float()[:, None] * self.inv_freq[None, :]
        angles = torch.cat((freqs, freqs), dim=-1)
        return (angles.cos() * self.scale).to(dtype), (angles.sin() * self.scale).to(dtype)
