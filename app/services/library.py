"""Adding uploads to the library: extract, skip duplicates, count tokens, store.

Each file gets its own result so one bad upload never hides what happened to the others.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Literal

from ingest import IngestError, extract
from ingest.model import sha256_hex
from storage import DocumentInfo, DocumentStore, SearchHit, StorageError

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
    then stored without a count rather than rejected.
    """

    def __init__(
        self,
        documents: DocumentStore,
        *,
        count_tokens: TokenCounter | None = None,
        tokenizer_id: str | None = None,
        max_bytes: int | None = None,
    ) -> None:
        self.documents = documents
        self.count_tokens = count_tokens
        self.tokenizer_id = tokenizer_id
        self.max_bytes = max_bytes

    def add(self, data: bytes, filename: str) -> UploadResult:
        """Store one uploaded file unless identical bytes are already in the library."""
        existing = self.documents.get_by_sha256(sha256_hex(data))
        if existing is not None:
            return UploadResult(filename, "duplicate", existing, "Already in the library.")
        try:
            extracted = extract(data, filename, max_bytes=self.max_bytes)
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
        return UploadResult(filename, "added", document, "Added.", tuple(extracted.warnings))

    def add_many(self, files: Iterable[tuple[str, bytes]]) -> list[UploadResult]:
        return [self.add(data, filename) for filename, data in files]

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
