"""Model state checkpoints: large files on disk, bookkeeping rows in the database.

A checkpoint lets the model skip re-reading a long document.  Files are
written atomically (see ``storage.blob_files``) and verified against a
stored SHA-256 on every read, because loading a truncated
or corrupted state would silently produce wrong answers.  Total size is kept
under a byte budget by evicting the least recently used checkpoints.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Collection, Iterable
from pathlib import Path

from sqlalchemy import ColumnElement, and_, delete, func, select, true, update
from sqlalchemy.orm import Session

from storage.blob_files import blob_name, file_sha256, install, is_ours, seal, write_temp
from storage.db import Database
from storage.dto import BlobStats, CheckpointInfo
from storage.errors import ConflictError, StorageError
from storage.models import StateCheckpoint, utcnow

log = logging.getLogger(__name__)

MAX_KEY_LENGTH = 512


class BlobStore:
    """Checkpoint files in ``folder`` with their rows in ``db``, capped at ``budget_bytes``."""

    def __init__(self, db: Database, folder: Path | str, budget_bytes: int) -> None:
        if budget_bytes <= 0:
            raise ValueError("budget_bytes must be positive")
        self.db = db
        self.folder = Path(folder)
        self.budget_bytes = budget_bytes

    def put(
        self,
        key: str,
        fingerprint: str,
        token_count: int,
        write: Callable[[Path], None],
        depends_on: Iterable[str] = (),
    ) -> CheckpointInfo | None:
        """Store a checkpoint written by ``write(path)`` and return its bookkeeping.

        ``write`` receives a temporary path in the blob folder and must leave
        the complete state there.  If it raises, nothing is recorded and the
        temporary file is removed; an ``OSError`` (such as a full disk) is
        reported as ``BlobWriteError``, anything else propagates unchanged.
        Returns None when the file alone exceeds the budget, because storing
        it would evict everything else and then itself (or when a concurrent
        writer evicted it again straight away).
        """
        _check_key(key)
        temp = write_temp(self.folder, write)
        try:
            checksum, size = seal(temp)
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
            replaced = self._record(key, fingerprint, token_count, name, checksum, size, depends_on)
        except BaseException:
            self._discard_unreferenced(name)
            raise
        if replaced and replaced != name:
            self._remove_files([replaced])
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
        callers should treat a failed load as a miss too.
        """
        try:
            return self._get(key, fingerprint)
        except (StorageError, OSError) as error:
            log.warning("checkpoint lookup for %s failed: %s", key, error)
            return None

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
            names = _delete_where(session, StateCheckpoint.key == key)
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
            names = _delete_where(session, true())
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

    def _get(self, key: str, fingerprint: str) -> Path | None:
        with self.db.session(readonly=True) as session:
            row = session.scalar(select(StateCheckpoint).where(StateCheckpoint.key == key))
            if row is None or row.model_fingerprint != fingerprint:
                return None
            name, expected = row.path, row.checksum
        path = self.folder / name
        try:
            actual = file_sha256(path)
        except FileNotFoundError:
            actual = None
        if actual != expected:
            log.warning("checkpoint %s is %s; discarding it", key, "missing" if actual is None else "corrupt")
            self._discard_if_unchanged(key, name, expected)
            return None
        with self.db.session() as session:
            session.execute(
                update(StateCheckpoint)
                .where(StateCheckpoint.key == key, StateCheckpoint.checksum == expected)
                .values(last_used_at=utcnow())
            )
        return path

    def _record(
        self,
        key: str,
        fingerprint: str,
        token_count: int,
        name: str,
        checksum: str,
        size: int,
        depends_on: Iterable[str],
    ) -> str | None:
        """Insert or update the row for ``key``; returns the file name it used to point at.

        A concurrent insert of the same key (possible on PostgreSQL) surfaces
        as a conflict, after which the now-existing row is updated instead.
        """
        values = {
            "model_fingerprint": fingerprint,
            "token_count": token_count,
            "size_bytes": size,
            "path": name,
            "checksum": checksum,
            "depends_on": sorted(set(depends_on)),
        }
        for attempt in range(2):
            try:
                with self.db.session() as session:
                    return self._upsert(session, key, values)
            except ConflictError:
                if attempt:
                    raise
        return None

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
        """Drop least recently used checkpoints until the total fits the budget."""
        with self.db.session() as session:
            rows = session.execute(
                select(StateCheckpoint.id, StateCheckpoint.path, StateCheckpoint.size_bytes).order_by(
                    StateCheckpoint.last_used_at, StateCheckpoint.id
                )
            ).all()
            total = sum(row.size_bytes for row in rows)
            doomed: list[int] = []
            for row in rows:
                if total <= self.budget_bytes:
                    break
                doomed.append(row.id)
                total -= row.size_bytes
            names = _delete_where(session, StateCheckpoint.id.in_(doomed)) if doomed else []
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
        return _delete_where(session, StateCheckpoint.id.in_(doomed)) if doomed else []

    def _discard_if_unchanged(self, key: str, name: str, checksum: str) -> None:
        """Remove a bad checkpoint unless another process replaced it meanwhile."""
        with self.db.session() as session:
            names = _delete_where(
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


def _delete_where(session: Session, condition: ColumnElement[bool]) -> list[str]:
    """Delete matching rows and return their file names (RETURNING is not portable to every backend)."""
    names = list(session.scalars(select(StateCheckpoint.path).where(condition)))
    if names:
        session.execute(delete(StateCheckpoint).where(condition))
    return names


def _check_key(key: str) -> None:
    if not key:
        raise ValueError("checkpoint key must not be empty")
    if len(key) > MAX_KEY_LENGTH:
        raise ValueError(f"checkpoint key is longer than {MAX_KEY_LENGTH} characters; hash it first")
