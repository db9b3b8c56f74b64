"""Limits applied to every upload, gathered in one immutable object.

Keeping them together makes it easy for the app to show the limits to users and for
tests to lower them without monkeypatching module globals.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

MB: Final = 1024 * 1024

DEFAULT_MAX_BYTES: Final = 200 * MB
DEFAULT_TIME_LIMIT_S: Final = 60.0
DEFAULT_ZIP_MAX_TOTAL_BYTES: Final = 500 * MB
DEFAULT_ZIP_MAX_RATIO: Final = 50.0
DEFAULT_ZIP_RATIO_FLOOR_BYTES: Final = 16 * MB
DEFAULT_ZIP_MAX_MEMBERS: Final = 10_000
DEFAULT_ZIP_MAX_PART_BYTES: Final = 64 * MB
DEFAULT_ZIP_MAX_DOCUMENT_BYTES: Final = 256 * MB
TITLE_MAX_CHARS: Final = 120
DEFAULT_MEMORY_LIMIT_BYTES: Final = 3 * 1024 * MB
DEFAULT_OCR_LANGUAGES: Final = "eng"
DEFAULT_OCR_DPI: Final = 300
DEFAULT_OCR_SECONDS_PER_PAGE: Final = 30.0
DEFAULT_OCR_MAX_PAGES: Final = 500


@dataclass(frozen=True, slots=True)
class IngestSettings:
    """Resource limits for one extraction.

    ``zip_max_ratio`` bounds the archive's total declared uncompressed size to that multiple
    of the upload's size, but only once the total exceeds ``zip_ratio_floor_bytes``: tiny
    documents often compress very well and must not be rejected for it.
    """

    max_bytes: int = DEFAULT_MAX_BYTES
    time_limit_s: float = DEFAULT_TIME_LIMIT_S
    zip_max_total_bytes: int = DEFAULT_ZIP_MAX_TOTAL_BYTES
    zip_max_ratio: float = DEFAULT_ZIP_MAX_RATIO
    zip_ratio_floor_bytes: int = DEFAULT_ZIP_RATIO_FLOOR_BYTES
    zip_max_members: int = DEFAULT_ZIP_MAX_MEMBERS
    # Hard caps on what a DOCX's XML parts really unpack to, one part and all of them together,
    # whatever sizes the archive declares (see ingest.zipguard).
    zip_max_part_bytes: int = DEFAULT_ZIP_MAX_PART_BYTES
    zip_max_document_bytes: int = DEFAULT_ZIP_MAX_DOCUMENT_BYTES
    # The extraction process's address space; a parser that needs more fails instead of the server.
    memory_limit_bytes: int = DEFAULT_MEMORY_LIMIT_BYTES
    # Tesseract language codes joined with "+", e.g. "eng+deu"; each needs its language pack.
    ocr_languages: str = DEFAULT_OCR_LANGUAGES
    ocr_dpi: int = DEFAULT_OCR_DPI
    # OCR is slow (seconds a page), so each page to recognise adds this much to the time limit...
    ocr_seconds_per_page: float = DEFAULT_OCR_SECONDS_PER_PAGE
    # ...for at most this many pages; further image-only pages are reported, not read.
    ocr_max_pages: int = DEFAULT_OCR_MAX_PAGES

    def __post_init__(self) -> None:
        if self.max_bytes <= 0:
            raise ValueError("max_bytes must be positive")
        if self.time_limit_s <= 0:
            raise ValueError("time_limit_s must be positive")


DEFAULT_SETTINGS: Final = IngestSettings()
