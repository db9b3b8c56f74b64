"""Text clean-up, title choice and offset layout, tested without any file format."""

from __future__ import annotations

import pickle

import pytest

from ingest.errors import IngestError
from ingest.model import Section, layout_units
from ingest.normalize import normalize_text, strip_repeated_margins
from ingest.text import markdown_sections
from ingest.titles import choose_title, filename_stem, sensible_title, trim_title


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("\ufb01sh \ufb02ow o\ufb00er o\ufb03ce ba\ufb04e", "fish flow offer office baffle"),
        ("cafe\u0301", "caf\u00e9"),
        ("a\x00b\x1bc\x7fd\u00ade", "abcde"),
        ("tab\tkept\nnewline kept", "tab\tkept\nnewline kept"),
        ("one\n\n\n\n\ntwo", "one\n\ntwo"),
        ("one\n   \n\t\n\ntwo", "one\n\ntwo"),
        ("windows\r\nline\rends", "windows\nline\nends"),
        ("\n\n  leading kept, trailing dropped   \n\n", "  leading kept, trailing dropped"),
        ("exam-\nple", "exam-\nple"),
    ],
)
def test_normalize_text(raw: str, expected: str) -> None:
    assert normalize_text(raw) == expected


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("an exam-\nple here", "an example here"),
        ("Jean-\nPaul", "Jean-\nPaul"),
        ("state-\nOf", "state-\nOf"),
        ("item 2-\n3", "item 2-\n3"),
        ("co-\nop and re-\nenter", "coop and reenter"),
        ("trailing-  \nspace", "trailingspace"),
    ],
)
def test_hyphen_joining_only_between_lowercase_letters(raw: str, expected: str) -> None:
    assert normalize_text(raw, join_hyphens=True) == expected


def test_repeated_margins_removed_ignoring_digits() -> None:
    pages = [f"Annual Report 2024\nBody {n}\nmore text\nPage {n}" for n in range(1, 6)]
    assert strip_repeated_margins(pages) == [f"Body {n}\nmore text" for n in range(1, 6)]


def test_margins_need_a_majority_and_three_pages() -> None:
    pages = ["Intro\nA", "Other\nB", "Intro\nC", "Else\nD"]
    assert strip_repeated_margins(pages) == pages
    assert strip_repeated_margins(["Head\nA", "Head\nB"]) == ["Head\nA", "Head\nB"]


def test_margins_skip_blank_pages_and_bare_page_numbers() -> None:
    pages = ["Text one\n1", "", "Text two\n2", "Text three\n3"]
    assert strip_repeated_margins(pages) == ["Text one", "", "Text two", "Text three"]


def test_layout_units_offsets() -> None:
    units, text = layout_units(
        [Section("a", 1, "alpha"), Section("b", 2, ""), Section("c", 3, "gamma\ndelta")]
    )
    assert text == "alpha\n\ngamma\ndelta"
    assert [(u.label, u.start, u.end) for u in units] == [("a", 0, 5), ("c", 7, 18)]
    assert all(text[u.start : u.end] == u.text for u in units)


def test_markdown_tilde_fences_and_closing_hashes() -> None:
    sections = markdown_sections("# A #\n~~~\n# inside\n~~~\n#not-heading\n## B")
    assert [s.label for s in sections] == ["A", "B"]
    assert "# inside" in sections[0].text
    assert "#not-heading" in sections[0].text


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("  A Real   Title ", "A Real Title"),
        ("Microsoft Word - thesis.docx", None),
        ("untitled", None),
        ("Untitled document", None),
        ("1234", None),
        ("", None),
        (None, None),
        (42, None),
    ],
)
def test_sensible_title(raw: object, expected: str | None) -> None:
    assert sensible_title(raw) == expected


def test_title_fallbacks() -> None:
    assert choose_title([None, "Heading"], "first line", "f.pdf") == "Heading"
    assert choose_title([None], "| a | b |\n\n12\n## First words", "f.pdf") == "First words"
    assert choose_title([], "42\n\n| x |", "C:\\Users\\me\\Quarterly plan.v2.docx") == "Quarterly plan.v2"
    assert filename_stem("") == "Untitled document"


def test_trim_title_cuts_at_a_word() -> None:
    trimmed = trim_title("word " * 60)
    assert len(trimmed) <= 120
    assert trimmed.endswith("word…")


def test_ingest_error_reasons_are_checked() -> None:
    assert IngestError("empty").message
    with pytest.raises(ValueError):
        IngestError("nonsense")


def test_ingest_error_survives_pickling() -> None:
    error = pickle.loads(pickle.dumps(IngestError("timeout", "took too long")))
    assert (error.reason, error.message, str(error)) == ("timeout", "took too long", "took too long")
