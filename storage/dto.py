"""Immutable values returned by the stores.

Callers (the Streamlit pages, the model runner) receive these instead of live
ORM objects so they can keep and pass them around after the database
transaction has ended, without lazy-loading surprises.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Protocol


class ExtractedUnit(Protocol):
    """What storage needs from one extracted page or section."""

    @property
    def number(self) -> int: ...

    @property
    def label(self) -> str: ...

    @property
    def text(self) -> str: ...

    @property
    def start(self) -> int: ...

    @property
    def end(self) -> int: ...


class ExtractedDocumentLike(Protocol):
    """What storage needs from an extracted document (``ingest.ExtractedDocument`` fits).

    ``metadata`` may be a mapping or a dataclass; ``units`` any sequence of
    objects shaped like ``ExtractedUnit``.
    """

    @property
    def sha256(self) -> str: ...

    @property
    def title(self) -> str: ...

    @property
    def kind(self) -> str: ...

    @property
    def size(self) -> int: ...

    @property
    def text(self) -> str: ...

    @property
    def metadata(self) -> Any: ...

    @property
    def units(self) -> Sequence[Any]: ...


class HasShaAndTitle(Protocol):
    """Anything naming a document by hash and title, e.g. ``DocumentInfo`` or ``DocumentRef``."""

    @property
    def sha256(self) -> str: ...

    @property
    def title(self) -> str: ...


@dataclass(frozen=True, slots=True)
class DocumentRef:
    """A document named by content hash, independent of whether it is still stored."""

    sha256: str
    title: str


@dataclass(frozen=True, slots=True)
class DocumentInfo:
    """A stored document without its (possibly very large) text; see ``DocumentStore.get_text``."""

    id: int
    sha256: str
    filename: str
    title: str
    kind: str
    size_bytes: int
    page_count: int
    token_count: int | None
    tokenizer_id: str | None
    metadata: dict[str, Any]
    created_at: datetime
    warnings: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class UnitInfo:
    """A page or section with its character span in the document text.

    ``ocr_confidence`` is set for text read from the page image; ``removed_header`` and
    ``removed_footer`` are running-margin lines left out of ``text``.
    """

    id: int
    document_id: int
    number: int
    label: str
    text: str
    start: int
    end: int
    ocr_confidence: float | None = None
    removed_header: str = ""
    removed_footer: str = ""

    @property
    def ocr(self) -> bool:
        return self.ocr_confidence is not None

    @property
    def as_printed(self) -> str:
        """The page with its removed running header and footer put back."""
        return "\n".join(part for part in (self.removed_header, self.text, self.removed_footer) if part)


@dataclass(frozen=True, slots=True)
class SearchHit:
    """One occurrence of a search query.

    ``char_offset`` is relative to the whole document text (unit start plus
    the position inside the unit); ``unit_char_offset`` is inside the unit.
    """

    document_id: int
    document_title: str
    unit_number: int
    unit_label: str
    snippet: str
    char_offset: int
    unit_char_offset: int


@dataclass(frozen=True, slots=True)
class ChatSessionInfo:
    id: int
    name: str
    created_at: datetime
    updated_at: datetime
    message_count: int = 0


@dataclass(frozen=True, slots=True)
class SessionDocumentInfo:
    """One entry of a chat session's document selection; ``document_id`` is None once deleted."""

    position: int
    document_id: int | None
    title: str
    sha256: str

    @property
    def removed(self) -> bool:
        return self.document_id is None

    @property
    def display_title(self) -> str:
        return f"{self.title} (removed)" if self.removed else self.title


@dataclass(frozen=True, slots=True)
class MessageStats:
    """Generation statistics shown under an assistant message; all optional."""

    prefill_tokens: int | None = None
    cached_tokens: int | None = None
    time_to_first_token_s: float | None = None
    tokens_per_s: float | None = None


@dataclass(frozen=True, slots=True)
class MessageInfo:
    id: int
    session_id: int
    position: int
    created_at: datetime
    role: str
    text: str
    reasoning: str | None
    citations: list[dict[str, Any]]
    status: str
    stats: MessageStats = field(default_factory=MessageStats)


@dataclass(frozen=True, slots=True)
class SummaryInfo:
    id: int
    documents: tuple[DocumentRef, ...]
    text: str
    citations: list[dict[str, Any]]
    model_name: str
    created_at: datetime


@dataclass(frozen=True, slots=True)
class CheckpointInfo:
    """Bookkeeping for one model state file; ``path`` is absolute."""

    key: str
    model_fingerprint: str
    token_count: int
    size_bytes: int
    path: Path
    checksum: str
    depends_on: tuple[str, ...]
    created_at: datetime
    last_used_at: datetime


@dataclass(frozen=True, slots=True)
class BlobStats:
    count: int
    bytes: int
    budget_bytes: int
