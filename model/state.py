"""Per-sequence model state: what a forward pass needs to continue where it stopped.

Gated DeltaNet layers keep a fixed-size recurrent state and the tail of their causal
convolution; attention layers keep K/V for every position seen. The state is the runtime's
only interface for caching: it can be cloned, moved, measured, saved and restored.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

STATE_FORMAT = "qwen3next-state/1"
_INITIAL_KV_CAPACITY = 256


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
    """K/V `[B, KVH, capacity, D]`, grown by doubling so decode never re-copies per token."""

    def __init__(self, key: torch.Tensor, value: torch.Tensor):
        self.key = key
        self.value = value

    def ensure_capacity(self, needed: int) -> None:
        capacity = self.key.shape[2]
        if needed > capacity:
            self.reserve(max(needed, 2 * capacity))

    def reserve(self, capacity: int) -> None:
        """Grow to exactly `capacity` positions (a prompt of known length then never doubles)."""
        old_capacity = self.key.shape[2]
        if capacity <= old_capacity:
            return
        for name in ("key", "value"):
            old = getattr(self, name)
            grown = old.new_empty(old.shape[0], old.shape[1], capacity, old.shape[3])
            grown[:, :, :old_capacity] = old
            setattr(self, name, grown)

    def tensors(self, used: int) -> dict[str, torch.Tensor]:
        return {"key": self.key[:, :, :used], "value": self.value[:, :, :used]}


LayerState = LinearLayerState | AttentionLayerState


class ModelState:
    """State of `batch_size` sequences that have all consumed `seen_tokens` tokens."""

    def __init__(self, layers: list[LayerState], fingerprint: str, seen_tokens: int = 0):
        self.layers = layers
        self.fingerprint = fingerprint
        self.seen_tokens = seen_tokens

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

    def reserve(self, tokens: int) -> None:
        """Make room for `tokens` positions in every attention layer, without the doubling slack."""
        for layer in self.layers:
            if isinstance(layer, AttentionLayerState):
                layer.reserve(tokens)

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
