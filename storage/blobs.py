"""Model state checkpoints: large files on disk, bookkeeping rows in the database.

A checkpoint lets the model skip re-reading a long document.  Files are
written atomically (see ``storage.blob_files``) and verified against stored
per-block SHA-256 digests, because using a truncated or corrupted state would
silently produce wrong answers: ``get`` verifies the whole file before
returning it, ``open`` returns at once and leaves the caller to run the
block check (``BlobHandle.check``) while it uses the file, and to drop what
it computed if the check fails.  A checkpoint may extend a parent checkpoint
(its file then holds only what it added); it is removed whenever its parent
is, and ``open`` refuses it if its parent changed.  Total size is kept under
a byte budget by evicting the least recently used checkpoints.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import and_, func, select, true, update
from sqlalchemy.orm import Session

from storage.blob_files import BLOCK_SIZE, BlockCheck, blob_name, install, is_ours, seal, write_temp
from storage.blob_rows import chain, delete_where, has_version, least_recent_over_budget
from storage.db import Database
from storage.dto import BlobStats, CheckpointInfo
from storage.errors import ConflictError, StorageError
from storage.models import StateCheckpoint, utcnow

log = logging.getLogger(__name__)

MAX_KEY_LENGTH = 512


@dataclass(frozen=True)
class BlobHandle:
    """A checkpoint file as ``open`` found it: usable at once, not yet verified.

    ``parent_key`` names the checkpoint this one extends (None for a complete one).
    """

    key: str
    path: Path
    size: int
    checksum: str
    token_count: int
    parent_key: str | None
    block_size: int
    block_digests: tuple[str, ...]

    def check(self, start: bool = True) -> BlockCheck:
        """Verify every block in the background (from now, or from ``BlockCheck.start``)."""
        return BlockCheck(self.path, self.block_size, list(self.block_digests), start=start)

    def verify(self) -> bool:
        return self.check().wait()


class BlobStore:
    """Checkpoint files in ``folder`` with their rows in ``db``, capped at ``budget_bytes``."""

    def __init__(self, db: Database, folder: Path | str, budget_bytes: int, block_size: int = BLOCK_SIZE) -> None:
        if budget_bytes <= 0 or block_size <= 0:
            raise ValueError("budget_bytes and block_size must be positive")
        self.db = db
        self.folder = Path(folder)
        self.budget_bytes = budget_bytes
        self.block_size = block_size

    def put(
        self,
        key: str,
        fingerprint: str,
        token_count: int,
        write: Callable[[Path], None],
        depends_on: Iterable[str] = (),
        parent: tuple[str, str] | None = None,
    ) -> CheckpointInfo | None:
        """Store a checkpoint written by ``write(path)`` and return its bookkeeping.

        ``write`` receives a temporary path in the blob folder and must leave
        the complete state there.  If it raises, nothing is recorded and the
        temporary file is removed; an ``OSError`` (such as a full disk) is
        reported as ``BlobWriteError``, anything else propagates unchanged.
        ``parent`` is (key, checksum) of the checkpoint this file extends.
        Returns None when the file alone exceeds the budget, because storing
        it would evict everything else and then itself (or when a concurrent
        writer evicted it again straight away), or when the parent is gone.
        """
        _check_key(key)
        temp = write_temp(self.folder, write)
        try:
            checksum, size, digests = seal(temp, self.block_size)
        except BaseException:
            temp.unlink(missing_ok=True)
            raise
        if size > self.budget_bytes:
            temp.unlink(missing_ok=True)
            log.info("checkpoint %s (%d bytes) exceeds the %d byte budget", key, size, self.budget_bytes)
            return None
        name = blob_name(key, checksum)
        install(temp, self.folder / name)
        try:
            recorded, stale = self._record(key, fingerprint, token_count, name, checksum, size, depends_on,
                                           parent, digests)
        except BaseException:
            self._discard_unreferenced(name)
            raise
        self._remove_files(stale)
        if not recorded:
            log.info("checkpoint %s was not kept: the checkpoint it extends is gone", key)
            self._discard_unreferenced(name)
            return None
        try:
            self._evict()
        except StorageError as error:
            log.warning("checkpoint eviction failed, the cache may exceed its budget for now: %s", error)
        return self.info(key)

    def get(self, key: str, fingerprint: str) -> Path | None:
        """Return the verified checkpoint file for ``key``, or None.

        None means: no such checkpoint, one made by a different model
        (left in place for when that model is used again), or a missing or
        corrupt file (removed together with its row).  Storage failures are
        logged and reported as a miss, since the caller can always recompute.
        The file may be evicted by another process after this returns, so
        callers should treat a failed load as a miss too.  Large files are
        better read through ``open``, which does not hash them first.
        """
        handle = self.open(key, fingerprint)
        if handle is None:
            return None
        if not handle.verify():
            log.warning("checkpoint %s is corrupt; discarding it", key)
            self.discard(handle)
            return None
        return handle.path

    def open(self, key: str, fingerprint: str) -> BlobHandle | None:
        """The checkpoint file for ``key``, not yet verified (see ``BlobHandle.check``), or None.

        Marks the checkpoint and every checkpoint it extends as used.  None as
        for ``get``; a file that is missing or of the wrong size, or one whose
        parent is gone or changed, is removed with its row.
        """
        try:
            return self._open(key, fingerprint)
        except (StorageError, OSError) as error:
            log.warning("checkpoint lookup for %s failed: %s", key, error)
            return None

    def discard(self, handle: BlobHandle) -> None:
        """Remove a checkpoint that failed its check (and what extends it), unless replaced meanwhile."""
        self._discard_if_unchanged(handle.key, handle.path.name, handle.checksum)

    def info(self, key: str) -> CheckpointInfo | None:
        with self.db.session(readonly=True) as session:
            row = session.scalar(select(StateCheckpoint).where(StateCheckpoint.key == key))
            return None if row is None else self._to_info(row)

    def list_checkpoints(self) -> list[CheckpointInfo]:
        """All checkpoints, most recently used first."""
        with self.db.session(readonly=True) as session:
            rows = session.scalars(select(StateCheckpoint).order_by(StateCheckpoint.last_used_at.desc()))
            return [self._to_info(row) for row in rows]

    def delete(self, key: str) -> bool:
        with self.db.session() as session:
            names = delete_where(session, StateCheckpoint.key == key)
        self._remove_files(names)
        return bool(names)

    def delete_for_documents(self, sha256s: Iterable[str]) -> int:
        """Remove every checkpoint built from any of the given documents; returns how many."""
        with self.db.session() as session:
            names = self._delete_rows_for_documents(session, sha256s)
        self._remove_files(names)
        return len(names)

    def stats(self) -> BlobStats:
        with self.db.session(readonly=True) as session:
            count, total = session.execute(
                select(func.count(StateCheckpoint.id), func.coalesce(func.sum(StateCheckpoint.size_bytes), 0))
            ).one()
        return BlobStats(count=int(count), bytes=int(total), budget_bytes=self.budget_bytes)

    def clear(self) -> int:
        """Remove every checkpoint and any stray files of ours in the folder; returns rows removed."""
        with self.db.session() as session:
            names = delete_where(session, true())
        self._remove_files(names)
        self.sweep(min_age_s=0)
        return len(names)

    def sweep(self, min_age_s: float = 3600.0) -> int:
        """Delete leftover temp files and unreferenced blobs older than ``min_age_s``.

        Such files appear only after a crash between writing and recording;
        the age threshold keeps in-flight writes of other processes safe.
        """
        if not self.folder.is_dir():
            return 0
        with self.db.session(readonly=True) as session:
            referenced = set(session.scalars(select(StateCheckpoint.path)))
        cutoff = time.time() - min_age_s
        removed = 0
        for entry in self.folder.iterdir():
            if not is_ours(entry.name) or entry.name in referenced:
                continue
            try:
                if entry.stat().st_mtime <= cutoff:
                    entry.unlink()
                    removed += 1
            except FileNotFoundError:
                continue
        return removed

    def _open(self, key: str, fingerprint: str) -> BlobHandle | None:
        handle = None
        with self.db.session() as session:
            row = session.scalar(select(StateCheckpoint).where(StateCheckpoint.key == key))
            if row is None or row.model_fingerprint != fingerprint:
                return None
            links = chain(session, row)
            path = self.folder / row.path
            try:
                intact = links is not None and path.stat().st_size == row.size_bytes
            except FileNotFoundError:
                intact = False
            if not intact:
                log.warning("checkpoint %s is %s; discarding it", key,
                            "missing" if links is not None else "cut off from the checkpoint it extends")
                doomed = delete_where(session, StateCheckpoint.id == row.id)
            else:
                doomed = []
                session.execute(update(StateCheckpoint).where(StateCheckpoint.id.in_([r.id for r in links]))
                                .values(last_used_at=utcnow()))
                block_size = row.block_size or row.size_bytes
                digests = tuple(row.block_checksums) if row.block_checksums is not None else (row.checksum,)
                handle = BlobHandle(row.key, path, row.size_bytes, row.checksum, row.token_count, row.parent_key,
                                    block_size, digests)
        self._remove_files(doomed)
        return handle

    def _record(
        self,
        key: str,
        fingerprint: str,
        token_count: int,
        name: str,
        checksum: str,
        size: int,
        depends_on: Iterable[str],
        parent: tuple[str, str] | None = None,
        digests: list[str] | None = None,
    ) -> tuple[bool, list[str]]:
        """Insert or update the row for ``key``; returns (recorded, files no longer referenced).

        Not recorded when ``parent`` is gone. Replacing a key drops its old file and the
        checkpoints that extended the old version. A concurrent insert of the same key (possible
        on PostgreSQL) surfaces as a conflict, after which the now-existing row is updated instead.
        """
        values = {
            "model_fingerprint": fingerprint,
            "token_count": token_count,
            "size_bytes": size,
            "path": name,
            "checksum": checksum,
            "depends_on": sorted(set(depends_on)),
            "parent_key": parent[0] if parent else None,
            "parent_checksum": parent[1] if parent else None,
            "block_size": self.block_size if digests is not None else None,
            "block_checksums": digests,
        }
        for attempt in range(2):
            try:
                with self.db.session() as session:
                    if parent is not None and not has_version(session, *parent):
                        return False, []
                    previous = self._upsert(session, key, values)
                    stale = [previous] if previous and previous != name else []
                    stale += delete_where(session, and_(StateCheckpoint.parent_key == key,
                                                         StateCheckpoint.parent_checksum != checksum))
                    return True, stale
            except ConflictError:
                if attempt:
                    raise
        return False, []

    @staticmethod
    def _upsert(session: Session, key: str, values: dict[str, object]) -> str | None:
        row = session.scalar(select(StateCheckpoint).where(StateCheckpoint.key == key).with_for_update())
        now = utcnow()
        if row is None:
            session.add(StateCheckpoint(key=key, created_at=now, last_used_at=now, **values))
            session.flush()
            return None
        previous = row.path
        for column, value in values.items():
            setattr(row, column, value)
        row.last_used_at = now
        return previous

    def _evict(self) -> None:
        """Drop least recently used checkpoints until the total fits the budget.

        Evicting a checkpoint evicts the checkpoints extending it too (they cannot be read alone).
        """
        with self.db.session() as session:
            rows = session.execute(
                select(StateCheckpoint.id, StateCheckpoint.key, StateCheckpoint.parent_key,
                       StateCheckpoint.size_bytes).order_by(StateCheckpoint.last_used_at, StateCheckpoint.id)
            ).all()
            doomed = least_recent_over_budget(rows, self.budget_bytes)
            names = delete_where(session, StateCheckpoint.id.in_(doomed)) if doomed else []
        if names:
            log.info("evicted %d checkpoint(s) to stay within %d bytes", len(names), self.budget_bytes)
            self._remove_files(names)

    def _delete_rows_for_documents(self, session: Session, sha256s: Iterable[str]) -> list[str]:
        """Delete matching rows inside the caller's transaction; returns file names to remove after commit.

        The dependency list is JSON, which has no portable containment query,
        so rows are filtered here; there are at most a few hundred of them.
        """
        wanted = set(sha256s)
        if not wanted:
            return []
        rows = session.execute(select(StateCheckpoint.id, StateCheckpoint.depends_on)).all()
        doomed = [row.id for row in rows if wanted.intersection(row.depends_on or ())]
        return delete_where(session, StateCheckpoint.id.in_(doomed)) if doomed else []

    def _discard_if_unchanged(self, key: str, name: str, checksum: str) -> None:
        """Remove a bad checkpoint unless another process replaced it meanwhile."""
        with self.db.session() as session:
            names = delete_where(
                session,
                and_(
                    StateCheckpoint.key == key,
                    StateCheckpoint.path == name,
                    StateCheckpoint.checksum == checksum,
                ),
            )
        self._remove_files(names)

    def _discard_unreferenced(self, name: str) -> None:
        """After a failed record, drop the new file unless an existing row already points at it."""
        try:
            with self.db.session(readonly=True) as session:
                in_use = session.scalar(select(StateCheckpoint.id).where(StateCheckpoint.path == name))
        except StorageError:
            in_use = None
        if in_use is None:
            self._remove_files([name])

    def _remove_files(self, names: Collection[str]) -> None:
        for name in names:
            try:
                (self.folder / name).unlink(missing_ok=True)
            except OSError as error:
                log.warning("could not remove checkpoint file %s: %s", name, error)

    def _to_info(self, row: StateCheckpoint) -> CheckpointInfo:
        return CheckpointInfo(
            key=row.key,
            model_fingerprint=row.model_fingerprint,
            token_count=row.token_count,
            size_bytes=row.size_bytes,
            path=self.folder / row.path,
            checksum=row.checksum,
            depends_on=tuple(row.depends_on or ()),
            created_at=row.created_at,
            last_used_at=row.last_used_at,
        )


def _check_key(key: str) -> None:
    if not key:
        raise ValueError("checkpoint key must not be empty")
    if len(key) > MAX_KEY_LENGTH:
        raise ValueError(f"checkpoint key is longer than {MAX_KEY_LENGTH} characters; hash it first")
