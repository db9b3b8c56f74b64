"""No document text is lost silently.

Every corpus document must give at least as many letters and digits as the plain library
readers (pypdf, python-docx) find in it, unless a warning says where the rest went. Generated
PDFs pin down the running-margin rules: only lines that are provably page furniture (same
text, same place, in the page's outer band, on most pages) leave the text, and they are kept
with the page. Titles that do not read as words fall back to the file name.
"""

from __future__ import annotations

import io
from pathlib import Path

import docx
import fpdf
import pypdf
import pytest
from pypdf.generic import ArrayObject, DecodedStreamObject, DictionaryObject, NameObject, NumberObject
from pypdf.generic import TextStringObject as Text

import ingest
from ingest import ExtractedDocument, IngestError
from ingest.normalize import normalize_text
from ingest.pdf_layout import read_page_lines
from tests.test_ingest_corpus import corpus_root

ROOT = corpus_root()
PDFS = sorted((ROOT / "pdf").glob("*.pdf")) if (ROOT / "pdf").is_dir() else []
DOCXS = sorted((ROOT / "docx").glob("*.docx")) if (ROOT / "docx").is_dir() else []
SKIP_REASON = f"document corpus not found at {ROOT}"
# The baselines go through the same character normalisation as our text (ligatures expanded,
# soft hyphens and control characters removed), so no tolerance is needed: not one letter or
# digit may go missing.
TOLERANCE = 0
MARGIN_WARNING = "Running headers/footers"


def letters_and_digits(text: str) -> int:
    return sum(ch.isalnum() for ch in text)


def with_margins(doc: ExtractedDocument) -> str:
    return "\n".join(part for u in doc.units for part in (u.removed_header, u.text, u.removed_footer))


def pypdf_baseline(data: bytes) -> int | None:
    """Letters and digits of plain ``extract_text()`` over all pages; None if pypdf needs a password."""
    reader = pypdf.PdfReader(io.BytesIO(data), strict=False)
    try:
        if reader.is_encrypted and reader.decrypt("") == pypdf.PasswordType.NOT_DECRYPTED:
            return None
        pages = list(reader.pages)
    except (pypdf.errors.FileNotDecryptedError, pypdf.errors.DependencyError, NotImplementedError):
        return None
    total = 0
    for page in pages:
        try:
            text = page.extract_text()
        except Exception:  # our reader skips such a page with a warning, and so does the count
            text = ""
        total += letters_and_digits(normalize_text(text, join_hyphens=True))
    return total


def python_docx_baseline(path: Path) -> int:
    """Body paragraphs plus table cells (merged cells once, nested tables included)."""
    document = docx.Document(str(path))
    parts = [p.text for p in document.paragraphs]
    seen: set[object] = set()

    def add_table(table: docx.table.Table) -> None:
        for row in table.rows:
            for cell in row.cells:
                if cell._tc in seen:
                    continue
                seen.add(cell._tc)
                parts.extend(p.text for p in cell.paragraphs)
                for inner in cell.tables:
                    add_table(inner)

    for table in document.tables:
        add_table(table)
    return letters_and_digits(normalize_text("\n".join(parts)))


@pytest.mark.skipif(not PDFS, reason=SKIP_REASON)
@pytest.mark.parametrize("path", PDFS, ids=[p.name for p in PDFS])
def test_pdf_keeps_every_letter_pypdf_finds(path: Path) -> None:
    data = path.read_bytes()
    baseline = pypdf_baseline(data)
    if baseline is None:
        # pypdf cannot read it without the user password either: it must be reported as locked.
        with pytest.raises(IngestError) as caught:
            ingest.extract(data, path.name)
        assert caught.value.reason == "encrypted"
        return
    try:
        doc = ingest.extract(data, path.name)
    except IngestError as exc:
        # Only a document without any text layer may be refused (until OCR reads it).
        assert (exc.reason, baseline) == ("scanned", 0), f"{path.name}: {exc.reason} but pypdf reads {baseline}"
        return
    ours = letters_and_digits(doc.text)
    if ours >= baseline - TOLERANCE:
        return
    assert any(w.startswith(MARGIN_WARNING) for w in doc.warnings), (
        f"{path.name}: {ours} letters and digits, pypdf {baseline}, and no warning says why"
    )
    assert letters_and_digits(with_margins(doc)) >= baseline - TOLERANCE


@pytest.mark.skipif(not DOCXS, reason=SKIP_REASON)
@pytest.mark.parametrize("path", DOCXS, ids=[p.name for p in DOCXS])
def test_docx_keeps_every_letter_python_docx_finds(path: Path) -> None:
    baseline = python_docx_baseline(path)
    try:
        doc = ingest.extract(path.read_bytes(), path.name)
    except IngestError as exc:
        assert (exc.reason, baseline) == ("empty", 0), f"{path.name}: {exc.reason} but python-docx reads {baseline}"
        return
    assert letters_and_digits(doc.text) >= baseline - TOLERANCE


# Corpus documents whose text is shorter than pypdf's by running margins alone (kept with the pages).
MARGIN_DOCUMENTS = {
    "GeoBase_NHNC1_Data_Model_UML_EN.pdf": "National Hydro Network, Data Model – Edition 1.0 2004-06",
    "indirect-rotation.pdf": "International Council of Containership Operators",
    "outline-without-title.pdf": "1",
    "outlines-with-invalid-destinations.pdf": "1",
    "pdflatex-outline.pdf": "1",
}


@pytest.mark.parametrize(("name", "first_margin"), sorted(MARGIN_DOCUMENTS.items()))
def test_corpus_running_margins_are_recorded(name: str, first_margin: str) -> None:
    path = corpus_file(name)
    doc = ingest.extract(path.read_bytes(), path.name)
    margins = [margin for u in doc.units for margin in (u.removed_header, u.removed_footer) if margin]
    assert margins[0] == first_margin
    trimmed = sum(1 for u in doc.units if u.removed_header or u.removed_footer)
    assert any(w.startswith(MARGIN_WARNING) and f"{trimmed} pages" in w for w in doc.warnings)
    assert letters_and_digits(with_margins(doc)) == pypdf_baseline(path.read_bytes())


def corpus_file(name: str) -> Path:
    path = ROOT / "pdf" / name
    if not path.is_file():
        pytest.skip(f"{name} is not in the corpus at {ROOT}")
    return path


def test_corpus_pages_holding_only_a_repeated_line_keep_it() -> None:
    path = corpus_file("imagemagick-images.pdf")
    doc = ingest.extract(path.read_bytes(), path.name)
    assert [u.text for u in doc.units] == ["Background"] * 4
    assert not any(u.removed_header or u.removed_footer for u in doc.units)


# Generated documents

FOOTER_Y_MM = 285
BODY_TOP_MM = 50
INVOICE_TOTALS = ("$1,250.00", "$2,100.50", "$980.00")
# Where each page's body ends: all in the bottom band of the page, but never at the same height.
TOTAL_Y_MM = (255, 265, 275)


def invoice_pdf() -> bytes:
    """Three invoice pages; the running footer is drawn first, as many producers do."""
    pdf = fpdf.FPDF()
    pdf.set_font("helvetica", size=11)
    pages = len(INVOICE_TOTALS)
    for number, (total, bottom) in enumerate(zip(INVOICE_TOTALS, TOTAL_Y_MM, strict=True), start=1):
        pdf.add_page()
        pdf.text(95, FOOTER_Y_MM, f"Page {number} of {pages}")
        pdf.text(20, BODY_TOP_MM, f"Invoice 2024-117, sheet {number}: consulting services")
        for row in range((bottom - BODY_TOP_MM) // 8):
            pdf.text(20, BODY_TOP_MM + 8 * (row + 1), f"Item {row + 1}: expert hours on part {number}.{row + 1}")
        pdf.text(20, bottom, f"Total due: {total}")
    return bytes(pdf.output())


def test_invoice_keeps_every_total_and_records_the_footer() -> None:
    doc = ingest.extract(invoice_pdf(), "invoice.pdf")
    assert [u.number for u in doc.units] == [1, 2, 3]
    for unit, total in zip(doc.units, INVOICE_TOTALS, strict=True):
        assert f"Total due: {total}" in unit.text
        assert "Page" not in unit.text
        assert (unit.removed_header, unit.removed_footer) == ("", f"Page {unit.number} of 3")
    assert doc.text.count("Total due") == 3
    assert any(w.startswith(MARGIN_WARNING) and "3 pages" in w for w in doc.warnings)


def test_pages_holding_one_repeated_line_keep_it() -> None:
    pdf = fpdf.FPDF()
    pdf.set_font("helvetica", size=11)
    for _ in range(4):
        pdf.add_page()
        pdf.text(20, 12, "Background")
    doc = ingest.extract(bytes(pdf.output()), "slides.pdf")
    assert [u.text for u in doc.units] == ["Background"] * 4
    assert not any(w.startswith(MARGIN_WARNING) for w in doc.warnings)


def test_same_text_at_different_heights_is_body_text() -> None:
    pdf = fpdf.FPDF()
    pdf.set_font("helvetica", size=11)
    for number in range(1, 5):
        pdf.add_page()
        pdf.text(20, 20, f"Clause {number} sets out the duties of the parties.")
        pdf.text(20, 255 + 8 * number, "Signed by both parties")
    doc = ingest.extract(bytes(pdf.output()), "clauses.pdf")
    assert doc.text.count("Signed by both parties") == 4


def test_real_running_header_and_page_numbers_leave_the_text_and_stay_with_the_page() -> None:
    pdf = fpdf.FPDF()
    pdf.set_font("helvetica", size=11)
    for number in range(1, 5):
        pdf.add_page()
        pdf.text(20, 12, "ACME Corporation - Master Agreement")
        pdf.text(20, 60, f"Clause {number}: the parties agree to term {number}.")
        pdf.text(100, 290, f"- {number} -")
    doc = ingest.extract(bytes(pdf.output()), "agreement.pdf")
    assert [u.text for u in doc.units] == [f"Clause {n}: the parties agree to term {n}." for n in range(1, 5)]
    assert [(u.removed_header, u.removed_footer) for u in doc.units] == [
        ("ACME Corporation - Master Agreement", f"- {n} -") for n in range(1, 5)
    ]


# Positions of lines


def helvetica_pdf(contents: list[str], *, forms: dict[str, str] | None = None, rotate: int = 0) -> bytes:
    """Pages drawn with hand-written content streams (A4, Helvetica, optional form XObjects)."""
    writer = pypdf.PdfWriter()
    font = writer._add_object(
        DictionaryObject(
            {
                NameObject("/Type"): NameObject("/Font"),
                NameObject("/Subtype"): NameObject("/Type1"),
                NameObject("/BaseFont"): NameObject("/Helvetica"),
                NameObject("/Encoding"): NameObject("/WinAnsiEncoding"),
            }
        )
    )
    fonts = DictionaryObject({NameObject("/F1"): font})
    xobjects = DictionaryObject()
    for name, body in (forms or {}).items():
        form = DecodedStreamObject()
        form.set_data(body.encode())
        form.update(
            {
                NameObject("/Type"): NameObject("/XObject"),
                NameObject("/Subtype"): NameObject("/Form"),
                NameObject("/BBox"): ArrayObject([NumberObject(v) for v in (0, 0, 595, 842)]),
                NameObject("/Resources"): DictionaryObject({NameObject("/Font"): fonts}),
            }
        )
        xobjects[NameObject(name)] = writer._add_object(form)
    for body in contents:
        page = writer.add_blank_page(width=595, height=842)
        page[NameObject("/Resources")] = DictionaryObject(
            {NameObject("/Font"): fonts, NameObject("/XObject"): xobjects}
        )
        content = DecodedStreamObject()
        content.set_data(body.encode())
        page[NameObject("/Contents")] = writer._add_object(content)
        if rotate:
            page[NameObject("/Rotate")] = NumberObject(rotate)
    out = io.BytesIO()
    writer.write(out)
    return out.getvalue()


def test_text_inside_forms_has_no_proven_position() -> None:
    # The header form draws at its own origin and the page places it at the top; pypdf reports
    # form text in the form's coordinates, so its height is unknown and the line stays. The page
    # number before the logo form is the page's own text, with a known place.
    pages = [
        f"q 1 0 0 1 72 800 cm /Hdr Do Q BT /F1 12 Tf 72 400 Td (Body text of page {n}) Tj ET "
        f"BT /F1 9 Tf 280 30 Td (Page {n} of 4) Tj ET /Logo Do"
        for n in range(1, 5)
    ]
    forms = {"/Hdr": "BT /F1 10 Tf 0 0 Td (ACME Confidential) Tj ET", "/Logo": "0 0 20 20 re f"}
    doc = ingest.extract(helvetica_pdf(pages, forms=forms), "forms.pdf")
    for unit in doc.units:
        assert unit.text == f"ACME Confidential\nBody text of page {unit.number}"
        assert (unit.removed_header, unit.removed_footer) == ("", f"Page {unit.number} of 4")


def test_rotated_pages_measure_height_on_screen() -> None:
    # /Rotate 90 turns the page clockwise: its right edge (large x) is the bottom on screen.
    pages = [
        f"BT /F1 12 Tf 0 1 -1 0 300 100 Tm (Body text of page {n}) Tj ET "
        f"BT /F1 9 Tf 0 1 -1 0 570 380 Tm (Page {n} of 4) Tj ET"
        for n in range(1, 5)
    ]
    reader = pypdf.PdfReader(io.BytesIO(helvetica_pdf(pages, rotate=90)))
    lines = read_page_lines(reader.pages[0], lambda: None)
    assert [(line.text.strip(), round(line.height or -1, 2)) for line in lines] == [
        ("Body text of page 1", 0.5),
        ("Page 1 of 4", 0.04),
    ]
    doc = ingest.extract(helvetica_pdf(pages, rotate=90), "rotated.pdf")
    assert [u.removed_footer for u in doc.units] == [f"Page {n} of 4" for n in range(1, 5)]


def test_line_reading_checks_the_deadline_before_operators() -> None:
    class Stop(Exception):
        pass

    calls = []

    def before_operator() -> None:
        calls.append(1)
        if len(calls) == 3:
            raise Stop

    reader = pypdf.PdfReader(io.BytesIO(invoice_pdf()))
    with pytest.raises(Stop):
        read_page_lines(reader.pages[0], before_operator)


# Titles


def unmapped_font_pdf(lines: list[list[int]], title: str | None = None) -> bytes:
    """A page whose font has no Unicode map, so a text reader sees glyph numbers as characters."""
    writer = pypdf.PdfWriter()
    page = writer.add_blank_page(width=595, height=842)
    system = {"/Registry": Text("Adobe"), "/Ordering": Text("Identity"), "/Supplement": NumberObject(0)}
    descendant = DictionaryObject(
        {
            NameObject("/Type"): NameObject("/Font"),
            NameObject("/Subtype"): NameObject("/CIDFontType2"),
            NameObject("/BaseFont"): NameObject("/AAAAAA+Unmapped"),
            NameObject("/CIDSystemInfo"): DictionaryObject({NameObject(k): v for k, v in system.items()}),
        }
    )
    font = DictionaryObject(
        {
            NameObject("/Type"): NameObject("/Font"),
            NameObject("/Subtype"): NameObject("/Type0"),
            NameObject("/BaseFont"): NameObject("/AAAAAA+Unmapped"),
            NameObject("/Encoding"): NameObject("/Identity-H"),
            NameObject("/DescendantFonts"): ArrayObject([writer._add_object(descendant)]),
        }
    )
    fonts = DictionaryObject({NameObject("/F1"): writer._add_object(font)})
    page[NameObject("/Resources")] = DictionaryObject({NameObject("/Font"): fonts})
    shows = [
        f"BT /F1 14 Tf 72 {780 - 20 * row} Td <{''.join(f'{code:04X}' for code in codes)}> Tj ET"
        for row, codes in enumerate(lines)
    ]
    content = DecodedStreamObject()
    content.set_data("\n".join(shows).encode())
    page[NameObject("/Contents")] = writer._add_object(content)
    if title is not None:
        writer.add_metadata({"/Title": title})
    out = io.BytesIO()
    writer.write(out)
    return out.getvalue()


# Glyph numbers of a subset font read as code points: IPA letters, Bengali, syllabics.
GLYPH_LINES = [
    [0x279, 0x279, 0x982, 0x3, 0x1403, 0x250, 0x9C2],
    [0x25F, 0x1405, 0x986, 0x3, 0x287, 0x9A8, 0x264, 0x1410],
    [0x9B2, 0x26F, 0x140A, 0x3, 0x282, 0x998, 0x25B, 0x2A4],
    [0x1412, 0x991, 0x259, 0x3, 0x9C1, 0x27E, 0x1401],
]


def test_unmapped_font_text_is_not_a_title() -> None:
    data = unmapped_font_pdf(GLYPH_LINES)
    doc = ingest.extract(data, "Lease agreement 2024.pdf")
    assert "\u0279\u0279" in doc.text  # the text itself is kept as it is
    assert doc.title == "Lease agreement 2024"


def test_unmapped_font_title_falls_back_to_metadata_then_file_name() -> None:
    assert ingest.extract(unmapped_font_pdf(GLYPH_LINES, "Lease Agreement"), "x.pdf").title == "Lease Agreement"
    junk_metadata = unmapped_font_pdf(GLYPH_LINES, "\u0279\u0279\u0982\u1403\u0250")
    assert ingest.extract(junk_metadata, "lease.pdf").title == "lease"


def test_corpus_junk_first_line_is_not_a_title() -> None:
    # An OCR layer of a photo: the lines are stray letters and dots (":.,", "dP", "i, ."), and the
    # metadata title is the placeholder "Title", so only the file name is left.
    path = corpus_file("issue-301.pdf")
    assert ingest.extract(path.read_bytes(), path.name).title == "issue-301"
