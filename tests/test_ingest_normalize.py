"""Text clean-up, title choice and offset layout, tested without any file format."""

from __future__ import annotations

import pickle
from collections.abc import Callable

import pytest

from ingest.errors import IngestError
from ingest.model import Section, layout_units
from ingest.normalize import MarginSplit, PageLine, normalize_text, split_running_margins, split_text_page_margins
from ingest.text import markdown_sections
from ingest.titles import choose_title, filename_stem, first_line, reads_as_words, sensible_title, trim_title


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


def strip_repeated_margins(pages: list[str]) -> list[str]:
    return [split.text for split in split_text_page_margins(pages)]


def test_repeated_margins_removed_ignoring_digits_and_kept_apart() -> None:
    pages = [f"Annual Report 2024\nBody {n}\nmore text\nPage {n}" for n in range(1, 6)]
    splits = split_text_page_margins(pages)
    assert [s.text for s in splits] == [f"Body {n}\nmore text" for n in range(1, 6)]
    assert [(s.header, s.footer) for s in splits] == [("Annual Report 2024", f"Page {n}") for n in range(1, 6)]


def test_margins_need_a_majority_and_three_pages() -> None:
    pages = ["Intro\nA", "Other\nB", "Intro\nC", "Else\nD"]
    assert strip_repeated_margins(pages) == pages
    assert strip_repeated_margins(["Head\nA", "Head\nB"]) == ["Head\nA", "Head\nB"]


def test_margins_skip_blank_pages_and_bare_page_numbers() -> None:
    pages = ["Text one\n1", "", "Text two\n2", "Text three\n3"]
    assert strip_repeated_margins(pages) == ["Text one", "", "Text two", "Text three"]


def placed(*lines: tuple[str, float | None]) -> list[PageLine]:
    return [PageLine(text, height) for text, height in lines]


def test_running_margins_need_text_and_height_to_repeat() -> None:
    pages = [
        placed(("ACME - Confidential", 0.95), (f"Clause {n} body", 0.8), (f"- {n} -", 0.04)) for n in range(1, 5)
    ]
    splits = split_running_margins(pages)
    assert splits == [MarginSplit(f"Clause {n} body", "ACME - Confidential", f"- {n} -") for n in range(1, 5)]


def test_running_margins_drawn_first_are_filed_by_height() -> None:
    pages = [placed((f"Page {n} of 3", 0.03), ("Body", 0.5), ("Total: $1", 0.06 + 0.03 * n)) for n in (1, 2, 3)]
    assert split_running_margins(pages) == [MarginSplit("Body\nTotal: $1", "", f"Page {n} of 3") for n in (1, 2, 3)]


KEPT_CASES: dict[str, Callable[[int], list[PageLine]]] = {
    # Same text, but the body ends at a different height on every page.
    "moving": lambda n: placed(("Body", 0.5), ("Total due: $100", 0.03 * n)),
    # Same text at the same height, but in the middle of the page.
    "mid-page": lambda n: placed(("Body", 0.5), ("Signed", 0.3)),
    # Same text at the same height, but where it sits is not known.
    "unknown": lambda n: placed(("Body", 0.5), ("Signed", None)),
    # Same place, but the numbers do not count up like page numbers.
    "amounts": lambda n: placed(("Body", 0.5), (f"Total due: ${(7 * n) % 5}00", 0.05)),
}


@pytest.mark.parametrize("page", KEPT_CASES.values(), ids=KEPT_CASES.keys())
def test_lines_without_proof_of_being_margins_are_kept(page: Callable[[int], list[PageLine]]) -> None:
    pages = [page(n) for n in range(1, 5)]
    splits = split_running_margins(pages)
    assert splits == [MarginSplit("\n".join(line.text for line in lines)) for lines in pages]


def test_running_margins_tolerate_small_shifts_and_constant_numbers() -> None:
    pages = [placed(("Body", 0.5), ("Edition 2004-06", 0.03 + 0.003 * (n % 3))) for n in range(5)]
    assert [split.footer for split in split_running_margins(pages)] == ["Edition 2004-06"] * 5


def test_running_margins_never_empty_a_page() -> None:
    pages = [placed(("Background", 0.95)) for _ in range(4)]
    assert split_running_margins(pages) == [MarginSplit("Background")] * 4
    pages = [placed(("Header", 0.95), ("Body", 0.5))] * 3 + [placed(("Header", 0.95))]
    assert [split.text for split in split_running_margins(pages)] == ["Body", "Body", "Body", "Header"]


def test_running_margins_need_most_of_at_least_three_pages() -> None:
    two = [placed(("Header", 0.95), ("Body", 0.5))] * 2
    assert [split.text for split in split_running_margins(two)] == ["Header\nBody"] * 2
    half = [placed(("Header", 0.95), ("Body", 0.5))] * 2 + [placed(("Other", 0.95), ("Body", 0.5))] * 2
    assert [split.header for split in split_running_margins(half)] == [""] * 4


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


REAL_TITLES = [
    "Allgemeine Geschäftsbedingungen für Dienstleistungen",
    "Contrat de prestation de services – conditions générales",
    "Σύμβαση παροχής υπηρεσιών",
    "Договор поставки № 17/2024",
    "软件许可协议",
    "業務委託契約書（サンプル）",
    "Tシャツの販売契約",
    "اتفاقية عدم الإفصاح",
    "הסכם סודיות",
    "비밀유지계약서",
    "सेवा अनुबंध",
    "สัญญาจ้างงาน",
    "Hợp đồng lao động",
    "Umowa o dzieło nr 5/2023",
    "10-K Annual Report 2023",
    "Master Services Agreement (MSA) v2",
    "合同",
]
JUNK_TITLES = [
    "\u0279\u0279\u0982",  # glyph numbers of a font without a Unicode map: IPA letters and a Bengali sign
    "\u0279\u0279\u0982\u1403\u0250\u09c2",
    "\u025f\u1405\u0986 \u0287\u09a8\u0264\u1410 \u09b2\u026f\u140a",
    "\ue000\ue001ab\ue002cd",  # private use
    "Ab\u0378\u0379\u0380cd",  # unassigned
    "ɐɔɹ ʇuɐ",  # IPA only
    "ᐃaб βγ ক",  # letters of five scripts
    "dP",  # stray OCR letters
    "i, .",
    ". srN ., ,",
    "• ki ., ,",
]


@pytest.mark.parametrize("title", REAL_TITLES)
def test_real_titles_read_as_words(title: str) -> None:
    assert reads_as_words(title)
    assert sensible_title(title) == title


@pytest.mark.parametrize("title", JUNK_TITLES)
def test_junk_does_not_read_as_words(title: str) -> None:
    assert not reads_as_words(title)
    assert sensible_title(title) is None


def test_junk_titles_fall_back_to_the_next_hint_then_the_file_name() -> None:
    junk = "\u0279\u0279\u0982\u1403\u0250"
    assert choose_title([junk, "Lease Agreement"], "text", "f.pdf") == "Lease Agreement"
    assert choose_title([junk], f"{junk}\nLease of the premises", "f.pdf") == "Lease of the premises"
    assert choose_title([junk], f"{junk}\n:.,\ndP\ni, .\n. i '\nReal words here", "scan 7.pdf") == "scan 7"
    assert first_line("12\n| a | b |\n---\n## Lease") == "Lease"


def test_metadata_title_loses_control_characters() -> None:
    assert sensible_title("imagemagick-images\x00") == "imagemagick-images"
