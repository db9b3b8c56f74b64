"""PDF uploads, read with pypdf.

pypdf is lenient with damaged files but can raise almost anything on hostile ones, so each
stage (open, decrypt, per page) is guarded: an unreadable page is skipped with a warning,
while a file that yields no page at all is reported as corrupt.

Running headers and footers are taken out of the page text only where their position on the
page proves them to be margins (see :mod:`ingest.pdf_layout`); they stay with the page as
``removed_header``/``removed_footer`` and a warning says so.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Callable
from datetime import datetime
from typing import TypeVar

from pypdf import PasswordType, PdfReader
from pypdf.errors import DependencyError, FileNotDecryptedError, WrongPasswordError

from .errors import CORRUPT, EMPTY, ENCRYPTED, SCANNED, IngestError
from .model import DocumentMetadata, Extraction, Section
from .normalize import MarginSplit, PageLine, collapse_spaces, normalize_text, split_running_margins
from .pdf_layout import read_page_lines
from .titles import sensible_title
from .watchdog import Deadline

logger = logging.getLogger(__name__)
T = TypeVar("T")

_PASSWORD_MESSAGE = "This PDF is password-protected; remove the password and upload it again."
_CORRUPT_MESSAGE = "The PDF is damaged or truncated and could not be read."
_LOCKED_ERRORS = (FileNotDecryptedError, WrongPasswordError)


def read_pdf(data: bytes, deadline: Deadline) -> Extraction:
    """Read every page's text layer; raises IngestError for locked, empty or image-only PDFs."""
    reader = _open(data)
    _unlock(reader)
    page_count = _page_count(reader)
    page_lines, failed = _page_lines(reader, page_count, deadline)
    sections = [_section(n, split) for n, split in enumerate(split_running_margins(page_lines), start=1)]
    if not any(section.text for section in sections):
        if len(failed) == page_count:
            raise IngestError(CORRUPT, _CORRUPT_MESSAGE)
        raise IngestError(SCANNED, "scanned: no text layer; OCR is not supported yet.")
    title, metadata = _metadata(reader, page_count)
    warnings = [f"page {n} could not be read and was skipped" for n in failed]
    trimmed = sum(1 for section in sections if section.removed_header or section.removed_footer)
    if trimmed:
        pages = f"{trimmed} page" if trimmed == 1 else f"{trimmed} pages"
        warnings.append(f"Running headers/footers repeated on {pages} were left out of the text (shown in the reader)")
    return Extraction(
        kind="pdf", sections=tuple(sections), metadata=metadata, title_hints=(title,), warnings=tuple(warnings)
    )


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
