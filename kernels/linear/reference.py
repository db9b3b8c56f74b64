"""Readable reference for the small-row bf16 linear layer: fp32 accumulation, one rounding."""

from __future__ import annotations

import torch
from torch import Tensor


def linear_reference(x: Tensor, weight: Tensor, out_dtype: torch.dtype | None = None) -> Tensor:
    """x `[..., K]`, weight `[N, K]` -> `[..., N]`: exact bf16 products summed in fp32, rounded once."""
    return (x.float() @ weight.float().T).to(out_dtype or x.dtype)
