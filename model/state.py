"""Per-sequence model state: what a forward pass needs to continue where it stopped.

Gated DeltaNet layers keep a fixed-size recurrent state and the tail of their causal
convolution; attention layers keep K/V for every position seen. The state is the runtime's
only interface for caching: it can be cloned, moved, measured, saved and restored, and
`checkpoint()` freezes it into an immutable `Checkpoint` that forks new states without copying
K/V (see `model.kv_memory` for how).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .kv_memory import KVGeometry, LayerKV, mapping_supported

STATE_FORMAT = "qwen3next-state/1"
_INITIAL_KV_CAPACITY = 256
# Positions reserved past the address space asked for: draft tokens (and the MTP layer's K/V,
# one index ahead) may run a little past the context, and growing out of a reservation copies.
# Address space only: pages never written cost nothing.
ADDRESS_SLACK = 4096


class StateError(ValueError):
    """A saved state that cannot be used with this model."""


@dataclass
class LinearLayerState:
    """conv: `[B, conv_dim, kernel - 1]` (model dtype); recurrent: `[B, HV, K, V]` fp32."""

    conv: torch.Tensor
    recurrent: torch.Tensor

    def tensors(self, used: int) -> dict[str, torch.Tensor]:
        return {"conv": self.conv, "recurrent": self.recurrent}


class AttentionLayerState:
    """K/V `[B, KVH, capacity, D]`, grown by doubling so decode never re-copies per token.

    `memory` is set when K/V live in a `LayerKV` reservation (CPU states reserved with an
    address space): checkpoints then map their K/V into it instead of copying.
    """

    def __init__(self, key: torch.Tensor, value: torch.Tensor, memory: LayerKV | None = None):
        self.key = key
        self.value = value
        self.memory = memory

    def ensure_capacity(self, needed: int) -> None:
        capacity = self.key.shape[2]
        if needed > capacity:
            self.reserve(max(needed, 2 * capacity), used=capacity)

    def reserve(self, capacity: int, used: int | None = None, address_space: int = 0) -> None:
        """Make room for `capacity` positions, keeping the first `used` (default: all).

        With `address_space` on a CPU state the K/V move once into a reservation of that many
        positions (or `capacity`, if more), which then holds every later growth without a copy.
        """
        old_capacity = self.key.shape[2]
        mapped = address_space > 0 and mapping_supported(self.key.device)
        if capacity <= old_capacity and (self.memory is not None or not mapped):
            return
        keep = old_capacity if used is None else min(used, old_capacity)
        if mapped:
            memory = LayerKV(KVGeometry.of(self.key), max(capacity, address_space + ADDRESS_SLACK))
            memory.key[:, :, :keep] = self.key[:, :, :keep]
            memory.value[:, :, :keep] = self.value[:, :, :keep]
            self.key, self.value, self.memory = memory.key, memory.value, memory
            return
        for name in ("key", "value"):
            old = getattr(self, name)
            grown = old.new_empty(old.shape[0], old.shape[1], capacity, old.shape[3])
            grown[:, :, :keep] = old[:, :, :keep]
            setattr(self, name, grown)
        self.memory = None

    def tensors(self, used: int) -> dict[str, torch.Tensor]:
        return {"key": self.key[:, :, :used], "value": self.value[:, :, :used]}


LayerState = LinearLayerState | AttentionLayerState


class ModelState:
    """State of `batch_size` sequences that have all consumed `seen_tokens` tokens.

    `base` is the checkpoint this state extends: its K/V below `base.seen_tokens` are the
    checkpoint's, unless the state has since been moved back before that point (tracked by the
    lowest `seen_tokens` since, because positions are only ever written at `seen_tokens`).
    """

    def __init__(self, layers: list[LayerState], fingerprint: str, seen_tokens: int = 0):
        self.layers = layers
        self.fingerprint = fingerprint
        self._seen_tokens = self.low_water = seen_tokens
        self.base = None

    @property
    def seen_tokens(self) -> int:
        return self._seen_tokens

    @seen_tokens.setter
    def seen_tokens(self, value: int) -> None:
        self._seen_tokens = value
        self.low_water = min(self.low_water, value)

    @property
    def batch_size(self) -> int:
        first = self.layers[0]
        return (first.conv if isinstance(first, LinearLayerState) else first.key).shape[0]

    @property
    def device(self) -> torch.device:
        first = self.layers[0]
        return (first.conv if isinstance(first, LinearLayerState) else first.key).device

    def layer_tensors(self) -> dict[str, torch.Tensor]:
        """The live part of every tensor, named `layers.{i}.{conv|recurrent|key|value}`."""
        named = {}
        for index, layer in enumerate(self.layers):
            for name, tensor in layer.tensors(self.seen_tokens).items():
                named[f"layers.{index}.{name}"] = tensor
        return named

    def reserve(self, tokens: int, address_space: int = 0) -> None:
        """Make room for `tokens` positions in every attention layer, without the doubling slack.

        `address_space` (the model's context): CPU states reserve that many positions of address
        space once, so growth never copies K/V again (see `AttentionLayerState.reserve`).
        """
        for layer in self.layers:
            if isinstance(layer, AttentionLayerState):
                layer.reserve(tokens, used=self.seen_tokens, address_space=address_space)

    def checkpoint(self):
        """Freeze this state into an immutable `Checkpoint` (copying only K/V added since `base`).

        This state continues from the checkpoint: mapped K/V are remapped onto it, so the copy
        does not stay in memory twice.
        """
        from .checkpoint import take_checkpoint

        return take_checkpoint(self)

    def nbytes(self) -> int:
        """Bytes of live state (K/V counted up to `seen_tokens`, not the spare capacity)."""
        return sum(t.numel() * t.element_size() for t in self.layer_tensors().values())

    def clone(self) -> ModelState:
        return self.to(self.device, copy=True)

    def to(self, device: torch.device | str, copy: bool = False) -> ModelState:
        layers: list[LayerState] = []
        for layer in self.layers:
            if isinstance(layer, LinearLayerState):
                layers.append(LinearLayerState(_move(layer.conv, device, copy), _move(layer.recurrent, device, copy)))
            else:
                used = max(self.seen_tokens, 1)
                key = _move(layer.key[:, :, :used], device, True)
                value = _move(layer.value[:, :, :used], device, True)
                layers.append(AttentionLayerState(key, value))
        return ModelState(layers, self.fingerprint, self.seen_tokens)

    def save(self, path: str | Path) -> None:
        tensors = {name: t.detach().contiguous().cpu() for name, t in self.layer_tensors().items()}
        metadata = {
            "format": STATE_FORMAT,
            "fingerprint": self.fingerprint,
            "seen_tokens": str(self.seen_tokens),
            "layer_kinds": json.dumps(["linear" if isinstance(x, LinearLayerState) else "attention"
                                       for x in self.layers]),
        }
        save_file(tensors, str(path), metadata=metadata)

    @classmethod
    def load(cls, path: str | Path, fingerprint: str, device: torch.device | str = "cpu") -> ModelState:
        """Load a state saved by `save`; refuses one saved by a different model."""
        try:
            with safe_open(str(path), framework="pt", device="cpu") as handle:
                metadata = handle.metadata() or {}
                if metadata.get("format") != STATE_FORMAT:
                    raise StateError(f"{path} is not a saved model state.")
                if metadata.get("fingerprint") != fingerprint:
                    raise StateError(
                        "This saved state was computed by a different model (or dtype) and cannot be used."
                    )
                kinds = json.loads(metadata["layer_kinds"])
                seen = int(metadata["seen_tokens"])
                layers: list[LayerState] = []
                for index, kind in enumerate(kinds):
                    if kind == "linear":
                        layers.append(LinearLayerState(
                            handle.get_tensor(f"layers.{index}.conv").to(device),
                            handle.get_tensor(f"layers.{index}.recurrent").to(device),
                        ))
                    else:
                        layers.append(AttentionLayerState(
                            handle.get_tensor(f"layers.{index}.key").to(device),
                            handle.get_tensor(f"layers.{index}.value").to(device),
                        ))
        except (SafetensorError, OSError, KeyError, ValueError) as exc:
            if isinstance(exc, StateError):
                raise
            raise StateError(f"Cannot read the saved state {path}: {exc}") from exc
        return cls(layers, fingerprint, seen)


def _move(tensor: torch.Tensor, device: torch.device | str, copy: bool) -> torch.Tensor:
    moved = tensor.to(device)
    if copy and moved.data_ptr() == tensor.data_ptr():
        moved = moved.clone()
    return moved


def empty_kv(batch: int, kv_heads: int, head_dim: int, dtype: torch.dtype, device) -> AttentionLayerState:
    shape = (batch, kv_heads, _INITIAL_KV_CAPACITY, head_dim)
    return AttentionLayerState(torch.zeros(shape, dtype=dtype, device=device),
                               torch.zeros(shape, dtype=dtype, device=device))
