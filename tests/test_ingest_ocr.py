"""Pages without a text layer are read with tesseract: accuracy, marking, progress and clear refusals.

Accuracy is measured on pages rendered here from known text and turned into image-only PDFs:
clean 12 pt text scanned at 200 DPI must come back with a character error rate of at most 2 %.
The real scan in the corpus (``Seige_of_Vicksburg_Sample_OCR.pdf``, which carries another
program's OCR layer) must be read from its image to at least 90 % word agreement with that layer.
"""

from __future__ import annotations

import difflib
import io
import re

import pypdfium2 as pdfium
import pytest
from fpdf import FPDF

import ingest
from ingest import IngestError, IngestSettings
from ingest import ocr as ocr_module
from ingest.ocr import installed_languages, ocr_image_pages, page_list, words_to_text
from ingest.watchdog import Deadline
from tests.test_ingest_corpus import CORPUS, SKIP_REASON, by_name

MAX_CHARACTER_ERROR_RATE = 0.02
MIN_REAL_SCAN_WORD_AGREEMENT = 0.90
SCAN_DPI = 200
needs_tesseract = pytest.mark.skipif(
    "eng" not in installed_languages(), reason="tesseract with English is not installed (scripts/ocr.sh)"
)

CONTRACT = [
    "This Agreement is made on 3 March 2026 between Acme Holdings Ltd and Brightwater LLP.",
    "1. The Supplier shall deliver the Goods within 30 days of the Order Date.",
    "2. The total price payable is EUR 48,250.00, due within 45 days of invoice.",
    "3. Either party may terminate this Agreement on 90 days' written notice.",
    "4. This Agreement is governed by the laws of England and Wales.",
]


def text_pdf(pages: list[list[str]]) -> bytes:
    pdf = FPDF()
    pdf.set_font("Helvetica", size=12)
    for lines in pages:
        pdf.add_page()
        for line in lines:
            pdf.multi_cell(0, 8, line, new_x="LMARGIN", new_y="NEXT")
    return bytes(pdf.output())


def scanned(pages: list[list[str]], keep_text_layer: set[int] = frozenset()) -> bytes:
    """Pages as images (a scan), except the 1-based pages in ``keep_text_layer``, kept as text."""
    source = pdfium.PdfDocument(text_pdf(pages))
    pdf = FPDF()
    pdf.set_font("Helvetica", size=12)
    for number, lines in enumerate(pages, 1):
        pdf.add_page()
        if number in keep_text_layer:
            for line in lines:
                pdf.multi_cell(0, 8, line, new_x="LMARGIN", new_y="NEXT")
        else:
            image = source[number - 1].render(scale=SCAN_DPI / 72, grayscale=True).to_pil()
            pdf.image(image, x=0, y=0, w=pdf.w, h=pdf.h)
    return bytes(pdf.output())


def flat(text: str) -> str:
    return " ".join(text.split())


def character_error_rate(expected: str, actual: str) -> float:
    matcher = difflib.SequenceMatcher(None, flat(expected), flat(actual), autojunk=False)
    return 1.0 - matcher.ratio()


@needs_tesseract
def test_scanned_page_reads_back_within_the_error_bound() -> None:
    doc = ingest.extract(scanned([CONTRACT]), "scan.pdf")
    (unit,) = doc.units
    assert unit.ocr and unit.ocr_confidence > 80
    assert character_error_rate("\n".join(CONTRACT), unit.text) <= MAX_CHARACTER_ERROR_RATE
    assert any("read with OCR" in warning for warning in doc.warnings)


@needs_tesseract
def test_image_pages_of_a_mixed_pdf_are_read_and_marked() -> None:
    pages = [["Page one has a text layer about the lease."], CONTRACT, ["Page three is text again."]]
    seen = []
    doc = ingest.extract(scanned(pages, keep_text_layer={1, 3}), "mixed.pdf", progress=seen.append)
    assert [(u.number, u.ocr) for u in doc.units] == [(1, False), (2, True), (3, False)]
    assert "EUR 48,250.00" in doc.units[1].text
    assert any("Page 2 was read with OCR" in warning for warning in doc.warnings)
    assert [(p.phase, p.done, p.total) for p in seen if p.phase == "ocr"] == [("ocr", 0, 1), ("ocr", 1, 1)]


@needs_tesseract
def test_missing_language_pack_is_a_clear_refusal() -> None:
    with pytest.raises(IngestError) as caught:
        ingest.extract(scanned([CONTRACT]), "scan.pdf", settings=IngestSettings(ocr_languages="eng+zzz"))
    assert caught.value.reason == "scanned"
    assert "language pack zzz is not installed" in caught.value.message


def test_missing_tesseract_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ocr_module.shutil, "which", lambda _: None)
    installed_languages.cache_clear()
    try:
        outcome = ocr_image_pages(scanned([CONTRACT]), [""], IngestSettings(), Deadline(30))
    finally:
        installed_languages.cache_clear()
    assert outcome.pages == {} and "OCR is not installed" in outcome.unavailable
    assert outcome.warnings == (
        "Page 1 is an image without a text layer and was not read: OCR is not installed on this server "
        "(tesseract, installed by scripts/ocr.sh).",
    )


@needs_tesseract
def test_blank_pages_are_not_sent_to_ocr() -> None:
    pdf = FPDF()
    pdf.add_page()
    pdf.add_page()
    outcome = ocr_image_pages(bytes(pdf.output()), ["", ""], IngestSettings(), Deadline(30))
    assert outcome.pages == {} and outcome.warnings == ()


@needs_tesseract
def test_pages_beyond_the_ocr_limit_are_reported() -> None:
    data = scanned([["First scanned page."], ["Second scanned page."], ["Third scanned page."]])
    outcome = ocr_image_pages(data, ["", "", ""], IngestSettings(ocr_max_pages=2), Deadline(60))
    assert sorted(outcome.pages) == [1, 2]
    assert any("Page 3 is an image" in w and "after 2 pages" in w for w in outcome.warnings)


@needs_tesseract
@pytest.mark.skipif(not CORPUS, reason=SKIP_REASON)
def test_real_scan_agrees_with_its_own_ocr_layer() -> None:
    from pypdf import PdfReader

    data = by_name("Seige_of_Vicksburg_Sample_OCR.pdf").read_bytes()
    layer = PdfReader(io.BytesIO(data)).pages[0].extract_text()
    outcome = ocr_image_pages(data, [""], IngestSettings(), Deadline(120))
    words = re.findall(r"\w+", layer.casefold())
    ours = re.findall(r"\w+", outcome.pages[1].text.casefold())
    agreement = difflib.SequenceMatcher(None, words, ours, autojunk=False).ratio()
    assert agreement >= MIN_REAL_SCAN_WORD_AGREEMENT, agreement


@pytest.mark.parametrize(
    ("numbers", "expected"),
    [([3], "page 3"), ([1, 2, 3, 4, 7, 9], "pages 1-4, 7 and 9"), ([2, 5], "pages 2 and 5"), ([8, 6, 7], "pages 6-8")],
    ids=["one", "ranges-and-singles", "two", "unsorted"],
)
def test_page_lists_read_naturally(numbers: list[int], expected: str) -> None:
    assert page_list(numbers) == expected


def test_tesseract_words_become_lines_and_paragraphs_with_a_weighted_confidence() -> None:
    header = "level\tpage_num\tblock_num\tpar_num\tline_num\tword_num\tleft\ttop\twidth\theight\tconf\ttext"
    rows = [
        "5\t1\t1\t1\t1\t1\t0\t0\t1\t1\t90\tTotal",
        "5\t1\t1\t1\t1\t2\t0\t0\t1\t1\t90\tdue",
        "4\t1\t1\t1\t2\t0\t0\t0\t1\t1\t-1\t",
        "5\t1\t1\t1\t2\t1\t0\t0\t1\t1\t60\t$5",
        "5\t1\t2\t1\t1\t1\t0\t0\t1\t1\t30\t\"x",
    ]
    text, confidence = words_to_text("\n".join([header, *rows]))
    assert text == 'Total due\n$5\n\n"x'
    assert confidence == pytest.approx((90 * 5 + 90 * 3 + 60 * 2 + 30 * 2) / 12)


# Corpus PDFs without a usable text layer, and what each must give now: a phrase read with OCR,
# or a refusal whose message says that OCR found nothing.
FORMERLY_SCANNED = {
    "box.pdf": None,
    "encrypted_doc_no_id.pdf": "WO 2003/036426",
    "git.pdf": None,
    "imagemagick-ASCII85Decode.pdf": None,
    "imagemagick-CCITTFaxDecode.pdf": None,
    "imagemagick-images.pdf": "Background",
    "imagemagick-lzw.pdf": None,
    "issue-3850-1bit-indexed-flate.pdf": "decode repro",
}


@needs_tesseract
@pytest.mark.skipif(not CORPUS, reason=SKIP_REASON)
@pytest.mark.parametrize(("name", "phrase"), sorted(FORMERLY_SCANNED.items()), ids=sorted(FORMERLY_SCANNED))
def test_corpus_scans_give_text_or_say_why_not(name: str, phrase: str | None) -> None:
    path = by_name(name)
    try:
        doc = ingest.extract(path.read_bytes(), name)
    except IngestError as error:
        assert phrase is None, error.message
        assert error.reason == "scanned" and "OCR found no text" in error.message
        return
    assert phrase is not None and phrase in doc.text
    assert any("OCR" in warning for warning in doc.warnings)
