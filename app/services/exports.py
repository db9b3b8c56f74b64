"""Summaries and chat transcripts as Markdown, Word (.docx) and PDF files.

Both kinds of export are first turned into one neutral :class:`Report`, so the three
writers share a single idea of what an export contains. The Markdown file passes model
text through :mod:`.safe_markdown`, so opening it in a viewer fetches nothing and offers no
links; Word and PDF files hold the text as plain runs, without hyperlinks or images.
"""

from __future__ import annotations

import io
import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal

from docx import Document

from storage import ChatSessionInfo, MessageInfo, SessionDocumentInfo, SummaryInfo

from . import safe_markdown
from .pdf_export import render_pdf

Format = Literal["md", "docx", "pdf"]
MIME_TYPES: dict[Format, str] = {
    "md": "text/markdown",
    "docx": "application/vnd.openxmlformats-officedocument.wordprocessingml.document",
    "pdf": "application/pdf",
}
_STATUS_NOTES = {"cancelled": "Stopped before the end.", "error": "The answer failed.", "streaming": "Unfinished."}
# Word documents are XML; these control characters are not allowed in XML 1.0.
_XML_ILLEGAL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\ufffe\uffff]")


@dataclass(frozen=True, slots=True)
class CitationLine:
    document_title: str
    page: int | None
    quote: str
    verified: bool

    @property
    def where(self) -> str:
        return self.document_title if self.page is None else f"{self.document_title}, page {self.page}"

    @property
    def mark(self) -> str:
        return "verified" if self.verified else "not verified"


@dataclass(frozen=True, slots=True)
class Section:
    heading: str
    text: str
    citations: tuple[CitationLine, ...] = ()
    note: str = ""


@dataclass(frozen=True, slots=True)
class Report:
    title: str
    details: tuple[tuple[str, str], ...]
    sections: tuple[Section, ...]


def format_time(moment: datetime) -> str:
    return moment.strftime("%Y-%m-%d %H:%M UTC") if moment.tzinfo else moment.strftime("%Y-%m-%d %H:%M")


def citation_lines(citations: Sequence[dict[str, Any]]) -> tuple[CitationLine, ...]:
    return tuple(
        CitationLine(
            document_title=str(c.get("document_title") or "Unknown document"),
            page=c.get("page"),
            quote=str(c.get("quote") or ""),
            verified=bool(c.get("verified")),
        )
        for c in citations
    )


def summary_title(summary: SummaryInfo) -> str:
    titles = [ref.title for ref in summary.documents]
    if len(titles) == 1:
        return f"Summary of {titles[0]}"
    return f"Summary of {len(titles)} documents"


def summary_report(summary: SummaryInfo) -> Report:
    details = (
        ("Date", format_time(summary.created_at)),
        ("Model", summary.model_name),
        ("Documents", "; ".join(ref.title for ref in summary.documents)),
    )
    section = Section("Summary", summary.text, citation_lines(summary.citations))
    return Report(summary_title(summary), details, (section,))


def transcript_report(
    chat: ChatSessionInfo,
    documents: Sequence[SessionDocumentInfo],
    messages: Sequence[MessageInfo],
    model_name: str = "",
) -> Report:
    details = [("Created", format_time(chat.created_at)), ("Last activity", format_time(chat.updated_at))]
    if model_name:
        details.append(("Model", model_name))
    details.append(("Documents", "; ".join(d.display_title for d in documents) or "none"))
    sections = tuple(
        Section(
            heading=f"{'Question' if m.role == 'user' else 'Answer'} · {format_time(m.created_at)}",
            text=m.text,
            citations=citation_lines(m.citations),
            note=_STATUS_NOTES.get(m.status, ""),
        )
        for m in messages
        if m.role in ("user", "assistant")
    )
    return Report(chat.name, tuple(details), sections)


def to_markdown(report: Report) -> str:
    lines = [f"# {literal(report.title)}", ""]
    lines += [f"- **{label}:** {literal(value)}" for label, value in report.details]
    for section in report.sections:
        lines += ["", f"## {literal(section.heading)}", ""]
        if section.note:
            lines += [f"*{section.note}*", ""]
        lines.append(safe_markdown.render(section.text.strip()) or "*(empty)*")
        if section.citations:
            lines += ["", "**Citations**", ""]
            for number, citation in enumerate(section.citations, 1):
                quote = " ".join(citation.quote.split())
                lines.append(f"{number}. {literal(citation.where)} ({citation.mark}): “{literal(quote)}”")
    return xml_safe("\n".join(lines).rstrip()) + "\n"


def literal(value: str) -> str:
    """One line of Markdown showing ``value`` literally: titles, document names and quotes
    come from uploads or the model."""
    return safe_markdown.plain(" ".join(value.split()))


def xml_safe(text: str) -> str:
    return _XML_ILLEGAL.sub("", text)


def to_docx(report: Report) -> bytes:
    document = Document()
    document.core_properties.title = xml_safe(report.title)[:255]
    document.add_heading(xml_safe(report.title), level=0)
    for label, value in report.details:
        paragraph = document.add_paragraph()
        paragraph.add_run(f"{label}: ").bold = True
        paragraph.add_run(xml_safe(value))
    for section in report.sections:
        document.add_heading(xml_safe(section.heading), level=1)
        if section.note:
            document.add_paragraph().add_run(section.note).italic = True
        for block in paragraphs(section.text) or ["(empty)"]:
            document.add_paragraph(xml_safe(block))
        if section.citations:
            document.add_heading("Citations", level=2)
            for citation in section.citations:
                paragraph = document.add_paragraph(style="List Number")
                paragraph.add_run(xml_safe(f"{citation.where} ({citation.mark}): ")).bold = True
                paragraph.add_run(xml_safe(f"“{' '.join(citation.quote.split())}”"))
    buffer = io.BytesIO()
    document.save(buffer)
    return buffer.getvalue()


def paragraphs(text: str) -> list[str]:
    """Split on blank lines; single line breaks inside a paragraph are kept."""
    return [block.strip("\n") for block in re.split(r"\n\s*\n", text.strip()) if block.strip()]


def to_pdf(report: Report) -> bytes:
    return render_pdf(report)


def render(report: Report, fmt: Format) -> bytes:
    if fmt == "md":
        return to_markdown(report).encode("utf-8")
    if fmt == "docx":
        return to_docx(report)
    return to_pdf(report)


def file_name(title: str, fmt: Format) -> str:
    """A file name that is safe on every common file system but keeps non-Latin letters."""
    stem = re.sub(r"[^\w\s.-]", "", title, flags=re.UNICODE)
    stem = re.sub(r"\s+", "-", stem.strip()).strip(".-")[:80] or "export"
    return f"{stem}.{fmt}"
