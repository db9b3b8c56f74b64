"""The public entry point: limits, type detection, the right reader, and result assembly."""

from __future__ import annotations

import dataclasses

from .detect import detect_container
from .docx_reader import read_docx
from .errors import CORRUPT, EMPTY, TOO_LARGE, IngestError
from .model import ExtractedDocument, Extraction, layout_units, sha256_hex
from .pdf import read_pdf
from .settings import DEFAULT_SETTINGS, MB, IngestSettings
from .text import read_text
from .titles import choose_title
from .watchdog import ChildLimits, Deadline, ProgressCallback, run_isolated

BLANK_CHECK_BYTES = 1 << 16


def extract(
    data: bytes,
    filename: str,
    *,
    max_bytes: int | None = None,
    time_limit_s: float | None = None,
    settings: IngestSettings | None = None,
    progress: ProgressCallback | None = None,
) -> ExtractedDocument:
    """Turn an uploaded file into text split into citable units.

    The type is decided by content, not by ``filename`` (which only distinguishes Markdown from
    plain text and improves messages). ``max_bytes`` and ``time_limit_s`` override the matching
    fields of ``settings`` (default :data:`DEFAULT_SETTINGS`: 200 MB, 60 s, plus time for OCR).
    The work runs in a child process with those limits (see :mod:`ingest.watchdog`);
    ``progress`` is called in this process with each :class:`~ingest.watchdog.Progress`.

    Every problem with the input raises :class:`IngestError`; ``TypeError`` is raised only when
    ``data`` is not bytes-like, which is a programming error rather than a bad upload.
    """
    limits = _limits(settings, max_bytes, time_limit_s)
    if isinstance(data, bytearray | memoryview):
        data = bytes(data)
    if not isinstance(data, bytes):
        raise TypeError(f"data must be bytes, not {type(data).__name__}")
    if len(data) > limits.max_bytes:
        raise IngestError(
            TOO_LARGE, f"The file is {_size(len(data))}; the upload limit is {_size(limits.max_bytes)}."
        )
    if not data or (len(data) <= BLANK_CHECK_BYTES and not data.strip()):
        raise IngestError(EMPTY, "The file is empty.")
    child = ChildLimits(
        time_limit_s=limits.time_limit_s,
        memory_bytes=limits.memory_limit_bytes,
        max_extension_s=limits.ocr_seconds_per_page * limits.ocr_max_pages,
    )
    return run_isolated(_guarded, (data, filename, limits), child, progress)


def _limits(
    settings: IngestSettings | None, max_bytes: int | None, time_limit_s: float | None
) -> IngestSettings:
    limits = settings or DEFAULT_SETTINGS
    overrides: dict[str, float] = {}
    if max_bytes is not None:
        overrides["max_bytes"] = max_bytes
    if time_limit_s is not None:
        overrides["time_limit_s"] = time_limit_s
    return dataclasses.replace(limits, **overrides) if overrides else limits


def _size(count: int) -> str:
    return f"{count / MB:,.1f} MB" if count >= MB // 10 else f"{count:,} bytes"


def _guarded(data: bytes, filename: str, settings: IngestSettings, deadline: Deadline) -> ExtractedDocument:
    """Translate anything a parser raises into IngestError, so callers need one except clause."""
    try:
        return _extract(data, filename, settings, deadline)
    except IngestError:
        raise
    except RecursionError as exc:
        raise IngestError(CORRUPT, "The file's structure is nested too deeply to be read.") from exc
    except MemoryError as exc:
        raise IngestError(TOO_LARGE, "The file needs more memory to read than is available.") from exc
    except Exception as exc:
        raise IngestError(CORRUPT, "The file could not be read; it may be damaged or malformed.") from exc


def _extract(data: bytes, filename: str, settings: IngestSettings, deadline: Deadline) -> ExtractedDocument:
    container = detect_container(data, filename, settings)
    extraction: Extraction
    if container == "pdf":
        extraction = read_pdf(data, deadline, settings)
    elif container == "docx":
        extraction = read_docx(data, deadline, settings)
    else:
        extraction = read_text(data, filename, deadline)
    deadline.check()
    units, text = layout_units(extraction.sections)
    if not text.strip():
        raise IngestError(EMPTY, "The file contains no text.")
    return ExtractedDocument(
        title=choose_title(extraction.title_hints, text, filename),
        kind=extraction.kind,
        units=units,
        text=text,
        metadata=extraction.metadata,
        sha256=sha256_hex(data),
        size=len(data),
        warnings=extraction.warnings,
    )
