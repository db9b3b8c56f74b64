"""Two-tier cache of model states: checkpoints in memory (LRU) and checkpoint files on disk.

The memory tier holds immutable `Checkpoint`s (K/V in memfds); a hit forks one, which maps its
K/V and copies only the recurrent states. The disk tier is `storage.blobs`: a hit maps the
checkpoint file (and the files it extends) without reading it and starts a block check in the
background; whoever uses the state calls `Restored.verified()` before showing or caching
anything computed from it, and recomputes if it fails. Writes go to a background writer
(`checkpoint_writer`), so answers never wait for the disk.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from dataclasses import dataclass

from model import ModelState, StateError
from model.checkpoint import Checkpoint
from model.checkpoint_file import open_checkpoint
from storage.blob_files import BlockCheck
from storage.blobs import BlobHandle

from .checkpoint_writer import writer_for

log = logging.getLogger(__name__)

# Share of the memory available at start-up that the memory tier may use by default.
MEMORY_SHARE = 0.25
_FALLBACK_BUDGET = 2 << 30


def raise_open_file_limit() -> None:
    """Let the process hold as many files as it may: every cached checkpoint keeps a descriptor
    or two (its memfds or its file), many more than a soft limit of 1024 allows for long chats."""
    try:
        import resource

        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        wanted = 1 << 20 if hard == resource.RLIM_INFINITY else hard
        if soft != resource.RLIM_INFINITY and soft < wanted:
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
    except (ImportError, ValueError, OSError):
        pass


def default_memory_budget() -> int:
    """MEMORY_SHARE of MemAvailable (the memory tier's default size), or 2 GiB where unknown."""
    try:
        with open("/proc/meminfo", encoding="ascii") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(int(line.split()[1]) * 1024 * MEMORY_SHARE)
    except (OSError, ValueError, IndexError):
        pass
    return _FALLBACK_BUDGET


@dataclass(frozen=True)
class CacheStats:
    memory_entries: int
    memory_bytes: int
    disk_entries: int
    disk_bytes: int
    hits: int
    misses: int
    pending_writes: int = 0
    bytes_written: int = 0

    @property
    def hit_rate(self) -> float:
        total = self.hits + self.misses
        return self.hits / total if total else 0.0


# A disk checkpoint being verified: the file's handle and its running block check.
Check = tuple[BlobHandle, BlockCheck]


@dataclass
class _Entry:
    checkpoint: Checkpoint
    checks: tuple[Check, ...]  # block checks of the files it (and what it extends) came from


class Restored:
    """The longest cached prefix: `covered` leading keys, and a fresh `state` forked from it.

    `verified()` waits for the block checks of the files the state was read from; when it
    returns False those checkpoints are gone and nothing computed from `state` may be used.
    """

    def __init__(self, cache: StateCache, covered: int, state: ModelState | None, checks: tuple[Check, ...]):
        self.cache, self.covered, self.state, self.checks = cache, covered, state, checks

    @property
    def trusted(self) -> bool:
        """Whether every file it came from has already passed its check (no need to wait)."""
        return all(check.finished and check.failed_block is None for _, check in self.checks)

    def verified(self) -> bool:
        failed = [handle for handle, check in self.checks if not check.wait()]
        for handle in failed:
            self.cache.reject(handle)
        return not failed


class StateCache:
    """Never hands out a cached object: a hit is a fork, `put` freezes a checkpoint.

    memory_budget_bytes: None or negative for the default (`default_memory_budget`), 0 for no
    memory tier.
    """

    def __init__(self, lm, blobs=None, memory_budget_bytes: int | None = None):
        self.lm, self.blobs = lm, blobs
        self.fingerprint = lm.fingerprint
        self.device = getattr(lm, "device", "cpu")
        if memory_budget_bytes is None or memory_budget_bytes < 0:
            memory_budget_bytes = default_memory_budget()
        self.budget = memory_budget_bytes
        self.writer = writer_for(blobs) if blobs is not None else None
        raise_open_file_limit()
        self._memory: OrderedDict[str, _Entry] = OrderedDict()
        self._bytes = 0
        self._lock = threading.RLock()
        self.hits = self.misses = 0

    def restore(self, keys: list[str]) -> Restored:
        """Fork the longest cached prefix of `keys` (disk hits unverified: see `Restored`)."""
        for count in range(len(keys), 0, -1):
            found = self._find(keys[count - 1])
            if found is not None:
                checkpoint, checks = found
                self.hits += 1
                _start(checks)
                return Restored(self, count, checkpoint.fork(self.device), checks)
        self.misses += 1
        return Restored(self, 0, None, ())

    def longest_prefix(self, keys: list[str]) -> tuple[int, ModelState | None]:
        """(number of leading keys covered, state) for the longest cached prefix, verified."""
        while True:
            restored = self.restore(keys)
            if restored.state is None or restored.verified():
                return restored.covered, restored.state

    def get(self, key: str) -> ModelState | None:
        """A verified fork of the checkpoint cached under `key`, or None."""
        found = self._find(key)
        if found is None:
            return None
        checkpoint, checks = found
        _start(checks)
        restored = Restored(self, 1, checkpoint.fork(self.device), checks)
        return restored.state if restored.verified() else None

    def put(self, key: str, state: ModelState | Checkpoint, depends_on: tuple[str, ...] = (),
            disk: bool = True) -> Checkpoint:
        """Cache a checkpoint (a state is frozen first and continues from it); written in the background."""
        checkpoint = state.checkpoint() if isinstance(state, ModelState) else state
        self._remember(key, checkpoint, ())
        if disk and self.writer is not None:
            self.writer.submit(key, self.fingerprint, checkpoint, depends_on)
        return checkpoint

    def flush(self, timeout: float | None = None) -> bool:
        """Wait for the background writes submitted so far."""
        return self.writer.flush(timeout) if self.writer is not None else True

    def reject(self, handle) -> None:
        """A file failed its block check: remove it (and what extends it) from both tiers."""
        log.warning("checkpoint %s failed verification; discarding it", handle.key)
        self.blobs.discard(handle)
        with self._lock:
            for key in [k for k, e in self._memory.items() if any(h.path == handle.path for h, _ in e.checks)]:
                del self._memory[key]
            self._bytes = self._count_bytes()

    def _find(self, key: str) -> tuple[Checkpoint, tuple[Check, ...]] | None:
        with self._lock:
            entry = self._memory.get(key)
            if entry is not None:
                self._memory.move_to_end(key)
                return entry.checkpoint, entry.checks
        if self.writer is not None:
            pending = self.writer.pending(key, self.fingerprint)
            if pending is not None:
                return pending, ()
        return self._load(key) if self.blobs is not None else None

    def _load(self, key: str) -> tuple[Checkpoint, tuple[Check, ...]] | None:
        """Open a disk checkpoint and the ones it extends; verification starts in the background."""
        handle = self.blobs.open(key, self.fingerprint)
        if handle is None:
            return None
        parent, inherited = None, ()
        if handle.parent_key is not None:
            found = self._find(handle.parent_key)
            if found is None:
                return None
            parent, inherited = found
        try:
            checkpoint = open_checkpoint(handle.path, self.fingerprint, parent)
        except (StateError, OSError) as exc:
            log.warning("dropping unreadable checkpoint %s: %s", key, exc)
            self.blobs.discard(handle)
            return None
        # Checks start once the whole chain is open: their reads would hold up its headers' reads.
        checks = (*inherited, (handle, handle.check(start=False)))
        self.writer.register(checkpoint, key, handle.checksum)
        self._remember(key, checkpoint, checks)
        return checkpoint, checks

    def _remember(self, key: str, checkpoint: Checkpoint, checks: tuple[Check, ...]) -> None:
        if _own_bytes(checkpoint) > self.budget:
            return
        with self._lock:
            self._memory.pop(key, None)
            self._memory[key] = _Entry(checkpoint, checks)
            self._bytes = self._count_bytes()
            while self._bytes > self.budget and len(self._memory) > 1:
                self._memory.popitem(last=False)
                self._bytes = self._count_bytes()

    def _count_bytes(self) -> int:
        """Recurrent states of every entry plus every K/V segment once (chained entries share them)."""
        segments = {}
        total = 0
        for entry in self._memory.values():
            total += entry.checkpoint.linear_nbytes
            for segment in entry.checkpoint.segments:
                segments[id(segment)] = segment.nbytes
        return total + sum(segments.values())

    def clear_memory(self) -> None:
        with self._lock:
            self._memory.clear()
            self._bytes = 0

    def stats(self) -> CacheStats:
        disk = self.blobs.stats() if self.blobs is not None else None
        writer = self.writer
        with self._lock:
            return CacheStats(len(self._memory), self._bytes, disk.count if disk else 0, disk.bytes if disk else 0,
                              self.hits, self.misses, writer.queued if writer else 0,
                              writer.bytes_written if writer else 0)


def _start(checks: tuple[Check, ...]) -> None:
    for _, check in checks:
        check.start()


def _own_bytes(checkpoint: Checkpoint) -> int:
    return checkpoint.linear_nbytes + sum(segment.nbytes for segment in checkpoint.segments)
