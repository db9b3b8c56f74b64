"""Quantized weight layouts: one place for how each format's bytes and scales are laid out.

Three formats, each a weight `[*, N, K]` (a leading expert dimension allowed) of `N` output rows:

* ``fp8_block``: the official Qwen FP8 checkpoints. ``data`` is `float8_e4m3fn` `[*, N, K]`;
  ``scale`` `[*, ceil(N/128), ceil(K/128)]` holds one multiplier per 128 x 128 block
  (``weight_scale_inv`` in the checkpoint); the weight is ``data * scale`` of its block.
* ``int8``: per-output-channel symmetric int8. ``data`` is int8 `[*, N, K]`, ``scale`` `[*, N, 1]`.
* ``int4``: group-wise symmetric int4, group 128 along K. ``data`` is uint8 `[*, N, ceil(K/2)]`, two
  values a byte, the even column in the low nibble, each stored as ``value + 8``; ``scale``
  `[*, N, ceil(K/group)]`. These are exactly the bytes of compressed-tensors' ``pack-quantized``
  int32 words (eight nibbles a word, lowest first, little-endian), so such checkpoints load without
  repacking.

Scales keep the dtype they were stored in; arithmetic on them is fp32.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

FP8_BLOCK = "fp8_block"
INT8 = "int8"
INT4 = "int4"
FORMATS = (FP8_BLOCK, INT8, INT4)
FP8_BLOCK_SIZE = 128
INT4_GROUP_SIZE = 128
INT4_OFFSET = 8
INT8_MAX = 127
INT4_MAX = 7


@dataclass(frozen=True, eq=False)
class QuantizedWeight:
    """A weight `[*lead, N, K]` held in a quantized ``format`` (see the module docstring).

    It stands in for a weight tensor where layers and kernels take one: ``shape``, ``dtype``
    (the storage dtype, so dtype checks for bf16 fast paths fail), ``device``, and indexing along
    the leading (expert) dimension.
    """

    format: str
    data: Tensor
    scale: Tensor
    shape: tuple[int, ...]
    group_size: int = 0

    def __post_init__(self) -> None:
        if self.format not in FORMATS:
            raise ValueError(f"unknown quantized format {self.format!r}")
        expected_data = tuple(self.shape[:-1]) + (packed_columns(self.format, self.shape[-1]),)
        if tuple(self.data.shape) != expected_data:
            raise ValueError(f"{self.format} data of shape {list(self.data.shape)} for a weight {list(self.shape)}")
        expected_scale = scale_shape(self.format, self.shape, self.group_size)
        if tuple(self.scale.shape) != expected_scale:
            raise ValueError(
                f"{self.format} scale of shape {list(self.scale.shape)} for a weight {list(self.shape)}: "
                f"expected {list(expected_scale)}"
            )

    @property
    def dtype(self) -> torch.dtype:
        return self.data.dtype

    @property
    def device(self) -> torch.device:
        return self.data.device

    @property
    def requires_grad(self) -> bool:
        return False

    def is_contiguous(self) -> bool:
        return self.data.is_contiguous()

    def dim(self) -> int:
        return len(self.shape)

    @property
    def nbytes(self) -> int:
        """Resident bytes: the quantized values and their scales."""
        return self.data.numel() * self.data.element_size() + self.scale.numel() * self.scale.element_size()

    def __getitem__(self, index: int) -> QuantizedWeight:
        """One expert's weight from a stacked `[E, N, K]` weight."""
        if len(self.shape) < 3:
            raise IndexError("only a stacked weight can be indexed")
        return QuantizedWeight(self.format, self.data[index], self.scale[index], self.shape[1:], self.group_size)


def packed_columns(format: str, columns: int) -> int:
    return math.ceil(columns / 2) if format == INT4 else columns


def scale_shape(format: str, shape: tuple[int, ...], group_size: int = 0) -> tuple[int, ...]:
    *lead, rows, columns = shape
    if format == FP8_BLOCK:
        return (*lead, math.ceil(rows / FP8_BLOCK_SIZE), math.ceil(columns / FP8_BLOCK_SIZE))
    if format == INT8:
        return (*lead, rows, 1)
    return (*lead, rows, math.ceil(columns / (group_size or INT4_GROUP_SIZE)))


@dataclass(frozen=True, eq=False)
class QuantizedRows:
    """Quantized weights stacked along their output rows, each keeping its own layout.

    The experts' gate and up projections are used as one `[*, 2I, K]` weight, but in FP8 their
    128-row scale blocks each start at their own first row, so they stay two weights here.
    """

    parts: tuple[QuantizedWeight, ...]

    @property
    def shape(self) -> tuple[int, ...]:
        first = self.parts[0].shape
        return (*first[:-2], sum(part.shape[-2] for part in self.parts), first[-1])

    @property
    def dtype(self) -> torch.dtype:
        return self.parts[0].dtype

    @property
    def device(self) -> torch.device:
        return self.parts[0].device

    @property
    def format(self) -> str:
        return self.parts[0].format

    @property
    def requires_grad(self) -> bool:
        return False

    def is_contiguous(self) -> bool:
        return all(part.is_contiguous() for part in self.parts)

    def dim(self) -> int:
        return len(self.shape)

    @property
    def nbytes(self) -> int:
        return sum(part.nbytes for part in self.parts)

    def __getitem__(self, index: int) -> QuantizedRows:
        return QuantizedRows(tuple(part[index] for part in self.parts))
