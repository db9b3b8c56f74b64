"""ORM models for documents, chat sessions, summaries and model state checkpoints.

Only portable column types are used so the same schema works on SQLite (the
default, one file next to the data) and on PostgreSQL.  Any change here needs
a matching Alembic revision in ``storage/migrations/versions``; a test compares
the migrated schema against these models.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    DateTime,
    Dialect,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

DOCUMENT_KINDS = ("pdf", "docx", "txt", "md")
MESSAGE_ROLES = ("user", "assistant", "system")
MESSAGE_STATUSES = ("complete", "streaming", "cancelled", "error")


def utcnow() -> datetime:
    """Timestamps are always stored in UTC so ordering is consistent across machines."""
    return datetime.now(UTC)


class UTCDateTime(TypeDecorator[datetime]):
    """A timezone-aware timestamp that reads back as aware UTC on every backend.

    SQLite has no timezone support and returns naive values; normalising here
    keeps the DTOs identical whichever database is configured.
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            value = value.replace(tzinfo=UTC)
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value.astimezone(UTC)


class Base(DeclarativeBase):
    """Declarative base with a naming convention so constraint names are stable across backends."""

    metadata = MetaData(naming_convention=NAMING_CONVENTION)
    type_annotation_map = {
        datetime: UTCDateTime(),
        dict[str, Any]: JSON(),
        list[Any]: JSON(),
        list[dict[str, Any]]: JSON(),
        list[str]: JSON(),
    }


class Document(Base):
    """An uploaded file after text extraction; ``sha256`` of the raw bytes deduplicates uploads."""

    __tablename__ = "documents"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    sha256: Mapped[str] = mapped_column(String(64), unique=True)
    filename: Mapped[str] = mapped_column(String(1024))
    title: Mapped[str] = mapped_column(String(1024))
    kind: Mapped[str] = mapped_column(String(16))
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    page_count: Mapped[int] = mapped_column(Integer)
    text: Mapped[str] = mapped_column(Text)
    token_count: Mapped[int | None] = mapped_column(Integer)
    tokenizer_id: Mapped[str | None] = mapped_column(String(255))
    meta: Mapped[dict[str, Any]] = mapped_column("metadata", JSON)
    # What the reader noticed and could not (or chose not to) keep, e.g. OCR'd or unreadable pages.
    warnings: Mapped[list[str]] = mapped_column(JSON, default=list)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)

    units: Mapped[list[DocumentUnit]] = relationship(
        back_populates="document",
        order_by="DocumentUnit.number",
        cascade="all, delete-orphan",
        passive_deletes=True,
    )


class DocumentUnit(Base):
    """A page (PDF) or section (DOCX, Markdown, text) with its span in the document text."""

    __tablename__ = "document_units"
    __table_args__ = (Index("ix_document_units_document_id_number", "document_id", "number"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    document_id: Mapped[int] = mapped_column(ForeignKey("documents.id", ondelete="CASCADE"))
    number: Mapped[int] = mapped_column(Integer)
    label: Mapped[str] = mapped_column(String(255))
    text: Mapped[str] = mapped_column(Text)
    start: Mapped[int] = mapped_column("start_offset", Integer)
    end: Mapped[int] = mapped_column("end_offset", Integer)
    # Set when the text was read from the page image (OCR): tesseract's mean word confidence, 0-100.
    ocr_confidence: Mapped[float | None] = mapped_column(Float)
    # Running header/footer lines taken out of ``text``; kept so the page can be shown as printed.
    removed_header: Mapped[str] = mapped_column(Text, default="")
    removed_footer: Mapped[str] = mapped_column(Text, default="")

    document: Mapped[Document] = relationship(back_populates="units")


class ChatSession(Base):
    """A conversation over an ordered selection of documents."""

    __tablename__ = "chat_sessions"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(255))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, index=True)


class SessionDocument(Base):
    """One entry of a chat session's document selection.

    Title and hash are copied at selection time so the conversation still
    reads sensibly after the document itself is deleted (``document_id``
    becomes NULL and the UI shows the snapshot as removed).
    """

    __tablename__ = "session_documents"

    session_id: Mapped[int] = mapped_column(ForeignKey("chat_sessions.id", ondelete="CASCADE"), primary_key=True)
    position: Mapped[int] = mapped_column(Integer, primary_key=True)
    document_id: Mapped[int | None] = mapped_column(ForeignKey("documents.id", ondelete="SET NULL"), index=True)
    document_title: Mapped[str] = mapped_column(String(1024))
    document_sha256: Mapped[str] = mapped_column(String(64))


class Message(Base):
    """A chat turn with the generation statistics the UI shows under it."""

    __tablename__ = "messages"
    __table_args__ = (UniqueConstraint("session_id", "position"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    session_id: Mapped[int] = mapped_column(ForeignKey("chat_sessions.id", ondelete="CASCADE"))
    position: Mapped[int] = mapped_column(Integer)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    role: Mapped[str] = mapped_column(String(16))
    text: Mapped[str] = mapped_column(Text)
    reasoning: Mapped[str | None] = mapped_column(Text)
    citations: Mapped[list[dict[str, Any]]] = mapped_column(JSON)
    prefill_tokens: Mapped[int | None] = mapped_column(Integer)
    cached_tokens: Mapped[int | None] = mapped_column(Integer)
    time_to_first_token_s: Mapped[float | None] = mapped_column(Float)
    tokens_per_s: Mapped[float | None] = mapped_column(Float)
    status: Mapped[str] = mapped_column(String(16))


class Summary(Base):
    """A generated summary of a set of documents, identified by their hashes and titles."""

    __tablename__ = "summaries"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    documents: Mapped[list[dict[str, Any]]] = mapped_column(JSON)
    text: Mapped[str] = mapped_column(Text)
    citations: Mapped[list[dict[str, Any]]] = mapped_column(JSON)
    model_name: Mapped[str] = mapped_column(String(255))
    created_at: Mapped[datetime] = mapped_column(default=utcnow, index=True)


class StateCheckpoint(Base):
    """Metadata for a saved model state file in the blob folder.

    ``depends_on`` lists the document hashes whose text went into the state,
    so deleting a document can find and drop every checkpoint built from it.
    A checkpoint that extends another (a follow-up turn) names it in ``parent_key``
    with the checksum of the version it extends; its file holds only what it added,
    so it goes whenever that parent goes.  ``block_checksums`` are the SHA-256 of
    each ``block_size``-byte block of the file and ``checksum`` the SHA-256 over
    them, so reads verify blocks as they go instead of hashing the whole file first
    (rows written before blocks existed have NULL there and a whole-file checksum).
    """

    __tablename__ = "state_checkpoints"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    key: Mapped[str] = mapped_column(String(512), unique=True)
    model_fingerprint: Mapped[str] = mapped_column(String(255))
    token_count: Mapped[int] = mapped_column(Integer)
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    path: Mapped[str] = mapped_column(String(255))
    checksum: Mapped[str] = mapped_column(String(64))
    depends_on: Mapped[list[str]] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    last_used_at: Mapped[datetime] = mapped_column(default=utcnow, index=True)
    parent_key: Mapped[str | None] = mapped_column(String(512), index=True)
    parent_checksum: Mapped[str | None] = mapped_column(String(64))
    block_size: Mapped[int | None] = mapped_column(BigInteger)
    block_checksums: Mapped[list[str] | None] = mapped_column(JSON)
