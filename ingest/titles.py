"""Choosing a human-readable document title.

Embedded titles are often junk ("Microsoft Word - draft3.doc", "untitled"), so they are only
used when they look like real titles; otherwise the document's own first heading or line is
better, and the file name is the last resort.

Text can also be junk without anyone meaning it: a PDF font without a Unicode map makes text
readers return glyph numbers as characters ("ɹɹং"), and a poor OCR layer returns stray letters
and dots. :func:`reads_as_words` keeps such text out of titles.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Iterable

from .normalize import collapse_spaces, normalize_text
from .settings import TITLE_MAX_CHARS

_PLACEHOLDERS = frozenset({"untitled", "title", "document", "none", "null", "unknown", "no title", "slide 1"})
_FILE_NAME = re.compile(r"\.(pdf|docx?|txt|rtf|odt|md|tex|dvi|ps|indd|qxd|pages|html?)$", re.IGNORECASE)
_PATH_SEPARATORS = re.compile(r"[\\/]")
# Lines with letters looked at for a title: junk at the very top means the text is junk.
TITLE_CANDIDATE_LINES = 3
# Letters of the East Asian writing systems, which mix freely with each other and with Latin.
_EAST_ASIAN = frozenset({"CJK", "HIRAGANA", "KATAKANA", "KATAKANA-HIRAGANA", "IDEOGRAPHIC", "BOPOMOFO", "HANGUL"})
_WIDTH_PREFIXES = frozenset({"FULLWIDTH", "HALFWIDTH"})
_NO_SCRIPT = frozenset({"COMBINING", "MODIFIER"})
_IPA_EXTENSIONS = range(0x250, 0x2B0)
# Code points that no font maps real text to: private use, unassigned, surrogates, controls.
_NOT_TEXT = frozenset({"Co", "Cn", "Cs", "Cc"})


def sensible_title(raw: object) -> str | None:
    """``raw`` cleaned up, or None when it is empty, a placeholder, a file name or junk."""
    if not isinstance(raw, str):
        return None
    title = collapse_spaces(normalize_text(raw))
    if len(title) < 2 or not any(ch.isalpha() for ch in title):
        return None
    folded = title.casefold()
    if folded in _PLACEHOLDERS or folded.startswith("untitled") or _FILE_NAME.search(title):
        return None
    if not reads_as_words(title):
        return None
    return trim_title(title)


def first_line(text: str) -> str | None:
    """The first line of ``text`` that reads like words, stripped of Markdown heading marks.

    Table rows and lines without letters (page numbers, rules) make poor titles and are skipped.
    Only the first :data:`TITLE_CANDIDATE_LINES` other lines are tried: when they are all junk,
    the rest of the text is most likely junk too, and a line that passes by chance is no title.
    """
    tried = 0
    for line in text.split("\n"):
        cleaned = collapse_spaces(line.lstrip("#"))
        if not cleaned or cleaned.startswith("|") or not any(ch.isalpha() for ch in cleaned):
            continue
        if reads_as_words(cleaned):
            return trim_title(cleaned)
        tried += 1
        if tried >= TITLE_CANDIDATE_LINES:
            break
    return None


def reads_as_words(text: str) -> bool:
    """Whether ``text`` reads as words of some language rather than glyph or OCR junk.

    Rejected: text that is mostly punctuation; fewer than three letters (two for Chinese,
    Japanese and Korean, whose letters are syllables or words); more than a tenth of code points
    that no real text uses (private use, unassigned); a third or more of the letters from the
    IPA block; a third or more of the words mixing letters of different scripts (Latin with
    Chinese or Japanese excepted, as in "Tシャツ"); letters from more than three scripts.
    """
    # Titles are cut to TITLE_MAX_CHARS anyway; judging the start keeps a huge line cheap.
    visible = [ch for ch in text[: 4 * TITLE_MAX_CHARS] if not ch.isspace()]
    letters = [ch for ch in visible if unicodedata.category(ch).startswith("L")]
    if not letters or 2 * sum(ch.isalnum() for ch in visible) < len(visible):
        return False
    scripts = [_script(ch) for ch in letters]
    if len(letters) < (2 if "CJK" in scripts else 3):
        return False
    if 10 * sum(unicodedata.category(ch) in _NOT_TEXT or ch == "\ufffd" for ch in visible) > len(visible):
        return False
    if 3 * sum(ord(ch) in _IPA_EXTENSIONS for ch in letters) >= len(letters):
        return False
    words = _words(text[: 4 * TITLE_MAX_CHARS])
    if 3 * sum(not _one_script(word) for word in words) >= len(words):
        return False
    return len(set(scripts) - {None}) <= 3


def _script(ch: str) -> str | None:
    """The writing system a letter or mark belongs to, from its Unicode name ("LATIN", "GREEK")."""
    parts = unicodedata.name(ch, "").split(" ")
    if parts[0] in _WIDTH_PREFIXES and len(parts) > 1:
        parts = parts[1:]
    if parts[0] in _EAST_ASIAN:
        return "CJK"
    return None if parts[0] in _NO_SCRIPT or not parts[0] else parts[0]


def _words(text: str) -> list[str]:
    """Runs of letters and combining marks."""
    words: list[str] = []
    current: list[str] = []
    for ch in text + " ":
        if unicodedata.category(ch)[0] in "LM":
            current.append(ch)
        elif current:
            words.append("".join(current))
            current = []
    return words


def _one_script(word: str) -> bool:
    scripts = {_script(ch) for ch in word} - {None}
    return len(scripts) <= 1 or scripts <= {"LATIN", "CJK"}


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
        if hint and reads_as_words(hint):
            return trim_title(hint)
    return first_line(text) or filename_stem(filename)
