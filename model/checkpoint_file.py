"""Checkpoint files laid out to be mapped: a header, the recurrent states, then page-aligned K/V.

    magic (8 bytes) | header length (u64 LE) | header JSON | SHA-256 of the header JSON
    | from the next page boundary: recurrent and conv states (`model.checkpoint.LinearStates`)
    | from the next page boundary: K/V regions (`model.kv_memory.SegmentLayout`)

Both parts are mapped copy-on-write by forks: opening a file reads only its header.

A file holds the K/V of positions `[base_tokens, seen_tokens)` only; with `base_tokens > 0` it
extends a checkpoint of exactly `base_tokens` positions, which the reader passes as `parent`.
The header carries its own hash, so a damaged header is refused before any offset in it is
used; the data is checked by whoever stores the file (block checksums in `storage.blobs`).
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from pathlib import Path

from .checkpoint import Checkpoint, LinearStates
from .kv_memory import PAGE, KVGeometry, Segment, SegmentLayout, dtype_from_name, dtype_name, page_ceil, write_all
from .state import StateError

CHECKPOINT_FORMAT = "qwen3next-checkpoint/1"
MAGIC = b"QNCKPT\x00\x01"
_PREFIX = struct.Struct("<8sQ")
_DIGEST = 32
_MAX_HEADER = 1 << 20


def save_checkpoint(checkpoint: Checkpoint, path: str | Path, base_tokens: int = 0) -> int:
    """Write `checkpoint` with the K/V of positions from `base_tokens` on; returns the file size.

    `base_tokens` must be the length of an ancestor in the checkpoint's chain (0 for all K/V).
    """
    if not 0 <= base_tokens <= checkpoint.seen_tokens:
        raise ValueError("base_tokens must lie within the checkpoint")
    slots = checkpoint.linear.slots
    linear = [{name: [slot.offset, list(slot.shape), dtype_name(slot.dtype)]
               for name, slot in zip(("conv", "recurrent"), pair, strict=True)} for pair in slots]
    header = {
        "format": CHECKPOINT_FORMAT, "fingerprint": checkpoint.fingerprint,
        "seen_tokens": checkpoint.seen_tokens, "base_tokens": base_tokens, "capacity": checkpoint.capacity,
        "layer_kinds": checkpoint.layer_kinds, "linear": linear, "kv": None,
    }
    geometry = checkpoint.geometry
    # Offsets depend on the header's length, which depends on the offsets: size it with room to spare.
    header_room = len(json.dumps(header)) + 512
    linear_start = page_ceil(_PREFIX.size + header_room + _DIGEST)
    kv_offset = linear_start + checkpoint.linear.span
    layout = None
    if geometry is not None:
        layout = SegmentLayout(geometry, checkpoint.attention_layers, base_tokens, checkpoint.seen_tokens, kv_offset)
        header["kv"] = {"batch": geometry.batch, "heads": geometry.heads, "head_dim": geometry.head_dim,
                        "dtype": dtype_name(geometry.dtype), "offset": kv_offset}
    header["linear_offset"] = linear_start
    encoded = json.dumps(header, separators=(",", ":")).encode()
    if _PREFIX.size + len(encoded) + _DIGEST > linear_start:
        raise AssertionError("checkpoint header outgrew its room")
    size = kv_offset + (layout.nbytes if layout is not None else 0)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        write_all(fd, _PREFIX.pack(MAGIC, len(encoded)) + encoded + hashlib.sha256(encoded).digest(), 0)
        checkpoint.linear.write(fd, linear_start, checkpoint.linear.map())
        if layout is not None and layout.region_bytes:
            for index, memory in enumerate(checkpoint.kv_layers(checkpoint.seen_tokens)):
                layout.write_layer(fd, index, memory.key, memory.value)
        os.ftruncate(fd, size)
    finally:
        os.close(fd)
    return size


def open_checkpoint(path: str | Path, fingerprint: str, parent: Checkpoint | None = None) -> Checkpoint:
    """Open a file written by `save_checkpoint`: reads the recurrent states, maps nothing yet.

    The K/V stay in the file (forks map them); `parent` must be the checkpoint the file extends.
    Raises `StateError` for a file that is not a usable checkpoint for this model and parent.
    """
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    try:
        return _open(fd, path, fingerprint, parent)
    except (KeyError, TypeError, ValueError, EOFError) as exc:
        os.close(fd)
        if isinstance(exc, StateError):
            raise
        raise StateError(f"Cannot read the checkpoint {path}: {exc}") from exc
    except BaseException:
        os.close(fd)
        raise


def _open(fd: int, path, fingerprint: str, parent: Checkpoint | None) -> Checkpoint:
    size = os.fstat(fd).st_size
    header = _read_header(fd, path, size)
    if header.get("format") != CHECKPOINT_FORMAT:
        raise StateError(f"{path} is not a model checkpoint.")
    if header["fingerprint"] != fingerprint:
        raise StateError("This checkpoint was computed by a different model (or dtype) and cannot be used.")
    seen, base = int(header["seen_tokens"]), int(header["base_tokens"])
    kinds = list(header["layer_kinds"])
    if base != (parent.seen_tokens if parent is not None else 0) or not 0 <= base <= seen:
        raise StateError(f"{path} does not extend the checkpoint it was given.")
    if parent is not None and (parent.layer_kinds != kinds or parent.fingerprint != fingerprint):
        raise StateError(f"{path} does not match the layers of the checkpoint it extends.")
    pairs = [tuple((entry[name][1], dtype_from_name(entry[name][2])) for name in ("conv", "recurrent"))
             for entry in header["linear"]]
    slots = LinearStates.layout(pairs)
    if [[slot.offset for slot in pair] for pair in slots] != [[e["conv"][0], e["recurrent"][0]]
                                                              for e in header["linear"]]:
        raise StateError(f"{path} lays out its recurrent states unlike this version.")
    if len(slots) != kinds.count("linear"):
        raise StateError(f"{path} lacks some recurrent states.")
    linear_offset = int(header["linear_offset"])
    span = page_ceil(max((s.offset + s.nbytes for pair in slots for s in pair), default=0))
    if linear_offset % PAGE or linear_offset + span > size:
        raise StateError(f"{path} is truncated.")
    linear = LinearStates(os.dup(fd), linear_offset, slots)
    geometry, segments = None, ()
    if header["kv"] is not None:
        kv = header["kv"]
        geometry = KVGeometry(int(kv["batch"]), int(kv["heads"]), int(kv["head_dim"]), dtype_from_name(kv["dtype"]))
        if parent is not None and parent.geometry not in (None, geometry):
            raise StateError(f"{path} has K/V shaped unlike the checkpoint it extends.")
        layout = SegmentLayout(geometry, kinds.count("attention"), base, seen, int(kv["offset"]))
        if layout.offset + layout.nbytes > size:
            raise StateError(f"{path} is truncated.")
        segments = (*(parent.segments if parent is not None else ()), Segment(os.dup(fd), layout))
    os.close(fd)
    return Checkpoint(fingerprint, seen, kinds, linear, geometry, segments, int(header["capacity"]), parent)


def _read_header(fd: int, path, size: int) -> dict:
    prefix = os.pread(fd, _PREFIX.size, 0)
    if len(prefix) < _PREFIX.size:
        raise StateError(f"{path} is not a model checkpoint.")
    magic, length = _PREFIX.unpack(prefix)
    if magic != MAGIC or length > _MAX_HEADER or _PREFIX.size + length + _DIGEST > size:
        raise StateError(f"{path} is not a model checkpoint.")
    data = os.pread(fd, length + _DIGEST, _PREFIX.size)
    encoded, digest = data[:length], data[length:]
    if hashlib.sha256(encoded).digest() != digest:
        raise StateError(f"The header of {path} is damaged.")
    try:
        return json.loads(encoded)
    except ValueError as exc:
        raise StateError(f"The header of {path} is damaged: {exc}") from exc
