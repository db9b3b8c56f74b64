"""Citations in model answers: parse `[doc: "Title", page N, "quote"]` and verify the quote.

Verification ignores case and whitespace differences (and typographic quotes/dashes), and
accepts a near match when the quote differs from the page by a few characters; the span
returned points into the page's own text so the app can highlight it.
"""

from __future__ import annotations

import difflib
import re
import unicodedata
from typing import Any

CITATION = re.compile(
    r"\[\s*(?:doc(?:ument)?\s*:?\s*)?[\"“”']?(?P<doc>[^\"“”\],]+?)[\"“”']?\s*,\s*"
    r"(?:page|p\.|section)\s*(?P<page>\d+)\s*[,:]\s*[\"“](?P<quote>[^\"”]+)[\"”]\s*\]",
    re.IGNORECASE,
)
FUZZY_MIN_RATIO = 0.9
_TRANSLATE = str.maketrans({"“": '"', "”": '"', "‘": "'", "’": "'", "–": "-", "—": "-", "\u00a0": " "})


def normalize_with_map(text: str) -> tuple[str, list[int]]:
    """Casefolded text with whitespace runs collapsed, and each output char's source index."""
    out, index = [], []
    previous_space = True
    for position, char in enumerate(text):
        char = unicodedata.normalize("NFKC", char).translate(_TRANSLATE)
        if char.isspace():
            if previous_space:
                continue
            out.append(" ")
            index.append(position)
            previous_space = True
            continue
        for folded in char.casefold():
            out.append(folded)
            index.append(position)
        previous_space = False
    while out and out[-1] == " ":
        out.pop()
        index.pop()
    return "".join(out), index


def locate_quote(quote: str, text: str) -> tuple[int, int] | None:
    """Character span of `quote` in `text`, exact modulo case/whitespace, or a close match."""
    needle, _ = normalize_with_map(quote)
    haystack, index = normalize_with_map(text)
    if not needle or not haystack:
        return None
    at = haystack.find(needle)
    if at != -1:
        return index[at], index[at + len(needle) - 1] + 1
    matcher = difflib.SequenceMatcher(None, haystack, needle, autojunk=False)
    block = matcher.find_longest_match(0, len(haystack), 0, len(needle))
    start = max(0, block.a - block.b)
    window = haystack[start:start + len(needle)]
    if window and difflib.SequenceMatcher(None, window, needle, autojunk=False).ratio() >= FUZZY_MIN_RATIO:
        return index[start], index[start + len(window) - 1] + 1
    return None


def _match_document(name: str, documents: dict) -> tuple[str, Any] | None:
    wanted = name.strip().casefold()
    for title, entry in documents.items():
        if title.casefold() == wanted:
            return title, entry
    for title, entry in documents.items():
        if wanted and (wanted in title.casefold() or title.casefold() in wanted):
            return title, entry
    return None


def parse_and_verify(answer: str, documents: dict[str, tuple[int, list]]) -> list[dict[str, Any]]:
    """documents: title -> (document id, units with `.number` and `.text`)."""
    citations = []
    for match in CITATION.finditer(answer):
        name, page, quote = match.group("doc"), int(match.group("page")), match.group("quote").strip()
        found = _match_document(name, documents)
        citation = {"document_id": None, "document_title": name.strip(), "page": page, "quote": quote,
                    "verified": False, "start": None, "end": None}
        if found is not None:
            title, (document_id, units) = found
            citation.update(document_id=document_id, document_title=title)
            unit = next((u for u in units if u.number == page), None)
            if unit is not None and getattr(unit, "ocr_confidence", None) is not None:
                citation["ocr"] = True  # the page was read from its image: quotes may carry misreadings
            span = locate_quote(quote, unit.text) if unit is not None else None
            if span is not None:
                citation.update(verified=True, start=span[0], end=span[1])
        citations.append(citation)
    return citations
