"""Adding uploads to the library: extract, skip duplicates, count tokens, store.

Each file gets its own result so one bad upload never hides what happened to the others.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Literal

from ingest import IngestError, IngestSettings, extract
from ingest.model import sha256_hex
from ingest.watchdog import ProgressCallback
from storage import DocumentInfo, DocumentStore, SearchHit, StorageError

from .uploads import JobStatus, UploadQueue

log = logging.getLogger(__name__)

UploadStatus = Literal["added", "duplicate", "failed"]
TokenCounter = Callable[[str], int]


@dataclass(frozen=True, slots=True)
class UploadResult:
    """What happened to one uploaded file; ``message`` is written for the person who uploaded it."""

    filename: str
    status: UploadStatus
    document: DocumentInfo | None = None
    message: str = ""
    warnings: tuple[str, ...] = ()

    @property
    def ok(self) -> bool:
        return self.status != "failed"


@dataclass(frozen=True, slots=True)
class DocumentHits:
    """Search hits of one document, grouped by page (or section) number in reading order."""

    document_id: int
    title: str
    pages: dict[int, list[SearchHit]] = field(default_factory=dict)

    @property
    def count(self) -> int:
        return sum(len(hits) for hits in self.pages.values())


class Library:
    """Upload handling on top of :class:`DocumentStore`.

    ``count_tokens`` may fail (for instance while the model is unavailable); the document is
    then stored without a count rather than rejected. :meth:`add` reads a file now;
    :meth:`submit` queues it, so that at most ``workers`` files are read at once.
    ``on_added`` hears of each document added (the app queues a read ahead of questions).
    """

    def __init__(
        self,
        documents: DocumentStore,
        *,
        count_tokens: TokenCounter | None = None,
        tokenizer_id: str | None = None,
        max_bytes: int | None = None,
        ingest_settings: IngestSettings | None = None,
        workers: int = 2,
        on_added: Callable[[DocumentInfo], None] | None = None,
    ) -> None:
        self.documents = documents
        self.count_tokens = count_tokens
        self.tokenizer_id = tokenizer_id
        self.max_bytes = max_bytes
        self.ingest_settings = ingest_settings
        self.on_added = on_added
        self.queue = UploadQueue(self._read_queued, workers)
        self._submit_lock = threading.Lock()
        self._latest_by_content: dict[str, int] = {}

    def add(self, data: bytes, filename: str, progress: ProgressCallback | None = None) -> UploadResult:
        """Store one uploaded file unless identical bytes are already in the library."""
        existing = self.documents.get_by_sha256(sha256_hex(data))
        if existing is not None:
            return UploadResult(filename, "duplicate", existing, "Already in the library.")
        try:
            extracted = extract(
                data, filename, max_bytes=self.max_bytes, settings=self.ingest_settings, progress=progress
            )
        except IngestError as error:
            return UploadResult(filename, "failed", message=error.message)
        tokens = self._count(extracted.text)
        try:
            document, created = self.documents.add_document(
                extracted, filename, tokens, self.tokenizer_id if tokens is not None else None
            )
        except StorageError as error:
            return UploadResult(filename, "failed", message=str(error))
        if not created:
            return UploadResult(filename, "duplicate", document, "Already in the library.")
        self._announce(document)
        return UploadResult(filename, "added", document, "Added.", tuple(extracted.warnings))

    def add_many(self, files: Iterable[tuple[str, bytes]]) -> list[UploadResult]:
        return [self.add(data, filename) for filename, data in files]

    def submit(self, data: bytes, filename: str) -> int:
        """Queue a file for reading and return its job id (see :meth:`status`).

        A file with the same bytes as one still queued or being read waits for it, so the first
        one chosen is the one added and the other is reported as its duplicate.
        """
        sha256 = sha256_hex(data)
        existing = self.documents.get_by_sha256(sha256)
        if existing is not None:
            duplicate = UploadResult(filename, "duplicate", existing, "Already in the library.")
            return self.queue.finish_now(filename, duplicate)
        with self._submit_lock:
            self._forget_finished()
            earlier = self._latest_by_content.get(sha256)
            job_id = self.queue.submit(data, filename, after=earlier)
            self._latest_by_content[sha256] = job_id
            return job_id

    def _forget_finished(self) -> None:
        for sha256, job_id in list(self._latest_by_content.items()):
            status = self.queue.status(job_id)
            if status is None or status.state == "done":
                del self._latest_by_content[sha256]

    def status(self, job_id: int) -> JobStatus | None:
        return self.queue.status(job_id)

    def _read_queued(self, data: bytes, filename: str, progress: ProgressCallback) -> UploadResult:
        try:
            return self.add(data, filename, progress)
        except Exception as error:  # e.g. the database went away: say so instead of losing the file silently
            log.exception("adding %s failed", filename)
            return UploadResult(filename, "failed", message=f"The file could not be added ({type(error).__name__}).")

    def _announce(self, document: DocumentInfo) -> None:
        if self.on_added is None:
            return
        try:
            self.on_added(document)
        except Exception:  # the document is stored; a failed follow-up must not turn that into a failure
            log.exception("after adding %s", document.filename)

    def _count(self, text: str) -> int | None:
        if self.count_tokens is None:
            return None
        try:
            return self.count_tokens(text)
        except Exception:  # a broken tokenizer must not block uploads
            log.exception("token count failed")
            return None

    def search(self, query: str, limit: int = 200) -> list[DocumentHits]:
        """Text search across the library, hits grouped by document, then page."""
        return group_hits(self.documents.search(query, limit=limit))


def group_hits(hits: Sequence[SearchHit]) -> list[DocumentHits]:
    grouped: dict[int, DocumentHits] = {}
    for hit in hits:
        entry = grouped.setdefault(hit.document_id, DocumentHits(hit.document_id, hit.document_title))
        entry.pages.setdefault(hit.unit_number, []).append(hit)
    return list(grouped.values())
