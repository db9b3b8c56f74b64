"""Deciding how to read an upload from its bytes.

File names lie (a renamed PNG, a ".pdf" that is really an HTML error page), so the content's
signature decides; the extension only picks Markdown over plain text and sharpens messages.
"""

from __future__ import annotations

import io
import zipfile
from typing import Literal

from .errors import CORRUPT, ENCRYPTED, UNSUPPORTED, IngestError
from .settings import DEFAULT_SETTINGS, IngestSettings
from .zipguard import check_entry_count

Container = Literal["pdf", "docx", "text"]

PDF_MAGIC = b"%PDF-"
PDF_HEADER_WINDOW = 1024
ZIP_MAGICS = (b"PK\x03\x04", b"PK\x05\x06", b"PK\x07\x08")
OLE2_MAGIC = b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1"
ENCRYPTED_OOXML_MARKER = "EncryptedPackage".encode("utf-16-le")
DOCX_MAIN_PART = "word/document.xml"
MARKDOWN_EXTENSIONS = frozenset({"md", "markdown", "mdown", "mkd", "mkdn"})

_IMAGE_MESSAGE = (
    "Image files are not supported; put scanned pages in a PDF (its pages are read with OCR), "
    "or upload a Word (.docx) document or a text file."
)
_BINARY_SIGNATURES: tuple[tuple[bytes, str], ...] = (
    (b"\x89PNG\r\n\x1a\n", _IMAGE_MESSAGE),
    (b"\xff\xd8\xff", _IMAGE_MESSAGE),
    (b"GIF87a", _IMAGE_MESSAGE),
    (b"GIF89a", _IMAGE_MESSAGE),
    (b"II*\x00", _IMAGE_MESSAGE),
    (b"MM\x00*", _IMAGE_MESSAGE),
    (b"{\\rtf", "RTF files are not supported; save the document as .docx or PDF."),
    (b"%!PS", "PostScript files are not supported; convert the file to PDF."),
    (b"\x1f\x8b", "Compressed archives are not supported; upload the document itself."),
    (b"7z\xbc\xaf\x27\x1c", "Compressed archives are not supported; upload the document itself."),
    (b"Rar!\x1a\x07", "Compressed archives are not supported; upload the document itself."),
)
_ZIP_FORMATS: tuple[tuple[str, str], ...] = (
    ("xl/workbook.xml", "Excel workbooks are not supported; upload a PDF, Word (.docx) or text file."),
    ("ppt/presentation.xml", "PowerPoint files are not supported; save the slides as PDF."),
    ("mimetype", "OpenDocument files are not supported; save the document as .docx or PDF."),
)


def extension(filename: str) -> str:
    """Lower-case extension without the dot ("" when there is none)."""
    name = filename.replace("\\", "/").rsplit("/", 1)[-1]
    return name.rsplit(".", 1)[1].lower() if "." in name.lstrip(".") else ""


def detect_container(data: bytes, filename: str, settings: IngestSettings | None = None) -> Container:
    """Classify ``data``; raises :class:`IngestError` for formats that cannot be read.

    ``settings`` (default :data:`DEFAULT_SETTINGS`) only matters for ZIP containers, whose
    entry count is checked against ``zip_max_members`` before their directory is read.
    """
    if _looks_like_pdf(data):
        return "pdf"
    if data.startswith(ZIP_MAGICS):
        return _classify_zip(data, filename, settings or DEFAULT_SETTINGS)
    if data.startswith(OLE2_MAGIC):
        raise _legacy_office_error(data)
    for signature, message in _BINARY_SIGNATURES:
        if data.startswith(signature):
            raise IngestError(UNSUPPORTED, message)
    if data[4:12] in (b"ftypheic", b"ftypavif") or (data[:4] == b"RIFF" and data[8:12] == b"WEBP"):
        raise IngestError(UNSUPPORTED, _IMAGE_MESSAGE)
    ext = extension(filename)
    if ext == "pdf":
        raise IngestError(CORRUPT, "The file is named .pdf but does not contain a PDF; it may be damaged.")
    if ext == "docx":
        raise IngestError(CORRUPT, "The file is named .docx but is not a Word document; it may be damaged.")
    return "text"


def _looks_like_pdf(data: bytes) -> bool:
    """The header normally starts the file, but readers accept it within the first kilobyte.

    A late header only counts when PDF structure keywords follow, so a text file that merely
    mentions "%PDF-" near its start is still read as text.
    """
    if data.startswith(PDF_MAGIC):
        return True
    return PDF_MAGIC in data[:PDF_HEADER_WINDOW] and (b"endobj" in data or b"startxref" in data)


def _classify_zip(data: bytes, filename: str, settings: IngestSettings) -> Container:
    """A ZIP is only accepted when it holds a Word document's main part.

    Only the central directory is read here, and only once the end record has shown it to be
    of a sane length (``zipfile`` parses all of it, however many entries it lists).
    """
    what = "Word document" if extension(filename) == "docx" else "ZIP archive"
    check_entry_count(data, settings.zip_max_members, what)
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            names = set(archive.namelist())
    except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, ValueError, EOFError, KeyError) as exc:
        raise IngestError(CORRUPT, f"The {what} is damaged or truncated and could not be opened.") from exc
    if DOCX_MAIN_PART in names:
        return "docx"
    for marker, message in _ZIP_FORMATS:
        if marker in names:
            raise IngestError(UNSUPPORTED, message)
    if extension(filename) == "docx":
        raise IngestError(CORRUPT, "The Word document is incomplete: its main text part is missing.")
    raise IngestError(UNSUPPORTED, "ZIP archives are not supported; upload the document itself.")


def _legacy_office_error(data: bytes) -> IngestError:
    """OLE2 containers are either legacy Office files or password-protected modern ones."""
    if ENCRYPTED_OOXML_MARKER in data:
        return IngestError(
            ENCRYPTED, "This Office document is password-protected; remove the password and upload it again."
        )
    return IngestError(
        UNSUPPORTED,
        "Legacy Office files (.doc, .xls, .ppt) are not supported; save the file as .docx or PDF.",
    )


def is_markdown(filename: str) -> bool:
    """Markdown cannot be told from plain text by content, so the extension decides."""
    return extension(filename) in MARKDOWN_EXTENSIONS
