"""Behaviour of ``ingest.extract`` on small documents built on the fly, one per format and failure."""

from __future__ import annotations

import codecs
import hashlib
import io
import random
import struct
import time
import zipfile

import docx
import fpdf
import pypdf
import pytest
from docx.oxml.parser import OxmlElement

import ingest
from ingest import ExtractedDocument, IngestError, IngestSettings
from ingest.normalize import margins_warning
from ingest.watchdog import Deadline


def in_this_process(monkeypatch: pytest.MonkeyPatch) -> None:
    """Run extraction here instead of in a child process, so the library patches below reach it."""

    def run_here(work, args, limits, progress=None):
        return work(*args, Deadline(limits.time_limit_s))

    monkeypatch.setattr("ingest.pipeline.run_isolated", run_here)


def assert_invariants(doc: ExtractedDocument, data: bytes) -> None:
    """Offsets slice the text exactly, units are joined by blank lines, and hashes match."""
    assert doc.sha256 == hashlib.sha256(data).hexdigest()
    assert doc.size == len(data)
    assert doc.text == "\n\n".join(unit.text for unit in doc.units)
    for unit in doc.units:
        assert doc.text[unit.start : unit.end] == unit.text
        assert unit.text
    assert [u.start for u in doc.units] == sorted(u.start for u in doc.units)


def extract_ok(data: bytes, filename: str, **kwargs: object) -> ExtractedDocument:
    doc = ingest.extract(data, filename, **kwargs)  # type: ignore[arg-type]
    assert_invariants(doc, data)
    return doc


def reason_of(data: bytes, filename: str, **kwargs: object) -> str:
    with pytest.raises(IngestError) as caught:
        ingest.extract(data, filename, **kwargs)  # type: ignore[arg-type]
    assert str(caught.value)
    return caught.value.reason


def make_pdf(pages: list[list[str]], *, title: str | None = None, author: str | None = None) -> bytes:
    """A text PDF with one line per entry; the last line of each page sits at the bottom margin."""
    pdf = fpdf.FPDF()
    pdf.set_font("helvetica", size=11)
    if title:
        pdf.set_title(title)
    if author:
        pdf.set_author(author)
    for lines in pages:
        pdf.add_page()
        for row, line in enumerate(lines):
            pdf.text(20, 15 + 6 * row, line)
    return bytes(pdf.output())


def report_pdf(page_count: int = 4) -> bytes:
    pages = [
        [
            "ACME Corporation - Internal",
            f"Body of page {n} talks about an exam-",
            "ple of hyphenation and Jean-",
            "Paul stays.",
            f"Page {n} of {page_count}",
        ]
        for n in range(1, page_count + 1)
    ]
    return make_pdf(pages, title="Quarterly Report", author="Ada Lovelace")


def encrypt(data: bytes, user_password: str, owner_password: str = "owner-secret") -> bytes:
    writer = pypdf.PdfWriter(clone_from=io.BytesIO(data))
    writer.encrypt(user_password, owner_password, algorithm="AES-256")
    out = io.BytesIO()
    writer.write(out)
    return out.getvalue()


def blank_pdf(page_count: int = 1) -> bytes:
    writer = pypdf.PdfWriter()
    for _ in range(page_count):
        writer.add_blank_page(width=595, height=842)
    out = io.BytesIO()
    writer.write(out)
    return out.getvalue()


# PDF


def test_pdf_pages_become_units_with_margins_removed() -> None:
    doc = extract_ok(report_pdf(), "report.pdf")
    assert doc.kind == "pdf"
    assert [(u.label, u.number) for u in doc.units] == [(f"page {n}", n) for n in range(1, 5)]
    assert "ACME Corporation" not in doc.text
    assert "of 4" not in doc.text
    assert "Body of page 3" in doc.units[2].text
    assert "example of hyphenation" in doc.text
    assert "Jean-\nPaul" in doc.text
    assert doc.title == "Quarterly Report"
    assert doc.metadata.author == "Ada Lovelace"
    assert doc.metadata.page_count == 4
    assert doc.metadata.created is not None


def test_pdf_short_documents_keep_first_and_last_lines() -> None:
    doc = extract_ok(report_pdf(page_count=2), "report.pdf")
    assert doc.text.count("ACME Corporation - Internal") == 2


def test_pdf_junk_metadata_title_falls_back_to_first_line() -> None:
    data = make_pdf([["Annual Summary", "Body text."]], title="Microsoft Word - draft3.doc")
    assert extract_ok(data, "x.pdf").title == "Annual Summary"


def test_pdf_detected_by_content_not_extension() -> None:
    assert extract_ok(report_pdf(), "misnamed.txt").kind == "pdf"


def test_pdf_with_user_password_is_rejected_as_encrypted() -> None:
    with pytest.raises(IngestError) as caught:
        ingest.extract(encrypt(report_pdf(), "user-secret"), "locked.pdf")
    assert caught.value.reason == "encrypted"
    assert "password-protected" in str(caught.value)


def test_pdf_with_empty_user_password_opens() -> None:
    doc = extract_ok(encrypt(report_pdf(), ""), "restricted.pdf")
    assert "Body of page 1" in doc.text


def test_pdf_of_blank_pages_is_empty_not_scanned() -> None:
    """Nothing drawn at all: there is no image for OCR to read (scans are in tests/test_ingest_ocr.py)."""
    with pytest.raises(IngestError) as caught:
        ingest.extract(blank_pdf(2), "scan.pdf")
    assert caught.value.reason == "empty"
    assert "neither text nor images" in str(caught.value)


def test_pdf_blank_page_is_skipped_but_numbering_kept() -> None:
    writer = pypdf.PdfWriter()
    writer.add_blank_page(width=595, height=842)
    writer.append(io.BytesIO(make_pdf([["Second page text."]])))
    out = io.BytesIO()
    writer.write(out)
    doc = extract_ok(out.getvalue(), "x.pdf")
    assert [(u.label, u.number) for u in doc.units] == [("page 2", 2)]
    assert doc.metadata.page_count == 2


@pytest.mark.parametrize(
    "data",
    [
        b"%PDF-1.7\n",
        b"%PDF-1.4\n1 0 obj << /Type /Catalog >> endobj\ntrailer <<>>\n%%EOF",
        b"%PDF-\x00\xff" * 50,
    ],
    ids=["header-only", "no-pages", "garbage"],
)
def test_pdf_damaged(data: bytes) -> None:
    assert reason_of(data, "broken.pdf") in {"corrupt", "empty"}


def test_pdf_truncated_gives_text_or_ingest_error() -> None:
    data = report_pdf()
    for cut in (len(data) // 3, len(data) // 2, len(data) - 50):
        try:
            extract_ok(data[:cut], "cut.pdf")
        except IngestError as exc:
            assert exc.reason in ingest.REASONS


@pytest.mark.parametrize("error", [RecursionError(), struct.error("bad"), KeyError("/Root"), MemoryError()])
def test_pdf_library_exceptions_are_wrapped(monkeypatch: pytest.MonkeyPatch, error: BaseException) -> None:
    in_this_process(monkeypatch)
    def explode(*_: object, **__: object) -> None:
        raise error

    monkeypatch.setattr("ingest.pdf.PdfReader", explode)
    assert reason_of(report_pdf(), "x.pdf") in {"corrupt", "too_large"}


def test_pdf_failing_pages_are_skipped_with_warning(monkeypatch: pytest.MonkeyPatch) -> None:
    in_this_process(monkeypatch)
    original = pypdf.PageObject.extract_text
    calls = iter(range(100))

    def flaky(self: pypdf.PageObject, *args: object, **kwargs: object) -> str:
        if next(calls) == 1:
            raise ValueError("broken content stream")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(pypdf.PageObject, "extract_text", flaky)
    doc = extract_ok(report_pdf(), "x.pdf")
    assert [u.number for u in doc.units] == [1, 3, 4]
    assert doc.warnings == (
        "page 2 could not be read and was skipped",
        "Running headers/footers repeated on 3 pages were left out of the text (shown in the reader)",
    )


def test_pdf_all_pages_failing_is_corrupt(monkeypatch: pytest.MonkeyPatch) -> None:
    in_this_process(monkeypatch)
    def broken(*_: object, **__: object) -> str:
        raise KeyError("/Contents")

    monkeypatch.setattr(pypdf.PageObject, "extract_text", broken)
    assert reason_of(report_pdf(), "x.pdf") == "corrupt"


# Time limit


def test_slow_pages_hit_the_deadline_between_pages(monkeypatch: pytest.MonkeyPatch) -> None:
    in_this_process(monkeypatch)
    def slow(*_: object, **__: object) -> str:
        time.sleep(0.05)
        return "text"

    monkeypatch.setattr(pypdf.PageObject, "extract_text", slow)
    started = time.monotonic()
    assert reason_of(report_pdf(page_count=30), "x.pdf", time_limit_s=0.2) == "timeout"
    assert time.monotonic() - started < 1.0


# A page stuck inside a library call is stopped by killing the extraction process: see
# tests/test_ingest_isolation.py, which does not depend on patching the library.


# DOCX


def word_document() -> bytes:
    document = docx.Document()
    document.core_properties.title = "Field Study"
    document.core_properties.author = "Grace Hopper"
    section = document.sections[0]
    section.header.paragraphs[0].text = "CONFIDENTIAL HEADER"
    section.footer.paragraphs[0].text = "FOOTER LINE"
    document.add_paragraph("Opening remarks.")
    document.add_heading("Introduction", level=1)
    document.add_paragraph("Before table.")
    table = document.add_table(rows=2, cols=2)
    for cell, value in zip(table._cells, ["a", "b", "c", "d|e"], strict=False):
        cell.text = value
    document.add_paragraph("After table.")
    document.add_heading("Results", level=2)
    document.add_paragraph("Numbers went up.")
    out = io.BytesIO()
    document.save(out)
    return out.getvalue()


def test_docx_headings_start_sections() -> None:
    doc = extract_ok(word_document(), "study.docx")
    assert doc.kind == "docx"
    assert [(u.label, u.number) for u in doc.units] == [("Preamble", 1), ("Introduction", 2), ("Results", 3)]
    assert doc.units[1].text.startswith("Introduction")
    assert doc.title == "Field Study"
    assert doc.metadata.author == "Grace Hopper"


def test_docx_tables_are_pipe_tables_in_order() -> None:
    doc = extract_ok(word_document(), "study.docx")
    before, table, after = (doc.text.index(s) for s in ("Before table.", "| a | b |", "After table."))
    assert before < table < after
    assert "| --- | --- |" in doc.text
    assert "| c | d\\|e |" in doc.text


def test_docx_headers_and_footers_are_excluded() -> None:
    doc = extract_ok(word_document(), "study.docx")
    assert "CONFIDENTIAL HEADER" not in doc.text
    assert "FOOTER LINE" not in doc.text


def test_docx_without_headings_is_one_unit_titled_by_first_line() -> None:
    document = docx.Document()
    document.add_paragraph("Minutes of the meeting")
    document.add_paragraph("Everyone attended.")
    out = io.BytesIO()
    document.save(out)
    doc = extract_ok(out.getvalue(), "minutes.docx")
    assert [u.label for u in doc.units] == ["Document"]
    assert doc.title == "Minutes of the meeting"


def test_docx_tracked_insertions_and_content_controls_are_kept() -> None:
    document = docx.Document()
    paragraph = document.add_paragraph("Base ")
    insertion = OxmlElement("w:ins")
    run = OxmlElement("w:r")
    text = OxmlElement("w:t")
    text.text = "inserted words"
    run.append(text)
    insertion.append(run)
    paragraph._p.append(insertion)
    control = OxmlElement("w:sdt")
    content = OxmlElement("w:sdtContent")
    content.append(document.add_paragraph("Inside a content control")._p)
    control.append(content)
    document.element.body.insert(0, control)
    out = io.BytesIO()
    document.save(out)
    doc = extract_ok(out.getvalue(), "x.docx")
    assert "Base inserted words" in doc.text
    assert doc.text.startswith("Inside a content control")


def test_docx_without_text_is_empty() -> None:
    out = io.BytesIO()
    docx.Document().save(out)
    assert reason_of(out.getvalue(), "blank.docx") == "empty"


def _zip(members: dict[str, bytes]) -> bytes:
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, payload in members.items():
            archive.writestr(name, payload)
    return out.getvalue()


def test_docx_zip_bomb_rejected_by_ratio() -> None:
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("[Content_Types].xml", b"<Types/>")
        with archive.open("word/document.xml", "w") as member:
            chunk = b"\0" * (1 << 20)
            for _ in range(20):
                member.write(chunk)
    assert reason_of(out.getvalue(), "bomb.docx") == "zip_bomb"


def test_docx_zip_bomb_rejected_by_total_size() -> None:
    settings = IngestSettings(zip_max_total_bytes=10_000)
    assert reason_of(word_document(), "study.docx", settings=settings) == "zip_bomb"


def test_docx_zip_bomb_rejected_by_member_count() -> None:
    members = {f"word/media/{n}.bin": b"x" for n in range(50)} | {"word/document.xml": b"<w:document/>"}
    settings = IngestSettings(zip_max_members=20)
    assert reason_of(_zip(members), "many.docx", settings=settings) == "zip_bomb"


def test_docx_with_broken_xml_is_corrupt() -> None:
    members = {"[Content_Types].xml": b"<Types", "word/document.xml": b"<not xml"}
    assert reason_of(_zip(members), "broken.docx") == "corrupt"


def test_docx_truncated_is_corrupt() -> None:
    data = word_document()
    assert reason_of(data[: len(data) // 2], "cut.docx") == "corrupt"


def test_zip_that_is_not_docx_is_unsupported() -> None:
    assert reason_of(_zip({"notes/readme.txt": b"hello"}), "archive.zip") == "unsupported"
    assert reason_of(_zip({"xl/workbook.xml": b"<workbook/>"}), "sheet.xlsx") == "unsupported"


def test_legacy_and_encrypted_office_containers() -> None:
    ole = b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1" + b"\0" * 504
    assert reason_of(ole + b"WordDocument", "old.doc") == "unsupported"
    assert reason_of(ole + "EncryptedPackage".encode("utf-16-le"), "locked.docx") == "encrypted"


# Text and Markdown

ACCENTED = "Café crème brûlée, naïve façade.\nSecond line."


@pytest.mark.parametrize(
    "data",
    [
        codecs.BOM_UTF8 + ACCENTED.encode("utf-8"),
        ACCENTED.encode("utf-16"),
        ACCENTED.encode("utf-16-be"),
        ACCENTED.encode("utf-16-le"),
        ACCENTED.encode("utf-8"),
        ACCENTED.encode("latin-1"),
    ],
    ids=["utf8-bom", "utf16-bom", "utf16-be-nobom", "utf16-le-nobom", "utf8", "latin1"],
)
def test_text_encodings(data: bytes) -> None:
    doc = extract_ok(data, "notes.txt")
    assert doc.kind == "txt"
    assert doc.text == ACCENTED
    assert [u.label for u in doc.units] == ["Document"]
    assert doc.title == "Café crème brûlée, naïve façade."


def test_text_form_feeds_split_pages() -> None:
    data = b"First page.\fSecond page.\f\fFourth page.\f"
    doc = extract_ok(data, "printout.txt")
    assert [(u.label, u.number) for u in doc.units] == [("page 1", 1), ("page 2", 2), ("page 4", 4)]
    assert doc.metadata.page_count == 4


def test_text_normalisation_applied() -> None:
    data = "Line one\r\n\r\n\r\n\r\nThe \ufb01nal e\u0301t\u00e9\x07 day\t end   \r\n".encode()
    assert extract_ok(data, "a.txt").text == "Line one\n\nThe final \u00e9t\u00e9 day\t end"


def test_markdown_headings_start_sections() -> None:
    data = b"Intro line.\n\n# Overview\n\nSome text.\n\n```\n# not a heading\n```\n\n## Details ##\n\nMore.\n"
    doc = extract_ok(data, "README.md")
    assert doc.kind == "md"
    assert [(u.label, u.number) for u in doc.units] == [("Preamble", 1), ("Overview", 2), ("Details", 3)]
    assert "# not a heading" in doc.units[1].text
    assert doc.units[2].text.startswith("## Details")
    assert doc.title == "Overview"


def test_markdown_without_headings_is_one_unit() -> None:
    doc = extract_ok(b"Just a paragraph.\n", "note.markdown")
    assert [u.label for u in doc.units] == ["Document"]


# Rejections before parsing


@pytest.mark.parametrize("data", [b"", b"   \n\t\n"], ids=["zero-bytes", "whitespace"])
def test_empty_files(data: bytes) -> None:
    assert reason_of(data, "empty.txt") == "empty"


def test_empty_after_decoding() -> None:
    assert reason_of("\ufeff \n".encode("utf-16"), "empty.txt") == "empty"


def test_too_large() -> None:
    with pytest.raises(IngestError) as caught:
        ingest.extract(b"x" * 101, "big.txt", max_bytes=100)
    assert caught.value.reason == "too_large"
    assert "101 bytes" in str(caught.value)


@pytest.mark.parametrize(
    "data",
    [
        b"\x89PNG\r\n\x1a\n" + b"\0" * 64,
        b"\xff\xd8\xff\xe0" + b"\0" * 64,
        b"GIF89a" + b"\1" * 64,
        b"{\\rtf1\\ansi hello}",
        random.Random(1234).randbytes(4096),
        b"text with a NUL \0 byte in the middle of it all",
        bytes(range(1, 32)) * 20,
    ],
    ids=["png", "jpeg", "gif", "rtf", "random-bytes", "nul-byte", "control-chars"],
)
def test_unsupported_content(data: bytes) -> None:
    assert reason_of(data, "upload.bin") == "unsupported"


def test_misnamed_non_pdf_is_corrupt() -> None:
    assert reason_of(b"<html>Not found</html>", "paper.pdf") == "corrupt"


def test_overrides_keep_other_settings() -> None:
    settings = IngestSettings(zip_max_members=3)
    with pytest.raises(IngestError) as caught:
        ingest.extract(word_document(), "x.docx", settings=settings, time_limit_s=30)
    assert caught.value.reason == "zip_bomb"


def test_non_bytes_input_is_a_type_error() -> None:
    with pytest.raises(TypeError):
        ingest.extract("text", "a.txt")  # type: ignore[arg-type]


def test_bytearray_accepted() -> None:
    data = bytearray(b"hello world")
    assert ingest.extract(data, "a.txt").text == "hello world"  # type: ignore[arg-type]


def test_text_mentioning_pdf_header_stays_text() -> None:
    doc = extract_ok(b"Notes on file formats: a PDF starts with %PDF-1.7 and ends with %%EOF.", "notes.txt")
    assert doc.kind == "txt"


def test_pdf_header_after_leading_junk_is_still_pdf() -> None:
    assert extract_ok(b"\r\n   " + report_pdf(), "x.pdf").kind == "pdf"


def test_text_form_feed_pages_keep_their_removed_margins() -> None:
    pages = [f"ACME LEASE\nClause {n}: the tenant pays rent.\nPage {n}" for n in range(1, 5)]
    doc = extract_ok("\f".join(pages).encode(), "lease.txt")
    assert [u.text for u in doc.units] == [f"Clause {n}: the tenant pays rent." for n in range(1, 5)]
    margins = [(u.removed_header, u.removed_footer) for u in doc.units]
    assert margins == [("ACME LEASE", f"Page {n}") for n in range(1, 5)]
    assert doc.warnings == (margins_warning(4),)
    assert "4 pages were left out of the text" in doc.warnings[0]
