"""Generated summaries of document sets.

A summary names its documents by hash and title rather than by foreign key,
so it survives deletion of the documents and can be matched again when the
same files are uploaded later.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Sequence
from typing import Any

from sqlalchemy import delete, select

from storage.db import Database
from storage.documents import clean_text, json_safe
from storage.dto import DocumentRef, HasShaAndTitle, SummaryInfo
from storage.models import Summary, utcnow


class SummaryStore:
    def __init__(self, db: Database) -> None:
        self.db = db

    def add_summary(
        self,
        documents: Sequence[HasShaAndTitle],
        text: str,
        *,
        model_name: str,
        citations: Iterable[dict[str, Any]] = (),
    ) -> SummaryInfo:
        """Store a summary of ``documents`` (in the order they were summarised)."""
        if not documents:
            raise ValueError("a summary must name at least one document")
        refs = [{"sha256": doc.sha256, "title": doc.title} for doc in documents]
        with self.db.session() as session:
            row = Summary(
                documents=refs,
                text=clean_text(text),
                citations=json_safe(list(citations)),
                model_name=model_name,
                created_at=utcnow(),
            )
            session.add(row)
            session.flush()
            return _summary_info(row)

    def list_summaries(
        self, document_sha256s: Collection[str] | None = None, limit: int | None = None
    ) -> list[SummaryInfo]:
        """Summaries, newest first; with ``document_sha256s`` only those of exactly that document set."""
        wanted = None if document_sha256s is None else frozenset(document_sha256s)
        statement = select(Summary).order_by(Summary.created_at.desc(), Summary.id.desc())
        found: list[SummaryInfo] = []
        with self.db.session(readonly=True) as session:
            for row in session.scalars(statement):
                info = _summary_info(row)
                if wanted is not None and frozenset(ref.sha256 for ref in info.documents) != wanted:
                    continue
                found.append(info)
                if limit is not None and len(found) >= limit:
                    break
        return found

    def get_summary(self, summary_id: int) -> SummaryInfo | None:
        with self.db.session(readonly=True) as session:
            row = session.get(Summary, summary_id)
            return None if row is None else _summary_info(row)

    def delete_summary(self, summary_id: int) -> bool:
        with self.db.session() as session:
            return bool(session.execute(delete(Summary).where(Summary.id == summary_id)).rowcount)


def _summary_info(row: Summary) -> SummaryInfo:
    return SummaryInfo(
        id=row.id,
        documents=tuple(DocumentRef(sha256=ref["sha256"], title=ref["title"]) for ref in row.documents),
        text=row.text,
        citations=list(row.citations or []),
        model_name=row.model_name,
        created_at=row.created_at,
    )
