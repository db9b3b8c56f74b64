"""Citation parsing and quote verification."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from app.services.citations import locate_quote, parse_and_verify

PAGE = "The Supplier shall deliver  500 units\nevery month. Payment is due within thirty (30) days."
DOCS = {"Supply Agreement": (7, [SimpleNamespace(number=1, text="Cover page"), SimpleNamespace(number=2, text=PAGE)])}


@pytest.mark.parametrize("quote", [
    "shall deliver 500 units every month",
    "SHALL DELIVER 500 UNITS EVERY MONTH",
    "shall  deliver\n500 units every month",
], ids=["exact", "case", "whitespace"])
def test_quote_found_modulo_case_and_whitespace(quote):
    start, end = locate_quote(quote, PAGE)
    assert PAGE[start:end].split() == "shall deliver 500 units every month".split()


def test_near_match_is_accepted_and_unrelated_text_is_not():
    span = locate_quote("Payment is due within thirty (30) day.", PAGE)
    assert span is not None and PAGE[span[0]:span[1]].startswith("Payment is due")
    assert locate_quote("The buyer may terminate at will", PAGE) is None


def test_parse_and_verify_marks_each_citation():
    answer = (
        'Delivery is monthly [doc: "Supply Agreement", page 2, "deliver 500 units every month"]. '
        'Fees are waived [doc: "Supply Agreement", page 2, "all fees are waived"]. '
        'Also [doc: "Unknown Memo", page 1, "anything"] and [Supply agreement, p. 1, “Cover page”].'
    )
    citations = parse_and_verify(answer, DOCS)
    assert [c["verified"] for c in citations] == [True, False, False, True]
    first = citations[0]
    assert first["document_id"] == 7 and first["page"] == 2
    assert PAGE[first["start"]:first["end"]] == "deliver  500 units\nevery month"
    assert citations[2]["document_id"] is None
    assert citations[3]["document_title"] == "Supply Agreement"


def test_answer_without_citations():
    assert parse_and_verify("No sources here.", DOCS) == []


def test_citations_of_pages_read_with_ocr_are_marked():
    from app.ui.citations import label

    scanned = SimpleNamespace(number=2, text="The deposit is EUR 500.", ocr_confidence=87.5)
    typed = SimpleNamespace(number=1, text="The rent is EUR 900.", ocr_confidence=None)
    answer = '[doc: "Lease", page 2, "deposit is EUR 500"] and [doc: "Lease", page 1, "rent is EUR 900"]'
    first, second = parse_and_verify(answer, {"Lease": (7, [typed, scanned])})
    assert first["ocr"] is True and first["verified"]
    assert "ocr" not in second
    document = SimpleNamespace(kind="pdf")
    assert ", page 2 (OCR) —" in label(first, document)
    assert "(OCR)" not in label(second, document)
