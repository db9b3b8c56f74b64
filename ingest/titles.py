"""Choosing a human-readable document title.

Embedded titles are often junk ("Microsoft Word - draft3.doc", "untitled"), so they are only
used when they look like real titles; otherwise the document's own first heading or line is
better, and the file name is the last resort.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from .normalize import collapse_spaces
from .settings import TITLE_MAX_CHARS

_PLACEHOLDERS = frozenset({"untitled", "title", "document", "none", "null", "unknown", "no title", "slide 1"})
_FILE_NAME = re.compile(r"\.(pdf|docx?|txt|rtf|odt|md|tex|dvi|ps|indd|qxd|pages|html?)$", re.IGNORECASE)
_PATH_SEPARATORS = re.compile(r"[\\/]")


def sensible_title(raw: object) -> str | None:
    """``raw`` cleaned up, or None when it is empty, a placeholder or a file name."""
    if not isinstance(raw, str):
        return None
    title = collapse_spaces(raw)
    if len(title) < 2 or not any(ch.isalpha() for ch in title):
        return None
    folded = title.casefold()
    if folded in _PLACEHOLDERS or folded.startswith("untitled") or _FILE_NAME.search(title):
        return None
    return trim_title(title)


def first_line(text: str) -> str | None:
    """The first line of ``text`` that reads like words, stripped of Markdown heading marks.

    Table rows and lines without letters (page numbers, rules) make poor titles and are skipped.
    """
    for line in text.split("\n"):
        cleaned = collapse_spaces(line.lstrip("#"))
        if cleaned and not cleaned.startswith("|") and any(ch.isalpha() for ch in cleaned):
            return trim_title(cleaned)
    return None


def trim_title(title: str, limit: int = TITLE_MAX_CHARS) -> str:
    """Shorten to ``limit`` characters at a word boundary, marking the cut with an ellipsis."""
    title = collapse_spaces(title)
    if len(title) <= limit:
        return title
    cut = title[: limit - 1]
    space = cut.rfind(" ")
    if space > limit // 2:
        cut = cut[:space]
    return cut.rstrip(" ,;:-") + "…"


def filename_stem(filename: str) -> str:
    """The file name without folders or extension; browsers may send a full Windows path."""
    name = _PATH_SEPARATORS.split(filename)[-1].strip()
    stem = name.rsplit(".", 1)[0] if "." in name.lstrip(".") else name
    return trim_title(stem) or "Untitled document"


def choose_title(hints: Iterable[str | None], text: str, filename: str) -> str:
    """First usable hint, else the text's first line, else the file name."""
    for hint in hints:
        if hint:
            return trim_title(hint)
    return first_line(text) or filename_stem(filename)
