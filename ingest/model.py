"""Immutable result types of ingestion and the one place that assembles them.

Offsets are computed here, once, so every reader produces units whose ``start``/``end``
slice the full text exactly; downstream chunking and citation rely on that invariant.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

Kind = Literal["pdf", "docx", "txt", "md"]

UNIT_SEPARATOR = "\n\n"


@dataclass(frozen=True, slots=True)
class Unit:
    """A citable piece of a document: a PDF page or a heading-delimited section.

    ``number`` is 1-based: the page number for pages, the section's position otherwise.
    ``ocr_confidence`` is set (0-100, tesseract's mean word confidence) when the text was read
    from the page's image rather than its text layer. ``removed_header``/``removed_footer`` hold
    running-margin lines taken out of ``text``, so a reader can show the page as it was.
    """

    label: str
    number: int
    text: str
    start: int
    end: int
    ocr_confidence: float | None = None
    removed_header: str = ""
    removed_footer: str = ""

    @property
    def ocr(self) -> bool:
        return self.ocr_confidence is not None


@dataclass(frozen=True, slots=True)
class DocumentMetadata:
    """Descriptive fields; dates are ISO 8601 strings so they serialise without surprises."""

    author: str | None = None
    created: str | None = None
    modified: str | None = None
    page_count: int | None = None


@dataclass(frozen=True, slots=True)
class ExtractedDocument:
    """Everything later stages need from an upload.

    ``units`` is a tuple rather than a list so the frozen dataclass stays hashable and truly
    immutable. ``warnings`` lists recoverable problems (for example an unreadable page that
    was skipped) that the interface may want to show.
    """

    title: str
    kind: Kind
    units: tuple[Unit, ...]
    text: str
    metadata: DocumentMetadata
    sha256: str
    size: int
    warnings: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Section:
    """A unit before offsets are known: what each reader produces (fields as in :class:`Unit`)."""

    label: str
    number: int
    text: str
    ocr_confidence: float | None = None
    removed_header: str = ""
    removed_footer: str = ""


@dataclass(frozen=True, slots=True)
class Extraction:
    """What a format reader returns; :func:`ingest.extract` turns it into an ExtractedDocument.

    ``title_hints`` are candidate titles in order of preference (already checked for sense).
    """

    kind: Kind
    sections: tuple[Section, ...]
    metadata: DocumentMetadata
    title_hints: tuple[str | None, ...] = ()
    warnings: tuple[str, ...] = ()


def layout_units(sections: Iterable[Section]) -> tuple[tuple[Unit, ...], str]:
    """Join non-empty sections with :data:`UNIT_SEPARATOR` and record each one's offsets."""
    units: list[Unit] = []
    parts: list[str] = []
    cursor = 0
    for section in sections:
        if not section.text:
            continue
        if parts:
            parts.append(UNIT_SEPARATOR)
            cursor += len(UNIT_SEPARATOR)
        end = cursor + len(section.text)
        units.append(
            Unit(
                section.label, section.number, section.text, cursor, end,
                section.ocr_confidence, section.removed_header, section.removed_footer,
            )
        )
        parts.append(section.text)
        cursor = end
    return tuple(units), "".join(parts)


def sha256_hex(data: bytes) -> str:
    """Content hash used to deduplicate uploads."""
    return hashlib.sha256(data).hexdigest()
