"""Text clean-up shared by all readers.

Every step is meaning-preserving: it only undoes artefacts of file formats (ligature glyphs,
control bytes, line-end hyphenation of typeset text, running headers) so that search, chunking
and the model see the words an author wrote.
"""

from __future__ import annotations

import dataclasses
import re
import unicodedata
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

LIGATURES = str.maketrans(
    {
        "\ufb00": "ff",
        "\ufb01": "fi",
        "\ufb02": "fl",
        "\ufb03": "ffi",
        "\ufb04": "ffl",
        "\ufb06": "st",
    }
)

_LINE_BREAKS = re.compile(r"\r\n?|[\u2028\u2029\x0b\x0c]")
# Splits raw text into the lines normalize_text would make of it.
LINE_SPLIT = re.compile(r"\r\n?|[\n\u2028\u2029\x0b\x0c]")
_INVISIBLE = re.compile(r"[\x00-\x08\x0e-\x1f\x7f-\x9f\u00ad\ufeff\ud800-\udfff]")
_TRAILING_SPACE = re.compile(r"[^\S\n]+(?=\n|\Z)")
_BLANK_RUNS = re.compile(r"\n{3,}")
_LINE_END_HYPHEN = re.compile(r"(?<=[^\W\d_])-\n(?=[^\W\d_])")
_DIGITS = re.compile(r"\d+")
_SPACES = re.compile(r"\s+")


def normalize_text(text: str, *, join_hyphens: bool = False) -> str:
    """Return ``text`` cleaned for analysis.

    ``join_hyphens`` should only be set for typeset sources (PDF), where a hyphen at the end of
    a line is usually inserted by the layout engine; in text typed by people (TXT, Markdown,
    Word paragraphs) such a hyphen is almost always real ("well-\\nknown").
    """
    text = _LINE_BREAKS.sub("\n", text)
    text = _INVISIBLE.sub("", text)
    text = unicodedata.normalize("NFC", text.translate(LIGATURES))
    text = _TRAILING_SPACE.sub("", text)
    if join_hyphens:
        text = _join_hyphenated(text)
    text = _BLANK_RUNS.sub("\n\n", text)
    return text.strip("\n")


def _join_hyphenated(text: str) -> str:
    """Join "exam-\\nple" into "example" when the letters on both sides are lowercase.

    Requiring lowercase on both sides keeps compounds with proper nouns ("Jean-\\nPaul") and
    list-like lines intact.
    """

    def replace(match: re.Match[str]) -> str:
        before = text[match.start() - 1]
        after = text[match.end()]
        return "" if before.islower() and after.islower() else match.group()

    return _LINE_END_HYPHEN.sub(replace, text)


def collapse_spaces(text: str) -> str:
    """Single-line form of ``text``: used for labels, titles and table cells."""
    return _SPACES.sub(" ", text).strip()


def margin_key(line: str) -> str:
    """Comparison key for running headers/footers: digits ignored so "Page 3" equals "Page 4"."""
    return collapse_spaces(_DIGITS.sub("#", line)).casefold()


# Running headers and footers

# Outer share of the page height (at top and bottom) where running headers and footers sit.
MARGIN_BAND = 0.15
# How far (as a share of the page height) the same margin line may move from page to page.
MARGIN_TOLERANCE = 0.02


@dataclass(frozen=True, slots=True)
class PageLine:
    """One line of a page's text and where it sits.

    ``height`` is the line's baseline as a share of the page height, from the bottom edge (0)
    to the top edge (1), or None when the position is not known.
    """

    text: str
    height: float | None = None


@dataclass(frozen=True, slots=True)
class MarginSplit:
    """A page's text with its running header and footer lines taken out and kept apart."""

    text: str
    header: str = ""
    footer: str = ""


@dataclass(frozen=True, slots=True)
class _Candidate:
    page: int
    line: int
    key: str
    text: str
    height: float


def split_running_margins(pages: Sequence[Sequence[PageLine]], *, min_pages: int = 3) -> list[MarginSplit]:
    """Take running headers, footers and page numbers out of each page's text, keeping them apart.

    Repeated text alone is no proof (an invoice's last line may be "Total due: $N" on every
    page), so a line only counts as a running margin when all of these hold:

    * it is the first or last non-blank line of its page;
    * its position is known and lies in the top or bottom :data:`MARGIN_BAND` of the page;
    * the same text (see :func:`margin_key`) sits at the same height, within
      :data:`MARGIN_TOLERANCE`, on more than half of the pages of a document of at least
      ``min_pages`` pages;
    * where its digits differ between pages they count up, as page numbers do.

    Only one line is taken from each end: peeling further would eat repeated body text of
    forms and templates. A page is never emptied: if nothing else is left, it keeps its lines.
    """
    removed: list[set[int]] = [set() for _ in pages]
    if len(pages) >= min_pages:
        for page_index, line_index in _running_lines(_edge_candidates(pages), len(pages)):
            removed[page_index].add(line_index)
        for page, gone in zip(pages, removed, strict=True):
            if gone and _first_filled(page, (i for i in range(len(page)) if i not in gone)) is None:
                gone.clear()
    return [_split(page, gone) for page, gone in zip(pages, removed, strict=True)]


def split_text_page_margins(pages: Sequence[str], *, min_pages: int = 3) -> list[MarginSplit]:
    """Plain-text pages (split at form feeds) with their running headers and footers kept apart.

    Plain text has no coordinates, so a page's first non-blank line stands for its top edge and
    its last for its bottom edge; the rules of :func:`split_running_margins` apply otherwise.
    """
    placed = [_edge_lines(page.split("\n")) for page in pages]
    splits = split_running_margins(placed, min_pages=min_pages)
    return [dataclasses.replace(s, text=_BLANK_RUNS.sub("\n\n", s.text).strip("\n")) for s in splits]


def margins_warning(trimmed_pages: int) -> str:
    """The document warning that running margins were left out of ``trimmed_pages`` pages."""
    pages = f"{trimmed_pages} page" if trimmed_pages == 1 else f"{trimmed_pages} pages"
    return f"Running headers/footers repeated on {pages} were left out of the text (shown in the reader)"


def _edge_lines(lines: Sequence[str]) -> list[PageLine]:
    filled = [index for index, line in enumerate(lines) if line.strip()]
    heights: dict[int, float] = {filled[-1]: 0.0, filled[0]: 1.0} if filled else {}
    return [PageLine(line, heights.get(index)) for index, line in enumerate(lines)]


def _edge_candidates(pages: Sequence[Sequence[PageLine]]) -> list[_Candidate]:
    """The first and last non-blank lines of each page, where they sit in the margin band."""
    candidates: list[_Candidate] = []
    for page_index, page in enumerate(pages):
        first = _first_filled(page, range(len(page)))
        if first is None:
            continue
        last = _first_filled(page, range(len(page) - 1, first[0], -1)) or first
        for line_index, key in dict.fromkeys((first, last)):
            height = page[line_index].height
            if height is not None and 0 <= height <= 1 and min(height, 1 - height) <= MARGIN_BAND:
                candidates.append(_Candidate(page_index, line_index, key, page[line_index].text, height))
    return candidates


def _first_filled(page: Sequence[PageLine], indices: Iterable[int]) -> tuple[int, str] | None:
    """Index and margin key of the first line among ``indices`` with any text, if there is one."""
    for index in indices:
        key = margin_key(normalize_text(page[index].text))
        if key:
            return index, key
    return None


def _running_lines(candidates: Sequence[_Candidate], page_count: int) -> list[tuple[int, int]]:
    """(page, line) of each candidate that repeats at one height on most pages."""
    groups: dict[str, list[_Candidate]] = {}
    for candidate in candidates:
        groups.setdefault(candidate.key, []).append(candidate)
    found: list[tuple[int, int]] = []
    for group in groups.values():
        members = _densest_band(group)
        if len(members) > page_count / 2 and _counts_like_page_numbers(members):
            found.extend((member.page, member.line) for member in members)
    return found


def _densest_band(group: Sequence[_Candidate]) -> list[_Candidate]:
    """The candidates, one per page, within :data:`MARGIN_TOLERANCE` of each other, on most pages."""
    ordered = sorted(group, key=lambda c: c.height)
    pages: Counter[int] = Counter()
    best = (0, 0, 0)
    start = 0
    for end, candidate in enumerate(ordered):
        pages[candidate.page] += 1
        while candidate.height - ordered[start].height > MARGIN_TOLERANCE:
            pages[ordered[start].page] -= 1
            if not pages[ordered[start].page]:
                del pages[ordered[start].page]
            start += 1
        if len(pages) > best[0]:
            best = (len(pages), start, end + 1)
    one_per_page = {c.page: c for c in reversed(ordered[best[1] : best[2]])}
    return sorted(one_per_page.values(), key=lambda c: c.page)


def _counts_like_page_numbers(members: Sequence[_Candidate]) -> bool:
    """True when the lines' numbers are the same on every page or count up from page to page."""
    numbers = [tuple(_number_order(n) for n in _DIGITS.findall(normalize_text(m.text))) for m in members]
    if all(value == numbers[0] for value in numbers):
        return True
    return all(before < after for before, after in zip(numbers, numbers[1:], strict=False))


def _number_order(digits: str) -> tuple[int, str]:
    """Sort key of a run of (possibly non-ASCII) decimal digits, without int()'s length limit."""
    plain = "".join(str(unicodedata.decimal(ch)) for ch in digits).lstrip("0")
    return len(plain), plain


def _split(page: Sequence[PageLine], gone: set[int]) -> MarginSplit:
    kept = [line.text for index, line in enumerate(page) if index not in gone]
    top = [page[index].text for index in sorted(gone) if (page[index].height or 0) >= 0.5]
    bottom = [page[index].text for index in sorted(gone) if (page[index].height or 0) < 0.5]
    return MarginSplit("\n".join(kept), "\n".join(top), "\n".join(bottom))
