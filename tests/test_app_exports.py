"""Summary and transcript exports: the files open with python-docx and pypdf and say what they should."""

from __future__ import annotations

import io
from datetime import UTC, datetime

import docx
import pytest
from pypdf import PdfReader

from app.services import exports, pdf_export
from storage import ChatSessionInfo, DocumentRef, MessageInfo, SessionDocumentInfo, SummaryInfo

WHEN = datetime(2025, 3, 4, 5, 6, tzinfo=UTC)
CYRILLIC = "Арендатор обязан платить вовремя"
GREEK = "Ο μισθωτής πληρώνει"


def summary() -> SummaryInfo:
    return SummaryInfo(
        id=1,
        documents=(DocumentRef("a" * 64, "Договор аренды"),),
        text=f"The lease runs for two years.\n\n{CYRILLIC}. {GREEK}.\x0c",
        citations=[{"document_id": 1, "document_title": "Договор аренды", "page": 3, "quote": CYRILLIC,
                    "verified": True, "start": 0, "end": 10}],
        model_name="demo-model",
        created_at=WHEN,
    )


def transcript() -> exports.Report:
    chat = ChatSessionInfo(7, "Вопросы по договору", WHEN, WHEN, 2)
    documents = [SessionDocumentInfo(0, 1, "Договор аренды", "a" * 64), SessionDocumentInfo(1, None, "Old", "b" * 64)]
    messages = [
        MessageInfo(1, 7, 0, WHEN, "user", "Кто платит за ремонт?", None, [], "complete"),
        MessageInfo(2, 7, 1, WHEN, "assistant", f"{GREEK} and the landlord repairs.", "thinking", [
            {"document_title": "Договор аренды", "page": 2, "quote": "repairs", "verified": False},
        ], "cancelled"),
    ]
    return exports.transcript_report(chat, documents, messages, "demo-model")


def pdf_text(data: bytes) -> str:
    return "\n".join(page.extract_text() for page in PdfReader(io.BytesIO(data)).pages)


def docx_text(data: bytes) -> str:
    return "\n".join(p.text for p in docx.Document(io.BytesIO(data)).paragraphs)


def test_summary_exports_contain_title_text_citations_and_non_latin_text():
    report = exports.summary_report(summary())
    assert report.title == "Summary of Договор аренды"
    markdown = exports.to_markdown(report)
    for text in (exports.to_markdown(report), docx_text(exports.to_docx(report)), pdf_text(exports.to_pdf(report))):
        assert "Summary of Договор аренды" in text
        assert "The lease runs for two years." in text
        assert CYRILLIC in text and GREEK in text
        assert "page 3 (verified)" in text
        assert "demo-model" in text
    assert "\x0c" not in markdown


def test_transcript_exports_contain_questions_answers_and_status():
    report = transcript()
    for text in (exports.to_markdown(report), docx_text(exports.to_docx(report)), pdf_text(exports.to_pdf(report))):
        assert "Вопросы по договору" in text
        assert "Кто платит за ремонт?" in text
        assert GREEK in text
        assert "Stopped before the end." in text
        assert "Old (removed)" in text
        assert "page 2 (not verified)" in text


@pytest.mark.parametrize("fmt", ["md", "docx", "pdf"])
def test_render_returns_bytes_for_every_format(fmt):
    data = exports.render(exports.summary_report(summary()), fmt)
    assert isinstance(data, bytes) and data
    assert exports.MIME_TYPES[fmt]


def test_pdf_without_a_unicode_font_still_opens(monkeypatch):
    monkeypatch.setattr(pdf_export, "find_fonts", lambda: pdf_export.FontSet(None, None, ()))
    text = pdf_text(exports.to_pdf(exports.summary_report(summary())))
    assert "The lease runs for two years." in text
    assert "No Unicode font was found" in text


def test_a_unicode_font_is_found_on_this_system():
    fonts = pdf_export.find_fonts()
    if fonts.regular is None:
        pytest.skip("no DejaVu Sans on this system; PDFs fall back to Latin-1")
    assert fonts.regular.name == "DejaVuSans.ttf"


def test_file_names_are_safe_and_keep_letters():
    assert exports.file_name("Summary of Договор: аренды/2024?", "pdf") == "Summary-of-Договор-аренды2024.pdf"
    assert exports.file_name("???", "md") == "export.md"
