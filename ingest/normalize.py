"""Text clean-up shared by all readers.

Every step is meaning-preserving: it only undoes artefacts of file formats (ligature glyphs,
control bytes, line-end hyphenation of typeset text, running headers) so that search, chunking
and the model see the words an author wrote.
"""

from __future__ import annotations

import re
import unicodedata
from collections import Counter
from collections.abc import Sequence

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


def strip_repeated_margins(pages: Sequence[str], *, min_pages: int = 3) -> list[str]:
    """Drop a page's first or last line when it repeats on most pages of the document.

    Running headers, footers and page numbers would otherwise be repeated once per page in the
    text and pollute search results. Only the outermost non-blank line at each end is
    considered, and only for documents with at least ``min_pages`` pages, so short documents
    and body text are never touched.
    """
    if len(pages) < min_pages:
        return list(pages)
    split = [page.split("\n") for page in pages]
    ends = [_outer_lines(lines) for lines in split]
    first_counts = Counter(margin_key(lines[i]) for lines, (i, _) in zip(split, ends, strict=True) if i >= 0)
    last_counts = Counter(margin_key(lines[j]) for lines, (_, j) in zip(split, ends, strict=True) if j >= 0)
    majority = len(pages) / 2
    headers = {key for key, count in first_counts.items() if count > majority}
    footers = {key for key, count in last_counts.items() if count > majority}
    if not headers and not footers:
        return list(pages)
    cleaned: list[str] = []
    for lines, (first, last) in zip(split, ends, strict=True):
        drop = set()
        if first >= 0 and margin_key(lines[first]) in headers:
            drop.add(first)
        if last >= 0 and margin_key(lines[last]) in footers:
            drop.add(last)
        kept = [line for index, line in enumerate(lines) if index not in drop]
        cleaned.append(_BLANK_RUNS.sub("\n\n", "\n".join(kept)).strip("\n"))
    return cleaned


def _outer_lines(lines: Sequence[str]) -> tuple[int, int]:
    """Indices of the first and last non-blank lines, or (-1, -1) for a blank page."""
    filled = [index for index, line in enumerate(lines) if line.strip()]
    if not filled:
        return -1, -1
    return filled[0], filled[-1]
