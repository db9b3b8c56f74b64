"""PDF uploads: the text layer read with pypdf, pages without one read with OCR (:mod:`ingest.ocr`).

pypdf is lenient with damaged files but can raise almost anything on hostile ones, so each
stage (open, decrypt, per page) is guarded: an unreadable page is skipped with a warning,
while a file that yields no page at all is reported as corrupt.

Running headers and footers are taken out of the page text only where their position on the
page proves them to be margins (see :mod:`ingest.pdf_layout`); they stay with the page as
``removed_header``/``removed_footer`` and a warning says so.
"""

from __future__ import annotations

import dataclasses
import io
import logging
from collections.abc import Callable
from datetime import datetime
from typing import TypeVar

from pypdf import PasswordType, PdfReader
from pypdf.errors import DependencyError, FileNotDecryptedError, WrongPasswordError

from .errors import CORRUPT, EMPTY, ENCRYPTED, SCANNED, IngestError
from .model import DocumentMetadata, Extraction, Section
from .normalize import (
    MarginSplit,
    PageLine,
    collapse_spaces,
    margins_warning,
    normalize_text,
    split_running_margins,
)
from .ocr import OcrOutcome, OcrPage, ocr_image_pages
from .pdf_layout import read_page_lines
from .settings import DEFAULT_SETTINGS, IngestSettings
from .titles import sensible_title
from .watchdog import Deadline

logger = logging.getLogger(__name__)
T = TypeVar("T")

_PASSWORD_MESSAGE = "This PDF is password-protected; remove the password and upload it again."
_CORRUPT_MESSAGE = "The PDF is damaged or truncated and could not be read."
_LOCKED_ERRORS = (FileNotDecryptedError, WrongPasswordError)


def read_pdf(data: bytes, deadline: Deadline, settings: IngestSettings = DEFAULT_SETTINGS) -> Extraction:
    """Read every page's text layer, and with OCR the pages whose words are only in images.

    Raises IngestError for locked or damaged PDFs and for PDFs in which neither gives any text.
    """
    reader = _open(data)
    _unlock(reader)
    page_count = _page_count(reader)
    page_lines, failed = _page_lines(reader, page_count, deadline)
    sections = [_section(n, split) for n, split in enumerate(split_running_margins(page_lines), start=1)]
    ocr = ocr_image_pages(data, [section.text for section in sections], settings, deadline)
    sections = [_with_ocr(section, ocr.pages.get(section.number)) for section in sections]
    failed = [n for n in failed if not sections[n - 1].text]
    if not any(section.text for section in sections):
        if len(failed) == page_count:
            raise IngestError(CORRUPT, _CORRUPT_MESSAGE)
        raise _no_text_error(ocr, page_count)
    title, metadata = _metadata(reader, page_count)
    warnings = [f"page {n} could not be read and was skipped" for n in failed]
    warnings += ocr.warnings
    trimmed = sum(1 for section in sections if section.removed_header or section.removed_footer)
    if trimmed:
        warnings.append(margins_warning(trimmed))
    return Extraction(
        kind="pdf", sections=tuple(sections), metadata=metadata, title_hints=(title,), warnings=tuple(warnings)
    )


def _with_ocr(section: Section, page: OcrPage | None) -> Section:
    """The page's OCR text in place of its text layer, which is kept when it adds something (a stamp)."""
    text = normalize_text(page.text) if page is not None else ""
    if not text:
        return section
    if section.text and collapse_spaces(section.text).casefold() not in collapse_spaces(text).casefold():
        text = f"{section.text}\n\n{text}"
    confidence = page.confidence if page.confidence is not None else 0.0
    return dataclasses.replace(section, text=text, ocr_confidence=confidence)


def _no_text_error(ocr: OcrOutcome, page_count: int) -> IngestError:
    pages = "its page" if page_count == 1 else f"its {page_count} pages"
    if ocr.unavailable:
        return IngestError(SCANNED, f"This PDF has no text layer (it looks like a scan) and could not be read: "
                                    f"{ocr.unavailable}.")
    if ocr.pages:
        return IngestError(SCANNED, f"This PDF has no text layer, and OCR found no text in the images of {pages}.")
    return IngestError(EMPTY, f"This PDF contains no text: {pages} hold neither text nor images to read.")


def _section(number: int, split: MarginSplit) -> Section:
    return Section(
        f"page {number}",
        number,
        normalize_text(split.text, join_hyphens=True),
        removed_header=collapse_spaces(normalize_text(split.header)),
        removed_footer=collapse_spaces(normalize_text(split.footer)),
    )


def _open(data: bytes) -> PdfReader:
    try:
        return PdfReader(io.BytesIO(data), strict=False)
    except _LOCKED_ERRORS as exc:
        raise IngestError(ENCRYPTED, _PASSWORD_MESSAGE) from exc
    except Exception as exc:
        raise IngestError(CORRUPT, _CORRUPT_MESSAGE) from exc


def _unlock(reader: PdfReader) -> None:
    """Open encrypted files that need no user password (owner-only restrictions are common)."""
    try:
        if not reader.is_encrypted:
            return
        unlocked = reader.decrypt("")
    except DependencyError as exc:
        raise IngestError(ENCRYPTED, "This PDF uses encryption that cannot be opened here.") from exc
    except NotImplementedError as exc:
        raise IngestError(
            ENCRYPTED, "This PDF uses an unsupported kind of encryption (for example certificates)."
        ) from exc
    except _LOCKED_ERRORS as exc:
        raise IngestError(ENCRYPTED, _PASSWORD_MESSAGE) from exc
    except Exception as exc:
        raise IngestError(CORRUPT, _CORRUPT_MESSAGE) from exc
    if unlocked == PasswordType.NOT_DECRYPTED:
        raise IngestError(ENCRYPTED, _PASSWORD_MESSAGE)


def _page_count(reader: PdfReader) -> int:
    try:
        count = len(reader.pages)
    except _LOCKED_ERRORS as exc:
        raise IngestError(ENCRYPTED, _PASSWORD_MESSAGE) from exc
    except Exception as exc:
        raise IngestError(CORRUPT, _CORRUPT_MESSAGE) from exc
    if count == 0:
        raise IngestError(EMPTY, "The PDF has no pages.")
    return count


def _page_lines(
    reader: PdfReader, page_count: int, deadline: Deadline
) -> tuple[list[list[PageLine]], list[int]]:
    """Each page's text as positioned lines (empty for a page without text), and the numbers
    of pages whose extraction failed.

    The deadline is also checked before every content-stream operator, so one pathological
    page cannot run far past the time limit.
    """
    pages: list[list[PageLine]] = []
    failed: list[int] = []
    for index in range(page_count):
        deadline.check()
        deadline.report("reading", index, page_count)
        try:
            lines = read_page_lines(reader.pages[index], deadline.check)
        except IngestError:
            raise
        except _LOCKED_ERRORS as exc:
            raise IngestError(ENCRYPTED, _PASSWORD_MESSAGE) from exc
        except Exception:
            logger.info("skipping unreadable PDF page %d", index + 1, exc_info=True)
            failed.append(index + 1)
            lines = []
        pages.append(lines)
    return pages, failed


def _metadata(reader: PdfReader, page_count: int) -> tuple[str | None, DocumentMetadata]:
    """Document information dictionary fields; each is read on its own because any may be malformed."""
    info = _attempt(lambda: reader.metadata)
    if info is None:
        return None, DocumentMetadata(page_count=page_count)
    return sensible_title(_attempt(lambda: info.title)), DocumentMetadata(
        author=_clean(_attempt(lambda: info.author)),
        created=_iso(_attempt(lambda: info.creation_date)),
        modified=_iso(_attempt(lambda: info.modification_date)),
        page_count=page_count,
    )


def _attempt(read: Callable[[], T]) -> T | None:
    try:
        return read()
    except Exception:
        return None


def _clean(value: object) -> str | None:
    return (collapse_spaces(value) or None) if isinstance(value, str) else None


def _iso(value: object) -> str | None:
    return value.isoformat() if isinstance(value, datetime) else None
