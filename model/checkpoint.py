"""Immutable model-state checkpoints that fork new states without copying K/V.

A `Checkpoint` holds the Gated DeltaNet layers' conv and recurrent states (`LinearStates`, one
file region) and a chain of K/V segments (`model.kv_memory.Segment`): its parent's segments
plus one with the positions it added. `fork()` maps both copy-on-write (one mmap for the
recurrent states, a few per K/V segment), so a restore copies nothing up front: the first
forward that updates a recurrent state copies its pages, K/V pages are copied only where a fork
writes into a page it shares. Checkpoints are never written to.

On disk (`model.checkpoint_file`) a checkpoint stores only its own segment and references the
checkpoint it extends, so a follow-up turn writes only its new tokens' K/V.
"""

from __future__ import annotations

import math
import os
import weakref
from dataclasses import dataclass

import torch

from .kv_memory import KVGeometry, LayerKV, Reservation, Segment, SegmentLayout, mapping_supported, page_ceil, write_all
from .state import AttentionLayerState, LinearLayerState, ModelState

_SLOT_ALIGN = 64


@dataclass(frozen=True)
class TensorSlot:
    """Where one tensor sits in a `LinearStates` region (offset from the region's start)."""

    offset: int
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


class LinearStates:
    """Every Gated DeltaNet layer's `(conv [B, conv_dim, kernel - 1], recurrent [B, HV, K, V])`,
    in layer order, in one region of `fd` starting at the page-aligned `offset`."""

    def __init__(self, fd: int, offset: int, slots: list[tuple[TensorSlot, TensorSlot]]):
        self.fd, self.offset, self.slots = fd, offset, slots
        weakref.finalize(self, os.close, fd)

    @staticmethod
    def layout(pairs) -> list[tuple[TensorSlot, TensorSlot]]:
        """Slots for `pairs` of tensors (or of `(shape, dtype)`), each 64-byte aligned."""
        slots, offset = [], 0
        for pair in pairs:
            entry = []
            for item in pair:
                shape, dtype = (tuple(item.shape), item.dtype) if isinstance(item, torch.Tensor) else item
                entry.append(TensorSlot(offset, tuple(shape), dtype))
                offset += -(-entry[-1].nbytes // _SLOT_ALIGN) * _SLOT_ALIGN
            slots.append(tuple(entry))
        return slots

    @property
    def nbytes(self) -> int:
        return sum(slot.nbytes for pair in self.slots for slot in pair)

    @property
    def span(self) -> int:
        """Bytes the region takes in its file, a whole number of pages."""
        return page_ceil(max((slot.offset + slot.nbytes for pair in self.slots for slot in pair), default=0))

    @classmethod
    def in_memory(cls, pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> LinearStates:
        slots = cls.layout(pairs)
        fd = os.memfd_create("recurrent-checkpoint", os.MFD_CLOEXEC)
        states = cls(fd, 0, slots)
        os.ftruncate(fd, states.span)
        states.write(fd, 0, pairs)
        return states

    def write(self, fd: int, offset: int, pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Write `pairs` into `fd` in this layout, the region starting at `offset`."""
        for pair, slots in zip(pairs, self.slots, strict=True):
            for tensor, slot in zip(pair, slots, strict=True):
                data = tensor.detach().contiguous().cpu().view(torch.uint8).reshape(-1).numpy()
                write_all(fd, data, offset + slot.offset)

    def map(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Fresh copy-on-write tensors over the region: writing them never changes the file."""
        if not self.span:
            return []
        reservation = Reservation(self.span, self.fd, self.offset)
        return [tuple(reservation.tensor(slot.offset, slot.shape, slot.dtype) for slot in pair)
                for pair in self.slots]


class Lineage:
    """A checkpoint's place in its chain without its contents: its length and the lineage of the
    checkpoint it extends. Descendants keep it, so they can still name an ancestor (the file
    holding it, say) once the ancestor itself, with its recurrent states, is gone."""

    __slots__ = ("seen_tokens", "parent", "__weakref__")

    def __init__(self, seen_tokens: int, parent: Lineage | None):
        self.seen_tokens, self.parent = seen_tokens, parent


class Checkpoint:
    """A model state after `seen_tokens` tokens, frozen.

    linear: the recurrent and conv states; segments: K/V of positions `[0, seen_tokens)`, oldest
    first; capacity: the positions a fork reserves (the address space of the state it was taken
    from). `parent` (held weakly: a chain keeps its ancestors' K/V, not their recurrent states)
    is the checkpoint whose segments this one extends.
    """

    def __init__(self, fingerprint: str, seen_tokens: int, layer_kinds: list[str], linear: LinearStates,
                 geometry: KVGeometry | None, segments: tuple[Segment, ...], capacity: int,
                 parent: Checkpoint | None = None):
        self.fingerprint, self.seen_tokens, self.layer_kinds = fingerprint, seen_tokens, layer_kinds
        self.linear, self.geometry, self.segments = linear, geometry, segments
        self.capacity = max(capacity, seen_tokens)
        self.lineage = Lineage(seen_tokens, parent.lineage if parent is not None else None)
        self._inherited = len(parent.segments) if parent is not None else 0
        self._parent = weakref.ref(parent) if parent is not None else None

    @property
    def parent(self) -> Checkpoint | None:
        return self._parent() if self._parent is not None else None

    @property
    def attention_layers(self) -> int:
        return self.layer_kinds.count("attention")

    @property
    def own_segment(self) -> Segment | None:
        """The segment this checkpoint added to its parent's (None if it added no positions)."""
        return self.segments[-1] if len(self.segments) > self._inherited else None

    @property
    def linear_nbytes(self) -> int:
        return self.linear.nbytes

    @property
    def kv_nbytes(self) -> int:
        """K/V bytes of the live positions (what a state of this length holds)."""
        if self.geometry is None:
            return 0
        return self.attention_layers * 2 * self.geometry.head_count * self.seen_tokens * self.geometry.row_bytes

    def nbytes(self) -> int:
        return self.linear_nbytes + self.kv_nbytes

    def kv_layers(self, capacity: int | None = None) -> list[LayerKV]:
        """The K/V of every attention layer, mapped from the segments into fresh reservations."""
        capacity = max(capacity or self.capacity, self.seen_tokens, 1)
        layers = [LayerKV(self.geometry, capacity) for _ in range(self.attention_layers)]
        for segment in self.segments:
            for index, memory in enumerate(layers):
                segment.map_into(index, memory)
        return layers

    def fork(self, device: torch.device | str = "cpu") -> ModelState:
        """A new state equal to this checkpoint, free to advance; the checkpoint stays unchanged.

        On the CPU its K/V are the checkpoint's pages (copied one page at a time on first write);
        elsewhere they are copied to the device.
        """
        device = torch.device(device)
        kv_iter = iter(self._kv_for(device))
        linear_iter = iter(self.linear.map())
        layers = []
        for kind in self.layer_kinds:
            if kind == "linear":
                conv, recurrent = next(linear_iter)
                layers.append(LinearLayerState(conv.to(device), recurrent.to(device)))
            else:
                layers.append(next(kv_iter))
        state = ModelState(layers, self.fingerprint, self.seen_tokens)
        state.base = self
        return state

    def _kv_for(self, device: torch.device) -> list[AttentionLayerState]:
        if self.geometry is None:
            return []
        if mapping_supported(device):
            return [AttentionLayerState(m.key, m.value, m) for m in self.kv_layers()]
        used = max(self.seen_tokens, 1)
        result = []
        for memory in self.kv_layers(used):
            result.append(AttentionLayerState(memory.key[:, :, :used].to(device, copy=True),
                                              memory.value[:, :, :used].to(device, copy=True)))
        return result


def take_checkpoint(state: ModelState) -> Checkpoint:
    """Freeze `state` (see `ModelState.checkpoint`)."""
    seen = state.seen_tokens
    attention = [layer for layer in state.layers if isinstance(layer, AttentionLayerState)]
    kinds = ["linear" if isinstance(layer, LinearLayerState) else "attention" for layer in state.layers]
    base = state.base if _extends(state) else None
    geometry = KVGeometry.of(attention[0].key) if attention else None
    segments = base.segments if base is not None else ()
    start = base.seen_tokens if base is not None else 0
    own = None
    if attention and seen > start:
        own = Segment.in_memory(SegmentLayout(geometry, len(attention), start, seen))
        segments = (*segments, own)
        for index, layer in enumerate(attention):
            own.layout.write_layer(own.fd, index, layer.key, layer.value)
            if layer.memory is not None:
                # The state continues from the checkpoint's pages: its own copy of them is dropped
                # (layer by layer, so a long state is never held twice).
                own.map_into(index, layer.memory)
    linear = LinearStates.in_memory([(layer.conv, layer.recurrent)
                                     for layer in state.layers if isinstance(layer, LinearLayerState)])
    capacity = max((layer.key.shape[2] for layer in attention), default=seen)
    checkpoint = Checkpoint(state.fingerprint, seen, kinds, linear, geometry, segments, capacity, base)
    state.base, state.low_water = checkpoint, seen
    return checkpoint


def _extends(state: ModelState) -> bool:
    """Whether `state` still holds its base checkpoint's K/V unchanged below the base's length."""
    base = state.base
    if base is None or base.fingerprint != state.fingerprint or state.low_water < base.seen_tokens:
        return False
    attention = [layer for layer in state.layers if isinstance(layer, AttentionLayerState)]
    return (len(attention) == base.attention_layers
            and (not attention or KVGeometry.of(attention[0].key) == base.geometry))
