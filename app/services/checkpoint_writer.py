"""Background persistence of checkpoints: the answer never waits for the disk.

One writer thread per blob store (shared by every cache over that store, so a cache made
later in the same process finds what an earlier one has not written yet) writes queued
checkpoints in order. A checkpoint whose chain contains one already on disk is written as an
extension of it: its file holds only the K/V added since, plus the recurrent states. Files go
through `BlobStore.put` (temporary name, fsync, rename, then the row), so a crash mid-write
leaves a stray temporary file and no row: nothing that is ever read.
"""

from __future__ import annotations

import logging
import threading
import weakref
from collections import deque
from dataclasses import dataclass

from model.checkpoint import Checkpoint, Lineage
from model.checkpoint_file import save_checkpoint

log = logging.getLogger(__name__)
# A writer's thread ends after this long without work (and starts again on the next checkpoint).
IDLE_S = 30.0


@dataclass(frozen=True)
class _Job:
    key: str
    fingerprint: str
    checkpoint: Checkpoint
    depends_on: tuple[str, ...]


@dataclass(frozen=True)
class DiskIdentity:
    """The file version a checkpoint was written to or read from."""

    key: str
    checksum: str


class CheckpointWriter:
    """Writes checkpoints to `blobs` on a background thread, oldest first."""

    def __init__(self, blobs):
        self._blobs = weakref.ref(blobs)  # the registry below is keyed by the store: no cycle
        self._jobs: deque[_Job] = deque()
        self._current: _Job | None = None
        self._lock = threading.Condition()
        self._identities: weakref.WeakKeyDictionary[Lineage, DiskIdentity] = weakref.WeakKeyDictionary()
        self._running = False
        self.bytes_written = self.files_written = self.failures = 0

    @property
    def blobs(self):
        return self._blobs()

    def submit(self, key: str, fingerprint: str, checkpoint: Checkpoint, depends_on=()) -> None:
        with self._lock:
            self._jobs.append(_Job(key, fingerprint, checkpoint, tuple(depends_on)))
            self._lock.notify_all()
            if not self._running:
                self._running = True
                threading.Thread(target=self._work, name="checkpoint-writer", daemon=True).start()

    def pending(self, key: str, fingerprint: str) -> Checkpoint | None:
        """The newest checkpoint queued (or being written) for `key`, if any."""
        with self._lock:
            jobs = [*([self._current] if self._current is not None else []), *self._jobs]
        for job in reversed(jobs):
            if job.key == key and job.fingerprint == fingerprint:
                return job.checkpoint
        return None

    @property
    def queued(self) -> int:
        with self._lock:
            return len(self._jobs) + (self._current is not None)

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until everything submitted so far is written (or failed); False on timeout."""
        with self._lock:
            return self._lock.wait_for(lambda: not self._jobs and self._current is None, timeout)

    def register(self, checkpoint: Checkpoint, key: str, checksum: str) -> None:
        """Remember that `checkpoint` is on disk as this version of `key` (others may extend it)."""
        with self._lock:
            self._identities[checkpoint.lineage] = DiskIdentity(key, checksum)

    def identity(self, lineage: Lineage) -> DiskIdentity | None:
        with self._lock:
            return self._identities.get(lineage)

    def _work(self) -> None:
        while True:
            with self._lock:
                if not self._lock.wait_for(lambda: self._jobs, IDLE_S):
                    self._running = False
                    return
                self._current = self._jobs.popleft()
            try:
                self._write(self._current)
            except Exception:  # the next checkpoint still gets written; this one is just not cached
                self.failures += 1
                log.exception("writing checkpoint %s failed", self._current.key)
            finally:
                with self._lock:
                    self._current = None
                    self._lock.notify_all()

    def _write(self, job: _Job) -> None:
        blobs = self.blobs
        if blobs is None:
            return
        base_tokens, parent = self._disk_base(blobs, job.checkpoint)
        info = blobs.put(
            job.key, job.fingerprint, job.checkpoint.seen_tokens,
            lambda path: save_checkpoint(job.checkpoint, path, base_tokens),
            depends_on=job.depends_on, parent=(parent.key, parent.checksum) if parent is not None else None,
        )
        if info is not None:
            self.register(job.checkpoint, job.key, info.checksum)
            self.bytes_written += info.size_bytes
            self.files_written += 1

    def _disk_base(self, blobs, checkpoint: Checkpoint) -> tuple[int, DiskIdentity | None]:
        """The nearest ancestor whose file is still stored: the new file extends it."""
        ancestor = checkpoint.lineage.parent
        while ancestor is not None:
            identity = self.identity(ancestor)
            if identity is not None:
                info = blobs.info(identity.key)
                if info is not None and info.checksum == identity.checksum:
                    return ancestor.seen_tokens, identity
            ancestor = ancestor.parent
        return 0, None


_writers: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_writers_lock = threading.Lock()


def writer_for(blobs) -> CheckpointWriter:
    """The one writer of this blob store in this process."""
    with _writers_lock:
        writer = _writers.get(blobs)
        if writer is None:
            writer = _writers[blobs] = CheckpointWriter(blobs)
        return writer
