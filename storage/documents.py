"""Stored documents: adding (with dedup), listing, text search and deletion."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, is_dataclass
from typing import Any

from sqlalchemy import Select, func, select
from sqlalchemy.orm import defer

from storage.blobs import BlobStore
from storage.db import Database
from storage.dto import DocumentInfo, ExtractedDocumentLike, SearchHit, UnitInfo
from storage.errors import ConflictError, NotFoundError
from storage.models import Document, DocumentUnit, utcnow

SNIPPET_RADIUS = 80
_SEARCH_BATCH = 200


def clean_text(text: str) -> str:
    """Replace NUL characters, which PostgreSQL cannot store, keeping every offset unchanged."""
    return text.replace("\x00", "\ufffd")


def metadata_dict(metadata: Any) -> dict[str, Any]:
    """Accept metadata as a mapping or a dataclass (as ``ingest`` produces) and store it as a dict."""
    if metadata is None:
        return {}
    if is_dataclass(metadata) and not isinstance(metadata, type):
        return asdict(metadata)
    if isinstance(metadata, Mapping):
        return dict(metadata)
    return dict(vars(metadata))


def json_safe(value: Any) -> Any:
    """Round-trip through JSON so odd metadata values (dates, bytes, tuples) cannot break a write."""
    return json.loads(json.dumps(value, default=str))


class DocumentStore:
    """The app's entry point for documents; deleting one also drops its model state checkpoints."""

    def __init__(self, db: Database, blobs: BlobStore) -> None:
        self.db = db
        self.blobs = blobs

    def add_document(
        self,
        extracted: ExtractedDocumentLike,
        filename: str,
        token_count: int | None = None,
        tokenizer_id: str | None = None,
    ) -> tuple[DocumentInfo, bool]:
        """Store an extracted document unless identical bytes were stored before.

        Returns the stored document and whether it was created now.  An
        existing document is returned untouched, so re-uploading a file keeps
        its chat sessions and checkpoints valid.
        """
        existing = self.get_by_sha256(extracted.sha256)
        if existing is not None:
            return existing, False
        try:
            with self.db.session() as session:
                found = session.scalar(select(Document).where(Document.sha256 == extracted.sha256))
                if found is not None:
                    return _document_info(found), False
                document = _build_document(extracted, filename, token_count, tokenizer_id)
                session.add(document)
                session.flush()
                return _document_info(document), True
        except ConflictError:
            winner = self.get_by_sha256(extracted.sha256)
            if winner is None:
                raise
            return winner, False

    def list_documents(self) -> list[DocumentInfo]:
        """All documents, newest first."""
        with self.db.session(readonly=True) as session:
            rows = session.scalars(_info_query().order_by(Document.created_at.desc(), Document.id.desc()))
            return [_document_info(row) for row in rows]

    def get_document(self, document_id: int) -> DocumentInfo | None:
        with self.db.session(readonly=True) as session:
            row = session.scalar(_info_query().where(Document.id == document_id))
            return None if row is None else _document_info(row)

    def get_by_sha256(self, sha256: str) -> DocumentInfo | None:
        with self.db.session(readonly=True) as session:
            row = session.scalar(_info_query().where(Document.sha256 == sha256))
            return None if row is None else _document_info(row)

    def get_text(self, document_id: int) -> str:
        """The full extracted text; kept out of ``DocumentInfo`` because it can be megabytes."""
        with self.db.session(readonly=True) as session:
            text = session.scalar(select(Document.text).where(Document.id == document_id))
        if text is None:
            raise NotFoundError(f"Document {document_id} no longer exists.")
        return text

    def get_units(self, document_id: int) -> list[UnitInfo]:
        """Pages or sections in reading order."""
        with self.db.session(readonly=True) as session:
            rows = session.scalars(
                select(DocumentUnit)
                .where(DocumentUnit.document_id == document_id)
                .order_by(DocumentUnit.number, DocumentUnit.id)
            )
            return [_unit_info(row) for row in rows]

    def set_token_count(self, document_id: int, token_count: int, tokenizer_id: str) -> DocumentInfo:
        """Record a token count computed after upload, e.g. once the tokenizer is loaded."""
        with self.db.session() as session:
            document = session.get(Document, document_id)
            if document is None:
                raise NotFoundError(f"Document {document_id} no longer exists.")
            document.token_count = token_count
            document.tokenizer_id = tokenizer_id
            session.flush()
            return _document_info(document)

    def search(self, query: str, limit: int = 20, document_ids: Sequence[int] | None = None) -> list[SearchHit]:
        """Case-insensitive phrase search over unit text, in document and reading order.

        Runs of whitespace in the query match any whitespace, so a phrase
        broken across lines is still found.  The database narrows candidates
        with LIKE for ASCII queries (its case folding is only reliable for
        ASCII on SQLite); exact matching and offsets are computed in Python.
        """
        words = query.split()
        if not words or limit <= 0:
            return []
        pattern = re.compile(r"\s+".join(re.escape(word) for word in words), re.IGNORECASE)
        statement = _search_query(words, document_ids)
        hits: list[SearchHit] = []
        with self.db.session(readonly=True) as session:
            rows = session.execute(statement.execution_options(yield_per=_SEARCH_BATCH))
            for hit in _matches(rows, pattern):
                hits.append(hit)
                if len(hits) >= limit:
                    break
        return hits

    def delete_document(self, document_id: int) -> bool:
        """Delete a document, its units and every checkpoint built from it.

        Chat sessions keep their messages; their selection entry for this
        document stays with its title snapshot and a NULL reference.  Rows go
        in one transaction, checkpoint files are removed after it commits so a
        failed delete never leaves rows pointing at missing files.
        """
        with self.db.session() as session:
            document = session.get(Document, document_id)
            if document is None:
                return False
            names = self.blobs._delete_rows_for_documents(session, [document.sha256])
            session.delete(document)
        self.blobs._remove_files(names)
        return True


def _build_document(
    extracted: ExtractedDocumentLike, filename: str, token_count: int | None, tokenizer_id: str | None
) -> Document:
    units = [
        DocumentUnit(
            number=int(unit.number),
            label=str(unit.label if unit.label is not None else unit.number),
            text=clean_text(unit.text),
            start=int(unit.start),
            end=int(unit.end),
            ocr_confidence=getattr(unit, "ocr_confidence", None),
            removed_header=clean_text(getattr(unit, "removed_header", "") or ""),
            removed_footer=clean_text(getattr(unit, "removed_footer", "") or ""),
        )
        for unit in extracted.units
    ]
    return Document(
        sha256=extracted.sha256,
        filename=filename,
        title=extracted.title or filename,
        kind=extracted.kind,
        size_bytes=int(extracted.size),
        page_count=len(units),
        text=clean_text(extracted.text),
        token_count=token_count,
        tokenizer_id=tokenizer_id,
        meta=json_safe(metadata_dict(extracted.metadata)),
        warnings=[str(w) for w in getattr(extracted, "warnings", ())],
        created_at=utcnow(),
        units=units,
    )


def _info_query() -> Select[tuple[Document]]:
    """Select documents without loading their full text."""
    return select(Document).options(defer(Document.text))


def _search_query(words: list[str], document_ids: Sequence[int] | None) -> Select[Any]:
    statement = (
        select(
            DocumentUnit.document_id,
            Document.title,
            DocumentUnit.number,
            DocumentUnit.label,
            DocumentUnit.text,
            DocumentUnit.start,
        )
        .join(Document, Document.id == DocumentUnit.document_id)
        .order_by(DocumentUnit.document_id, DocumentUnit.number, DocumentUnit.id)
    )
    if document_ids is not None:
        statement = statement.where(DocumentUnit.document_id.in_(list(document_ids)))
    for word in words:
        if word.isascii():
            statement = statement.where(func.lower(DocumentUnit.text).contains(word.lower(), autoescape=True))
    return statement


def _matches(rows: Any, pattern: re.Pattern[str]) -> Iterator[SearchHit]:
    for document_id, title, number, label, text, start in rows:
        for match in pattern.finditer(text):
            yield SearchHit(
                document_id=document_id,
                document_title=title,
                unit_number=number,
                unit_label=label,
                snippet=_snippet(text, match.start(), match.end()),
                char_offset=start + match.start(),
                unit_char_offset=match.start(),
            )


def _snippet(text: str, begin: int, end: int) -> str:
    """A single-line excerpt around a match, with ellipses where text was cut."""
    left = max(0, begin - SNIPPET_RADIUS)
    right = min(len(text), end + SNIPPET_RADIUS)
    excerpt = " ".join(text[left:right].split())
    return f"{'…' if left > 0 else ''}{excerpt}{'…' if right < len(text) else ''}"


def _document_info(row: Document) -> DocumentInfo:
    return DocumentInfo(
        id=row.id,
        sha256=row.sha256,
        filename=row.filename,
        title=row.title,
        kind=row.kind,
        size_bytes=row.size_bytes,
        page_count=row.page_count,
        token_count=row.token_count,
        tokenizer_id=row.tokenizer_id,
        metadata=dict(row.meta or {}),
        created_at=row.created_at,
        warnings=tuple(row.warnings or ()),
    )


def _unit_info(row: DocumentUnit) -> UnitInfo:
    return UnitInfo(
        id=row.id,
        document_id=row.document_id,
        number=row.number,
        label=row.label,
        text=row.text,
        start=row.start,
        end=row.end,
        ocr_confidence=row.ocr_confidence,
        removed_header=row.removed_header or "",
        removed_footer=row.removed_footer or "",
    )
