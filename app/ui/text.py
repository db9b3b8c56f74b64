"""Turning document text into safe Markdown, and small formatting functions.

Document text is untrusted: every ASCII punctuation character is backslash-escaped, so
nothing in it can become a link, an image, HTML, LaTeX or a Streamlit directive. The only
markup in the result is the highlight this module adds itself.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from datetime import datetime

_PUNCTUATION = re.compile(r"([!-/:-@\[-`{-~])")
_LEADING_SPACE = re.compile(r"^[ \t]+")
HIGHLIGHT = "orange-background"
NBSP = "\u00a0"


def escape(text: str) -> str:
    """Escape ``text`` so Markdown shows it literally."""
    return _PUNCTUATION.sub(r"\\\1", text)


def _line(pieces: Iterable[tuple[str, bool]]) -> str:
    out: list[str] = []
    for index, (piece, marked) in enumerate(pieces):
        if index == 0:
            # Leading spaces would turn the line into a code block; non-breaking ones keep the indent.
            piece = _LEADING_SPACE.sub(lambda m: NBSP * len(m.group(0).expandtabs(4)), piece)
        if not piece:
            continue
        escaped = escape(piece)
        out.append(f":{HIGHLIGHT}[{escaped}]" if marked and piece.strip() else escaped)
    return "".join(out)


def to_markdown(text: str, spans: Sequence[tuple[int, int]] = ()) -> str:
    """Markdown showing ``text`` as written, with ``spans`` (character offsets) highlighted.

    Line breaks are kept as hard breaks so page layout survives; highlights are closed at
    the end of each line because a directive cannot span lines.
    """
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    marks = _segments(text, spans)
    lines: list[list[tuple[str, bool]]] = [[]]
    for piece, marked in marks:
        parts = piece.split("\n")
        for number, part in enumerate(parts):
            if number:
                lines.append([])
            lines[-1].append((part, marked))
    return "  \n".join(_line(pieces) for pieces in lines)


def _segments(text: str, spans: Sequence[tuple[int, int]]) -> list[tuple[str, bool]]:
    cursor = 0
    out: list[tuple[str, bool]] = []
    for start, end in sorted(spans):
        start, end = max(start, cursor), min(end, len(text))
        if start >= end:
            continue
        out += [(text[cursor:start], False), (text[start:end], True)]
        cursor = end
    out.append((text[cursor:], False))
    return out


def find_spans(text: str, query: str) -> list[tuple[int, int]]:
    """Where the words of ``query`` occur in ``text`` as a phrase, ignoring case and spacing."""
    words = query.split()
    if not words:
        return []
    pattern = re.compile(r"\s+".join(re.escape(word) for word in words), re.IGNORECASE)
    return [match.span() for match in pattern.finditer(text)]


def human_bytes(count: int | None) -> str:
    if count is None:
        return "–"
    size = float(count)
    for unit in ("bytes", "KB", "MB", "GB"):
        if size < 1024 or unit == "GB":
            return f"{int(size):,} {unit}" if unit == "bytes" else f"{size:,.1f} {unit}"
        size /= 1024
    return f"{size:,.1f} TB"


def plural(count: int, word: str, many: str | None = None) -> str:
    return f"{count:,} {word if count == 1 else many or word + 's'}"


def number(value: int | None) -> str:
    return "–" if value is None else f"{value:,}"


def when(moment: datetime) -> str:
    """Stored times are UTC; show them in the server's local time, to the minute."""
    local = moment.astimezone() if moment.tzinfo else moment
    return local.strftime("%Y-%m-%d %H:%M")


def seconds(value: float | None) -> str:
    if value is None:
        return "–"
    if value < 90:
        return f"{value:.1f} s"
    minutes, rest = divmod(int(value), 60)
    return f"{minutes} min {rest:02d} s"


def unique_labels(labels: dict[int, str]) -> dict[int, str]:
    """Make option labels distinct, since Streamlit's select widgets tell options apart by label.

    Repeated labels get the item's id, so a label never depends on the order of the list.
    """
    counts: dict[str, int] = {}
    for text in labels.values():
        counts[text] = counts.get(text, 0) + 1
    return {key: text if counts[text] == 1 else f"{text} (#{key})" for key, text in labels.items()}
