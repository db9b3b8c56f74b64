"""Plain-text and Markdown uploads: encoding detection, binary rejection and sectioning."""

from __future__ import annotations

import codecs
import re
import unicodedata

import charset_normalizer

from .detect import is_markdown
from .errors import EMPTY, UNSUPPORTED, IngestError
from .model import DocumentMetadata, Extraction, Section
from .normalize import MarginSplit, collapse_spaces, margins_warning, normalize_text, split_text_page_margins
from .watchdog import Deadline

BOMS: tuple[tuple[bytes, str], ...] = (
    (codecs.BOM_UTF8, "utf-8-sig"),
    (codecs.BOM_UTF32_LE, "utf-32"),
    (codecs.BOM_UTF32_BE, "utf-32"),
    (codecs.BOM_UTF16_LE, "utf-16"),
    (codecs.BOM_UTF16_BE, "utf-16"),
)
DETECTION_SAMPLE_BYTES = 1 << 20
WESTERN_ENCODINGS = frozenset({"cp1252", "latin_1", "iso8859_15"})
BINARY_SAMPLE_CHARS = 1 << 16
MAX_UNPRINTABLE_SHARE = 0.02
MAX_UNPRINTABLE_COUNT = 3
_ALLOWED_CONTROLS = frozenset("\n\r\t\f\v")
_NOT_TEXT_MESSAGE = "The file does not look like text and its format is not supported."

_ATX_HEADING = re.compile(r"^ {0,3}#{1,6}[ \t]+(.*?)(?:[ \t]+#+)?[ \t]*$")
_FENCE = re.compile(r"^ {0,3}(`{3,}|~{3,})")
PREAMBLE_LABEL = "Preamble"
WHOLE_DOCUMENT_LABEL = "Document"


def decode_text(data: bytes) -> str:
    """Decode with a byte-order mark, then strict UTF-8, then detection, then a legacy 8-bit codec.

    Raises ``unsupported`` when the result is clearly not text (NUL bytes outside UTF-16/32,
    or too many control characters), so binary junk never reaches the index.
    """
    for bom, encoding in BOMS:
        if data.startswith(bom):
            return _require_text(data.decode(encoding, errors="replace"))
    try:
        return _require_text(data.decode("utf-8"))
    except UnicodeDecodeError:
        pass
    utf16 = _bomless_utf16(data)
    if utf16:
        return _require_text(data.decode(utf16, errors="replace"))
    if b"\x00" in data:
        raise IngestError(UNSUPPORTED, _NOT_TEXT_MESSAGE)
    guess = _detect_encoding(data[:DETECTION_SAMPLE_BYTES])
    if guess:
        return _require_text(data.decode(guess, errors="replace"))
    try:
        return _require_text(data.decode("cp1252"))
    except UnicodeDecodeError:
        return _require_text(data.decode("latin-1"))


def _detect_encoding(sample: bytes) -> str | None:
    """charset-normalizer's choice, except that Windows-1252 wins ties.

    Short Western European texts score identically under several single-byte code pages
    (cp1250 and cp1252 agree on most letters but not on "è" or "û"); the far more common
    Windows-1252 is then the safer reading.
    """
    matches = list(charset_normalizer.from_bytes(sample))
    if not matches:
        return None
    best = matches[0]
    for match in matches:
        tied = match.percent_chaos <= best.percent_chaos and match.percent_coherence >= best.percent_coherence
        if match.encoding in WESTERN_ENCODINGS and tied:
            return match.encoding
    return best.encoding


def _bomless_utf16(data: bytes) -> str | None:
    """Recognise UTF-16 without a BOM by its zero bytes in every other position (ASCII-heavy text)."""
    sample = data[:4096]
    if len(sample) < 4:
        return None
    even = sample[0::2].count(0) / len(sample[0::2])
    odd = sample[1::2].count(0) / max(1, len(sample[1::2]))
    if odd > 0.3 and even < 0.02:
        return "utf-16-le"
    if even > 0.3 and odd < 0.02:
        return "utf-16-be"
    return None


def _require_text(text: str) -> str:
    """Reject decoded content whose sample holds NULs or more than a few unprintable characters.

    A handful of stray control bytes is tolerated (normalisation removes them); binary data
    decoded as text has them everywhere.
    """
    sample = text[:BINARY_SAMPLE_CHARS]
    if "\x00" in sample:
        raise IngestError(UNSUPPORTED, _NOT_TEXT_MESSAGE)
    bad = sum(
        1 for ch in sample if ch not in _ALLOWED_CONTROLS and unicodedata.category(ch) in ("Cc", "Cs", "Cn")
    )
    if bad > max(MAX_UNPRINTABLE_COUNT, MAX_UNPRINTABLE_SHARE * len(sample)):
        raise IngestError(UNSUPPORTED, _NOT_TEXT_MESSAGE)
    return text


def read_text(data: bytes, filename: str, deadline: Deadline) -> Extraction:
    """Read a TXT or Markdown upload into sections."""
    raw = decode_text(data)
    deadline.check()
    if is_markdown(filename):
        text = normalize_text(raw)
        sections = markdown_sections(text)
        hints = tuple(s.label for s in sections if s.label != PREAMBLE_LABEL)[:1]
        kind, page_count = "md", None
        warnings = ()
    elif "\f" in raw:
        pages = _split_pages(raw)
        sections = [
            Section(f"page {n}", n, page.text, removed_header=page.header, removed_footer=page.footer)
            for n, page in enumerate(pages, start=1)
            if page.text
        ]
        hints, kind, page_count = (), "txt", len(pages)
        trimmed = sum(1 for page in pages if page.header or page.footer)
        warnings = (margins_warning(trimmed),) if trimmed else ()
    else:
        text = normalize_text(raw)
        sections = [Section(WHOLE_DOCUMENT_LABEL, 1, text)]
        hints, kind, page_count = (), "txt", None
        warnings = ()
    deadline.check()
    if not any(section.text.strip() for section in sections):
        raise IngestError(EMPTY, "The file contains no text.")
    return Extraction(
        kind=kind,
        sections=tuple(sections),
        metadata=DocumentMetadata(page_count=page_count),
        title_hints=hints,
        warnings=warnings,
    )


def _split_pages(raw: str) -> list[MarginSplit]:
    """Form feeds separate pages in text exported from printers and terminals."""
    parts = raw.split("\f")
    if len(parts) > 1 and not parts[-1].strip():
        parts.pop()
    return split_text_page_margins([normalize_text(part) for part in parts])


def markdown_sections(text: str) -> list[Section]:
    """Split normalised Markdown at ATX (``#``) headings, ignoring ``#`` lines inside code fences.

    Each section keeps its heading line so the joined text still reads as the original document.
    """
    blocks: list[tuple[str, list[str]]] = [(PREAMBLE_LABEL, [])]
    fence: str | None = None
    for line in text.split("\n"):
        fence_match = _FENCE.match(line)
        if fence_match:
            marker = fence_match.group(1)
            if fence is None:
                fence = marker[0] * 3
            elif marker.startswith(fence):
                fence = None
        heading = None if fence else _ATX_HEADING.match(line)
        label = collapse_spaces(heading.group(1)) if heading else ""
        if label:
            blocks.append((label, [line]))
        else:
            blocks[-1][1].append(line)
    sections: list[Section] = []
    for label, lines in blocks:
        body = "\n".join(lines).strip("\n")
        if body.strip():
            sections.append(Section(label, len(sections) + 1, body))
    if len(sections) == 1 and sections[0].label == PREAMBLE_LABEL:
        return [Section(WHOLE_DOCUMENT_LABEL, 1, sections[0].text)]
    return sections
