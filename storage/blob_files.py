"""File-system side of the checkpoint store: naming, hashing and crash-safe writes.

A state file is first written under a temporary name in the destination
folder, flushed with fsync, renamed over its final name (atomic on POSIX and
Windows) and the folder itself is fsynced so the rename survives a power
loss.  Readers therefore see either no file or a complete one.

Integrity is checked per block: sealing a file records the SHA-256 of every
``BLOCK_SIZE``-byte block, and a reader verifies blocks in the background
(``BlockCheck``) while it already uses the file, instead of hashing a file of
several gigabytes before the first byte is used.
"""

from __future__ import annotations

import hashlib
import logging
import os
import queue
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path

from storage.errors import StorageError, translate_os_error

BLOB_SUFFIX = ".state"
TEMP_PREFIX = ".writing-"
TEMP_SUFFIX = ".part"
BLOCK_SIZE = 64 << 20
_CHUNK = 1 << 20
# Threads hashing one file's blocks: hashlib releases the GIL, so they run in parallel.
VERIFY_THREADS = max(1, min(4, (os.cpu_count() or 2) // 2))


def file_sha256(path: Path) -> str:
    """Hash a file in chunks so multi-gigabyte states do not need to fit in memory."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def blob_name(key: str, checksum: str) -> str:
    """File name for a checkpoint: derived from hashes only, so keys never reach the file system.

    Including part of the content checksum gives every version of a key its
    own file, so replacing or evicting one version never deletes a file that
    another process has just written for the same key.
    """
    key_hash = hashlib.sha256(key.encode("utf-8")).hexdigest()[:40]
    return f"{key_hash}-{checksum[:16]}{BLOB_SUFFIX}"


def is_ours(name: str) -> bool:
    """Whether a folder entry was created by this store (other files are never touched)."""
    return name.endswith(BLOB_SUFFIX) or name.startswith(TEMP_PREFIX)


def write_temp(folder: Path, write: Callable[[Path], None]) -> Path:
    """Let ``write`` fill a fresh temporary file in ``folder``; on any failure remove it.

    ``OSError`` from the writer (a full disk, say) becomes ``BlobWriteError``;
    other exceptions are the writer's own and propagate unchanged.
    """
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, raw = tempfile.mkstemp(prefix=TEMP_PREFIX, suffix=TEMP_SUFFIX, dir=folder)
        os.close(fd)
    except OSError as error:
        raise translate_os_error(error, "create a model state file in the cache folder") from error
    temp = Path(raw)
    try:
        write(temp)
    except OSError as error:
        temp.unlink(missing_ok=True)
        raise translate_os_error(error, "write the model state file") from error
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
    return temp


def block_digests(path: Path, block_size: int = BLOCK_SIZE) -> list[str]:
    """SHA-256 of each ``block_size``-byte block of the file (the last one may be shorter)."""
    digests = []
    with path.open("rb") as handle:
        while True:
            digest = hashlib.sha256()
            left = block_size
            while left and (chunk := handle.read(min(_CHUNK * 16, left))):
                digest.update(chunk)
                left -= len(chunk)
            if left == block_size:
                return digests
            digests.append(digest.hexdigest())


def root_checksum(digests: list[str]) -> str:
    """The checksum a row keeps for a block-checked file: SHA-256 over its block digests."""
    return hashlib.sha256("\n".join(digests).encode("ascii")).hexdigest()


def seal(temp: Path, block_size: int = BLOCK_SIZE) -> tuple[str, int, list[str]]:
    """Flush the finished file to disk; return its root checksum, size and block digests.

    An empty or absent file means the writer saved somewhere else (some
    libraries append their own suffix); storing it would cache nothing.
    """
    try:
        if not temp.is_file() or temp.stat().st_size == 0:
            raise StorageError("The model state writer did not write anything to the file it was given.")
        with temp.open("r+b") as handle:
            os.fsync(handle.fileno())
        digests = block_digests(temp, block_size)
        return root_checksum(digests), temp.stat().st_size, digests
    except OSError as error:
        raise translate_os_error(error, "save the model state file") from error


class _Workers:
    """A few daemon threads running submitted calls, started once: starting threads for every
    check costs a scheduler round trip each on a busy machine, on the request path."""

    def __init__(self, count: int):
        self.count = count
        self._calls: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._started = False

    def submit(self, call: Callable[[], None]) -> None:
        with self._lock:
            if not self._started:
                self._started = True
                for _ in range(self.count):
                    threading.Thread(target=self._run, name="checkpoint-verify", daemon=True).start()
        self._calls.put(call)

    def _run(self) -> None:
        while True:
            call = self._calls.get()
            try:
                call()
            except Exception:  # a check reports its own failures; this keeps the worker alive
                logging.getLogger(__name__).exception("checkpoint verification worker")


# Hashing threads plus one that reads ahead.
_WORKERS = _Workers(VERIFY_THREADS + 1)


class BlockCheck:
    """Verifies a file's blocks against their digests on background threads.

    ``wait()`` returns True once every block matched, False as soon as one did not (or the file
    could not be read). Reading the file also brings it into the page cache for its user.
    """

    def __init__(self, path: Path, block_size: int, digests: list[str], threads: int = VERIFY_THREADS,
                 start: bool = True):
        self.path, self.block_size, self.digests = path, block_size, list(digests)
        self.failed_block: int | None = None
        self._next = 0
        self._lock = threading.Lock()
        self._done = threading.Event()
        self._running = max(1, min(threads, len(self.digests)))
        self._started = False
        if start:
            self.start()

    def start(self) -> None:
        """Start the threads (once); a check made with ``start=False`` waits for this."""
        with self._lock:
            if self._started:
                return
            self._started = True
        if hasattr(os, "posix_fadvise"):
            _WORKERS.submit(self._read_ahead)
        for _ in range(self._running):
            _WORKERS.submit(self._work)

    def wait(self, timeout: float | None = None) -> bool:
        self.start()
        self._done.wait(timeout)
        return self._done.is_set() and self.failed_block is None

    @property
    def finished(self) -> bool:
        return self._done.is_set()

    def _work(self) -> None:
        index = 0
        try:
            fd = os.open(self.path, os.O_RDONLY)
        except OSError:
            fd = None
            self._fail(0)
        try:
            buffer = bytearray(min(self.block_size, _CHUNK * 16))
            while fd is not None and self.failed_block is None:
                with self._lock:
                    index, self._next = self._next, self._next + 1
                if index >= len(self.digests):
                    break
                if self._hash_block(fd, index, buffer) != self.digests[index]:
                    self._fail(index)
        except OSError:
            self._fail(index)
        finally:
            if fd is not None:
                os.close(fd)
            with self._lock:
                self._running -= 1
                if self._running == 0:
                    self._done.set()

    def _read_ahead(self) -> None:
        """Ask the disk for the whole file in order, so that both the hashing and whoever maps the
        file find its pages cached instead of faulting them in a few at a time."""
        try:
            fd = os.open(self.path, os.O_RDONLY)
        except OSError:
            return
        try:
            for index in range(len(self.digests)):
                if self._done.is_set():
                    break
                os.posix_fadvise(fd, index * self.block_size, self.block_size, os.POSIX_FADV_WILLNEED)
        except OSError:
            pass
        finally:
            os.close(fd)

    def _hash_block(self, fd: int, index: int, buffer: bytearray) -> str:
        digest = hashlib.sha256()
        view = memoryview(buffer)
        offset, end = index * self.block_size, (index + 1) * self.block_size
        while offset < end:
            count = os.preadv(fd, [view[:min(len(view), end - offset)]], offset)
            if count == 0:
                break
            digest.update(view[:count])
            offset += count
        return digest.hexdigest()

    def _fail(self, index: int) -> None:
        with self._lock:
            if self.failed_block is None:
                self.failed_block = index
        self._done.set()


def install(temp: Path, target: Path) -> None:
    """Atomically move the sealed file into place and persist the rename."""
    try:
        os.replace(temp, target)
    except OSError as error:
        temp.unlink(missing_ok=True)
        raise translate_os_error(error, "save the model state file") from error
    fsync_dir(target.parent)


def fsync_dir(folder: Path) -> None:
    """Persist directory entries; skipped where directories cannot be opened (Windows)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
