"""Two-tier cache of model states: an in-memory LRU and checkpoint files on disk."""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from dataclasses import dataclass

from model import ModelState, StateError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CacheStats:
    memory_entries: int
    memory_bytes: int
    disk_entries: int
    disk_bytes: int
    hits: int
    misses: int

    @property
    def hit_rate(self) -> float:
        total = self.hits + self.misses
        return self.hits / total if total else 0.0


class StateCache:
    """Never hands out a cached object: `get` returns a clone, `put` stores one."""

    def __init__(self, lm, blobs=None, memory_budget_bytes: int = 2 << 30):
        self.lm, self.blobs, self.budget = lm, blobs, memory_budget_bytes
        self._memory: OrderedDict[str, ModelState] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self.hits = self.misses = 0

    def get(self, key: str) -> ModelState | None:
        with self._lock:
            state = self._memory.get(key)
            if state is not None:
                self._memory.move_to_end(key)
                return state.clone()
        if self.blobs is None:
            return None
        path = self.blobs.get(key, self.lm.fingerprint)
        if path is None:
            return None
        try:
            state = self.lm.load_state(path)
        except (StateError, OSError) as exc:
            log.warning("dropping unreadable checkpoint %s: %s", key, exc)
            self.blobs.delete(key)
            return None
        self._remember(key, state.clone())
        return state

    def longest_prefix(self, keys: list[str]) -> tuple[int, ModelState | None]:
        """(number of leading segments covered, state) for the longest cached prefix."""
        for count in range(len(keys), 0, -1):
            state = self.get(keys[count - 1])
            if state is not None:
                self.hits += 1
                return count, state
        self.misses += 1
        return 0, None

    def put(self, key: str, state: ModelState, depends_on: tuple[str, ...] = (), disk: bool = True) -> None:
        self._remember(key, state.clone())
        if disk and self.blobs is not None:
            self.blobs.put(key, self.lm.fingerprint, state.seen_tokens, state.save, depends_on=depends_on)

    def _remember(self, key: str, state: ModelState) -> None:
        size = state.nbytes()
        if size > self.budget:
            return
        with self._lock:
            old = self._memory.pop(key, None)
            if old is not None:
                self._bytes -= old.nbytes()
            self._memory[key] = state
            self._bytes += size
            while self._bytes > self.budget:
                _, evicted = self._memory.popitem(last=False)
                self._bytes -= evicted.nbytes()

    def clear_memory(self) -> None:
        with self._lock:
            self._memory.clear()
            self._bytes = 0

    def stats(self) -> CacheStats:
        disk = self.blobs.stats() if self.blobs is not None else None
        with self._lock:
            return CacheStats(len(self._memory), self._bytes, disk.count if disk else 0, disk.bytes if disk else 0,
                              self.hits, self.misses)
