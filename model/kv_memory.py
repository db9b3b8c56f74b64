"""Attention K/V in page-mapped memory, so that a state forks from a checkpoint without copying.

Why mappings and not paged blocks: every attention kernel reads one layer's K/V as a strided
`[B, KVH, capacity, D]` tensor, contiguous along positions within each head. Blocks with
refcounts would need every kernel to gather through a block table. Instead each attention
layer of a CPU state reserves address space for its whole capacity (the model's context) up
front; untouched pages cost no memory on Linux (MAP_NORESERVE, anonymous pages appear on
first write). A checkpoint's K/V live in a file (a memfd for the memory tier, the checkpoint
file for the disk tier) laid out so each head's positions are one page-aligned region; a fork
maps those regions MAP_PRIVATE | MAP_FIXED at the head's place in its reservation. Reading
them reads the shared pages; the fork's first write to a page copies that one page; positions
after the checkpoint land in the fork's own anonymous pages. A restore therefore costs a few
dozen mmap calls per segment, nothing proportional to the document, and growing never copies.

A segment holds positions `[start, end)` of every attention layer. Its region for a head holds
the head's bytes from the page boundary at or below `start` (so it maps at a page-aligned
address; the few positions before `start` repeat the parent's bytes) up to `end`, padded to a
whole page. Segments chain: a fork maps its checkpoint's segments oldest first, and a later
segment's first page overlays the earlier one's last page with the same bytes.
"""

from __future__ import annotations

import ctypes
import math
import mmap
import os
import sys
import weakref
from collections.abc import Sequence
from dataclasses import dataclass

import torch

PAGE = mmap.PAGESIZE
_MAP_FIXED = 0x10
_MAP_NORESERVE = 0x4000  # Linux; not exported by Python's mmap module before 3.13
_PROT_RW = mmap.PROT_READ | mmap.PROT_WRITE
_MAP_FAILED = ctypes.c_void_p(-1).value
KINDS = ("key", "value")
_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}

_libc = ctypes.CDLL(None, use_errno=True) if sys.platform.startswith("linux") else None
if _libc is not None:
    _libc.mmap.restype = ctypes.c_void_p
    _libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int,
                           ctypes.c_long]
    _libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]


def mapping_supported(device: torch.device | str) -> bool:
    """Mapped K/V need Linux (memfd, MAP_FIXED) and host memory; other devices copy instead."""
    return _libc is not None and hasattr(os, "memfd_create") and torch.device(device).type == "cpu"


def page_floor(nbytes: int) -> int:
    return nbytes - nbytes % PAGE


def page_ceil(nbytes: int) -> int:
    return -(-nbytes // PAGE) * PAGE


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def dtype_from_name(name: str) -> torch.dtype:
    if name not in _DTYPES:
        raise ValueError(f"unsupported K/V dtype {name!r}")
    return _DTYPES[name]


@dataclass(frozen=True)
class KVGeometry:
    """Shape of one attention layer's K (or V): `[batch, heads, capacity, head_dim]` of `dtype`."""

    batch: int
    heads: int
    head_dim: int
    dtype: torch.dtype

    @classmethod
    def of(cls, key: torch.Tensor) -> KVGeometry:
        batch, heads, _, head_dim = key.shape
        return cls(batch, heads, head_dim, key.dtype)

    @property
    def row_bytes(self) -> int:
        """Bytes of one position of one head."""
        return self.head_dim * self.dtype.itemsize

    @property
    def head_count(self) -> int:
        return self.batch * self.heads

    def aligned_capacity(self, tokens: int) -> int:
        """Smallest capacity >= tokens whose per-head bytes are whole pages."""
        step = math.lcm(self.row_bytes, PAGE) // self.row_bytes
        return max(-(-tokens // step) * step, step)

    def region_bytes(self, start: int, end: int) -> int:
        """Bytes a segment `[start, end)` keeps per head (see the module docstring)."""
        return 0 if end <= start else page_ceil(end * self.row_bytes - page_floor(start * self.row_bytes))


class Reservation:
    """A private address range: anonymous (backed by memory only where written), or a
    copy-on-write mapping of `fd` from `file_offset` when `fd` is given.

    Tensors made by `tensor` keep it alive; it is unmapped (with everything mapped into it)
    when the last of them goes.
    """

    def __init__(self, nbytes: int, fd: int | None = None, file_offset: int = 0):
        if fd is None:
            flags, fd = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | _MAP_NORESERVE, -1
        else:
            flags = mmap.MAP_PRIVATE
        address = _libc.mmap(None, nbytes, _PROT_RW, flags, fd, file_offset)
        if address in (None, _MAP_FAILED):
            raise _os_error("map state memory")
        self.address, self.nbytes = address, nbytes
        self._buffer = (ctypes.c_char * nbytes).from_address(address)
        weakref.finalize(self._buffer, _libc.munmap, address, nbytes)

    def tensor(self, offset: int, shape: Sequence[int], dtype: torch.dtype) -> torch.Tensor:
        count = math.prod(shape)
        return torch.frombuffer(self._buffer, dtype=dtype, count=count, offset=offset).view(*shape)

    def map_file(self, offset: int, length: int, fd: int, file_offset: int) -> None:
        """Map `length` bytes of `fd` copy-on-write over `[offset, offset + length)` of this range."""
        if offset % PAGE or file_offset % PAGE or offset + length > self.nbytes:
            raise ValueError("file mappings must be page aligned and inside the reservation")
        address = _libc.mmap(self.address + offset, length, _PROT_RW, mmap.MAP_PRIVATE | _MAP_FIXED, fd, file_offset)
        if address != self.address + offset:
            raise _os_error("map checkpoint K/V")


class LayerKV:
    """One attention layer's K and V in one reservation: `key`, `value` `[B, KVH, capacity, D]`.

    `capacity` is rounded up so that every head starts on a page boundary.
    """

    def __init__(self, geometry: KVGeometry, capacity: int):
        self.geometry = geometry
        self.capacity = geometry.aligned_capacity(capacity)
        self.head_bytes = self.capacity * geometry.row_bytes
        self.reservation = Reservation(2 * geometry.head_count * self.head_bytes)
        shape = (geometry.batch, geometry.heads, self.capacity, geometry.head_dim)
        self.key = self.reservation.tensor(0, shape, geometry.dtype)
        self.value = self.reservation.tensor(geometry.head_count * self.head_bytes, shape, geometry.dtype)

    def head_offset(self, kind: int, head: int) -> int:
        """Offset in the reservation of K (kind 0) or V (kind 1) of flat head `b * KVH + h`."""
        return (kind * self.geometry.head_count + head) * self.head_bytes


@dataclass(frozen=True)
class SegmentLayout:
    """Where positions `[start, end)` of `layers` attention layers' K/V sit in a file.

    One region per (layer, K then V, batch, head), in that order from `offset`, each
    `region_bytes` long (see the module docstring for what a region holds).
    """

    geometry: KVGeometry
    layers: int
    start: int
    end: int
    offset: int = 0

    def __post_init__(self):
        if self.offset % PAGE:
            raise ValueError("segment regions must start on a page boundary")

    @property
    def region_bytes(self) -> int:
        return self.geometry.region_bytes(self.start, self.end)

    @property
    def nbytes(self) -> int:
        return self.layers * len(KINDS) * self.geometry.head_count * self.region_bytes

    def region_offset(self, layer: int, kind: int, head: int) -> int:
        index = (layer * len(KINDS) + kind) * self.geometry.head_count + head
        return self.offset + index * self.region_bytes

    def write_layer(self, fd: int, layer: int, key: torch.Tensor, value: torch.Tensor) -> None:
        """Write attention layer `layer`'s regions from its K/V `[B, KVH, >= end, D]` into `fd`.

        Padding after `end` is left as the file has it (zeros in a fresh file).
        """
        if not self.region_bytes:
            return
        row = self.geometry.row_bytes
        first_byte = page_floor(self.start * row)
        first_token = first_byte // row
        skip = first_byte - first_token * row
        for kind, tensor in enumerate((key, value)):
            for head in range(self.geometry.head_count):
                rows = tensor[head // self.geometry.heads, head % self.geometry.heads, first_token:self.end]
                write_all(fd, _host_bytes(rows)[skip:], self.region_offset(layer, kind, head))


class Segment:
    """A `SegmentLayout` with the file that holds it. The file descriptor is owned and closed
    with the segment; mappings made from it stay valid after that."""

    def __init__(self, fd: int, layout: SegmentLayout):
        self.fd, self.layout = fd, layout
        weakref.finalize(self, os.close, fd)

    @property
    def start(self) -> int:
        return self.layout.start

    @property
    def end(self) -> int:
        return self.layout.end

    @property
    def nbytes(self) -> int:
        return self.layout.nbytes

    @classmethod
    def in_memory(cls, layout: SegmentLayout) -> Segment:
        """A zero-filled memfd sized for `layout` (fill it with `layout.write_layer(segment.fd, ...)`)."""
        fd = os.memfd_create("kv-checkpoint", os.MFD_CLOEXEC)
        try:
            os.ftruncate(fd, layout.offset + layout.nbytes)
        except BaseException:
            os.close(fd)
            raise
        return cls(fd, layout)

    def map_into(self, layer: int, memory: LayerKV) -> None:
        """Map this segment's regions of attention layer `layer` over `memory`'s heads."""
        layout = self.layout
        if not layout.region_bytes:
            return
        if memory.capacity < layout.end or memory.geometry != layout.geometry:
            raise ValueError("the K/V memory cannot hold this segment")
        start_byte = page_floor(layout.start * layout.geometry.row_bytes)
        for kind in range(len(KINDS)):
            for head in range(layout.geometry.head_count):
                memory.reservation.map_file(memory.head_offset(kind, head) + start_byte, layout.region_bytes,
                                            self.fd, layout.region_offset(layer, kind, head))


def _host_bytes(rows: torch.Tensor):
    """The bytes of `[T, D]` rows as a flat uint8 numpy view (copied to the host if needed)."""
    rows = rows.detach()
    if rows.device.type != "cpu" or not rows.is_contiguous():
        rows = rows.contiguous().cpu()
    return rows.view(torch.uint8).reshape(-1).numpy()


def write_all(fd: int, data, offset: int) -> None:
    """pwrite everything (one call writes at most ~2 GiB on Linux)."""
    view = memoryview(data).cast("B")
    done = 0
    while done < len(view):
        done += os.pwrite(fd, view[done:done + (1 << 30)], offset + done)


def _os_error(action: str) -> OSError:
    errno = ctypes.get_errno()
    return OSError(errno, f"cannot {action}: {os.strerror(errno)}")
