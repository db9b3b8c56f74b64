"""File-system side of the checkpoint store: naming, hashing and crash-safe writes.

A state file is first written under a temporary name in the destination
folder, flushed with fsync, renamed over its final name (atomic on POSIX and
Windows) and the folder itself is fsynced so the rename survives a power
loss.  Readers therefore see either no file or a complete one.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

from storage.errors import StorageError, translate_os_error

BLOB_SUFFIX = ".state"
TEMP_PREFIX = ".writing-"
TEMP_SUFFIX = ".part"
_CHUNK = 1 << 20


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


def seal(temp: Path) -> tuple[str, int]:
    """Flush the finished file to disk and return its SHA-256 and size.

    An empty or absent file means the writer saved somewhere else (some
    libraries append their own suffix); storing it would cache nothing.
    """
    try:
        if not temp.is_file() or temp.stat().st_size == 0:
            raise StorageError("The model state writer did not write anything to the file it was given.")
        with temp.open("r+b") as handle:
            os.fsync(handle.fileno())
        return file_sha256(temp), temp.stat().st_size
    except OSError as error:
        raise translate_os_error(error, "save the model state file") from error


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
