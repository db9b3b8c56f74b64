"""Word (.docx) uploads.

The body is walked element by element so paragraphs and tables keep their document order,
and text inside content controls, hyperlinks, fields and tracked insertions is not lost
(python-docx's ``Paragraph.text`` skips several of those). Headers, footers, comments,
footnotes and floating text boxes live outside the body flow and are left out on purpose: they
repeat or interrupt the text rather than continue it.

python-docx only ever sees the package :func:`ingest.zipguard.unpack` re-built from capped,
verified parts, never the upload itself; the page count is read from that package too.
"""

from __future__ import annotations

import io
import re
import zipfile
from collections.abc import Iterator
from datetime import datetime

import docx
from docx.enum.style import WD_STYLE_TYPE
from docx.oxml.ns import qn
from docx.oxml.xmlchemy import BaseOxmlElement

from .errors import CORRUPT, EMPTY, UNSUPPORTED, IngestError
from .model import DocumentMetadata, Extraction, Section
from .normalize import collapse_spaces, normalize_text
from .settings import IngestSettings
from .text import PREAMBLE_LABEL, WHOLE_DOCUMENT_LABEL
from .titles import sensible_title, trim_title
from .watchdog import Deadline
from .zipguard import unpack

_P, _T, _TBL, _TR, _TC = qn("w:p"), qn("w:t"), qn("w:tbl"), qn("w:tr"), qn("w:tc")
_WRAPPERS = frozenset({qn("w:sdt"), qn("w:sdtContent"), qn("w:customXml")})
_RUN_ITEMS = (
    ".//w:r[not(ancestor::w:txbxContent) and not(ancestor::w:del) and not(ancestor::w:moveFrom)]"
    "/*[self::w:t or self::w:tab or self::w:br or self::w:cr or self::w:noBreakHyphen]"
)
_RUN_ITEM_TEXT = {qn("w:tab"): "\t", qn("w:br"): "\n", qn("w:cr"): "\n", qn("w:noBreakHyphen"): "-"}
_HEADING_NAME = re.compile(r"^(heading [1-9]|title)$", re.IGNORECASE)
_OUTLINE_LEVEL = "./w:pPr/w:outlineLvl/@w:val"
_APP_PAGES = re.compile(rb"<(?:\w+:)?Pages>\s*(\d+)\s*</")
MAX_STYLE_DEPTH = 10
MAX_APP_XML_BYTES = 1 << 20


def read_docx(data: bytes, deadline: Deadline, settings: IngestSettings) -> Extraction:
    """Read a DOCX into heading-delimited sections; raises IngestError on any failure."""
    package = unpack(data, settings, deadline)
    deadline.check()
    page_count = _page_count(package)
    document = _open(package)
    del package  # python-docx holds what it needs; the re-packed copy can go
    deadline.check()
    heading_styles = _heading_style_ids(document)
    sections = _sections(document.element.body, heading_styles, deadline)
    if not sections:
        raise IngestError(EMPTY, "The Word document contains no text.")
    first_heading = next(
        (s.label for s in sections if s.label not in (PREAMBLE_LABEL, WHOLE_DOCUMENT_LABEL)), None
    )
    core_title, metadata = _metadata(document, page_count)
    return Extraction(
        kind="docx", sections=tuple(sections), metadata=metadata, title_hints=(core_title, first_heading)
    )


def _open(package: bytes) -> docx.document.Document:
    try:
        return docx.Document(io.BytesIO(package))
    except ValueError as exc:
        if "not a Word file" in str(exc):
            raise IngestError(
                UNSUPPORTED,
                "Macro-enabled Word files and templates are not supported; save the file as .docx.",
            ) from exc
        raise IngestError(CORRUPT, "The Word document is damaged and could not be read.") from exc
    except Exception as exc:
        raise IngestError(CORRUPT, "The Word document is damaged and could not be read.") from exc


def _heading_style_ids(document: docx.document.Document) -> frozenset[str]:
    """Paragraph styles that start a section: "Heading N"/"Title", styles based on them, or
    styles with an outline level (what Word's navigation pane shows)."""
    ids: set[str] = set()
    for style in document.styles:
        if style.type != WD_STYLE_TYPE.PARAGRAPH or not style.style_id:
            continue
        current, depth = style, 0
        while current is not None and depth < MAX_STYLE_DEPTH:
            if _HEADING_NAME.match(current.name or "") or _outline_level(current.element) is not None:
                ids.add(style.style_id)
                break
            current, depth = current.base_style, depth + 1
    return frozenset(ids)


def _outline_level(element: BaseOxmlElement) -> int | None:
    values = element.xpath(_OUTLINE_LEVEL)
    if values and str(values[0]).isdigit() and int(values[0]) < 9:
        return int(values[0])
    return None


def _sections(body: BaseOxmlElement, heading_styles: frozenset[str], deadline: Deadline) -> list[Section]:
    """Group body blocks into sections, each starting at a heading and including it."""
    groups: list[tuple[str, list[str]]] = [(PREAMBLE_LABEL, [])]
    for element in _blocks(body):
        deadline.check()
        if element.tag == _TBL:
            table = pipe_table(element)
            if table:
                groups[-1][1].append(table)
            continue
        text = normalize_text(paragraph_text(element))
        if not text:
            continue
        if _is_heading(element, heading_styles):
            groups.append((trim_title(collapse_spaces(text)), [text]))
        else:
            groups[-1][1].append(text)
    sections: list[Section] = []
    for label, blocks in groups:
        if blocks:
            sections.append(Section(label, len(sections) + 1, "\n\n".join(blocks)))
    if len(sections) == 1 and sections[0].label == PREAMBLE_LABEL:
        return [Section(WHOLE_DOCUMENT_LABEL, 1, sections[0].text)]
    return sections


def _blocks(container: BaseOxmlElement) -> Iterator[BaseOxmlElement]:
    """Paragraph and table elements of ``container`` in order, looking inside content controls."""
    for child in container.iterchildren():
        if child.tag in (_P, _TBL):
            yield child
        elif child.tag in _WRAPPERS:
            yield from _blocks(child)


def _is_heading(paragraph: BaseOxmlElement, heading_styles: frozenset[str]) -> bool:
    style_ids = paragraph.xpath("./w:pPr/w:pStyle/@w:val")
    if style_ids and str(style_ids[0]) in heading_styles:
        return True
    return _outline_level(paragraph) is not None


def paragraph_text(paragraph: BaseOxmlElement) -> str:
    """Visible text of a ``w:p`` element, tabs and line breaks included, deletions excluded."""
    parts: list[str] = []
    for item in paragraph.xpath(_RUN_ITEMS):
        if item.tag == _T:
            parts.append(item.text or "")
        else:
            parts.append(_RUN_ITEM_TEXT.get(item.tag, ""))
    return "".join(parts)


def pipe_table(table: BaseOxmlElement) -> str:
    """Render a ``w:tbl`` as a Markdown pipe table; an all-empty table renders as ""."""
    rows = [[_cell_text(cell) for cell in _children(row, _TC)] for row in _children(table, _TR)]
    rows = [row for row in rows if row]
    if not any(any(row) for row in rows):
        return ""
    width = max(len(row) for row in rows)
    lines = [_pipe_row(row + [""] * (width - len(row))) for row in rows]
    lines.insert(1, _pipe_row(["---"] * width))
    return "\n".join(lines)


def _pipe_row(cells: list[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def _children(element: BaseOxmlElement, tag: str) -> Iterator[BaseOxmlElement]:
    for child in element.iterchildren():
        if child.tag == tag:
            yield child
        elif child.tag in _WRAPPERS:
            yield from _children(child, tag)


def _cell_text(cell: BaseOxmlElement) -> str:
    """One-line cell text; nested tables are flattened into it and pipes escaped."""
    parts: list[str] = []
    for element in _blocks(cell):
        if element.tag == _TBL:
            parts.extend(
                _cell_text(inner) for row in _children(element, _TR) for inner in _children(row, _TC)
            )
        else:
            parts.append(paragraph_text(element))
    text = collapse_spaces(normalize_text(" ".join(part for part in parts if part)))
    return text.replace("|", "\\|")


def _metadata(document: docx.document.Document, page_count: int | None) -> tuple[str | None, DocumentMetadata]:
    """Core properties (title, author, dates) and the page count Word stored when saving."""
    try:
        core = document.core_properties
        title, author = sensible_title(core.title), collapse_spaces(core.author or "") or None
        created, modified = _iso(core.created), _iso(core.modified)
    except Exception:
        title = author = created = modified = None
    return title, DocumentMetadata(
        author=author, created=created, modified=modified, page_count=page_count
    )


def _iso(value: object) -> str | None:
    return value.isoformat() if isinstance(value, datetime) else None


def _page_count(package: bytes) -> int | None:
    """The page count Word stored, from the re-packed package whose sizes are true."""
    try:
        with zipfile.ZipFile(io.BytesIO(package)) as archive:
            info = archive.getinfo("docProps/app.xml")
            if info.file_size > MAX_APP_XML_BYTES:
                return None
            match = _APP_PAGES.search(archive.read(info))
    except (KeyError, zipfile.BadZipFile, OSError, ValueError, EOFError):
        return None
    return int(match.group(1)) if match else None
