"""One object bundling the stores, so the app opens storage with a single call."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from storage.blobs import BlobStore
from storage.chats import SessionStore
from storage.db import Database
from storage.documents import DocumentStore
from storage.summaries import SummaryStore

DEFAULT_BLOB_BUDGET_BYTES = 20 * 1024**3
BLOB_FOLDER_NAME = "states"


@dataclass(frozen=True)
class Storage:
    db: Database
    blobs: BlobStore
    documents: DocumentStore
    chats: SessionStore
    summaries: SummaryStore

    @classmethod
    def open(
        cls,
        data_dir: Path | str,
        url: str | None = None,
        blob_budget_bytes: int = DEFAULT_BLOB_BUDGET_BYTES,
        migrate: bool = True,
    ) -> Storage:
        """Open (and by default migrate) the database and wire up every store.

        Checkpoint files live in ``data_dir / "states"`` even when the
        database is remote, because they are only useful on this machine.
        """
        db = Database(url, Path(data_dir))
        if migrate:
            db.upgrade()
        blobs = BlobStore(db, Path(data_dir) / BLOB_FOLDER_NAME, blob_budget_bytes)
        return cls(
            db=db,
            blobs=blobs,
            documents=DocumentStore(db, blobs),
            chats=SessionStore(db),
            summaries=SummaryStore(db),
        )

    def close(self) -> None:
        self.db.dispose()
