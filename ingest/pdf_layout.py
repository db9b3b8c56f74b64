"""Where each line of a PDF page's extracted text sits on the page.

pypdf reports every text fragment it extracts to a ``visitor_text`` callback together with the
current transformation matrix (cm) and text matrix (tm) at the fragment's start; the start point
in page space is the translation part of tm × cm. Joined, the fragments are exactly the text
``extract_text`` returns, so each line of that text can be traced back to the fragments that
make it up and given a height on the page. That height is what proves a line to be a running
header or footer (see :func:`ingest.normalize.split_running_margins`).

Positions are only reported when they are certain: text inside form XObjects is extracted by
pypdf in the form's own coordinates, so it gets no position, and neither does a line whose
fragments sit at clearly different heights, or a page whose fragments do not add up to its text.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Callable
from typing import Any

from pypdf import PageObject

from .normalize import LINE_SPLIT, MARGIN_TOLERANCE, PageLine


def read_page_lines(page: PageObject, before_operator: Callable[[], None]) -> list[PageLine]:
    """The page's text (as pypdf's plain ``extract_text`` gives it) line by line, with heights.

    ``before_operator`` is called before every content-stream operator, also inside forms, so
    a deadline check there stops a pathological page promptly. pypdf's exceptions propagate.
    """
    to_height = _height_function(page)
    fragments: list[tuple[str, float | None]] = []
    # Form XObjects being drawn (Do operators not finished yet), nested ones included.
    form_depth = 0

    def on_operator(operator: Any, *_: Any) -> None:
        nonlocal form_depth
        before_operator()
        if operator == b"Do":
            form_depth += 1

    def after_operator(operator: Any, *_: Any) -> None:
        nonlocal form_depth
        if operator == b"Do" and form_depth:
            form_depth -= 1

    def on_text(text: Any, cm: Any, tm: Any, *_: Any) -> None:
        if not isinstance(text, str) or not text:
            return
        known = not form_depth and to_height is not None
        fragments.append((text, _fragment_height(cm, tm, to_height) if known else None))

    text = page.extract_text(
        visitor_operand_before=on_operator, visitor_operand_after=after_operator, visitor_text=on_text
    )
    if not isinstance(text, str):
        return []
    if "".join(fragment for fragment, _ in fragments) != text:
        return [PageLine(line) for line in LINE_SPLIT.split(text)]
    return _lines_with_heights(text, fragments)


def _height_function(page: PageObject) -> Callable[[float, float], float] | None:
    """Map a page-space point to its height share of the visible page, honouring /Rotate."""
    try:
        box = page.cropbox
        left, bottom, right, top = (float(v) for v in (box.left, box.bottom, box.right, box.top))
        rotation = int(page.rotation) % 360
    except Exception:
        return None
    width, height = right - left, top - bottom
    if not (math.isfinite(width) and math.isfinite(height)) or width <= 0 or height <= 0:
        return None
    if rotation == 90:  # turned clockwise: the left edge is now at the top
        return lambda x, y: (right - x) / width
    if rotation == 180:
        return lambda x, y: (top - y) / height
    if rotation == 270:
        return lambda x, y: (x - left) / width
    if rotation == 0:
        return lambda x, y: (y - bottom) / height
    return None


def _fragment_height(cm: Any, tm: Any, to_height: Callable[[float, float], float]) -> float | None:
    try:
        # Translation part of tm × cm (row vectors, as in the PDF reference).
        x = float(tm[4]) * float(cm[0]) + float(tm[5]) * float(cm[2]) + float(cm[4])
        y = float(tm[4]) * float(cm[1]) + float(tm[5]) * float(cm[3]) + float(cm[5])
        share = to_height(x, y)
    except (TypeError, ValueError, IndexError, ZeroDivisionError):
        return None
    return share if math.isfinite(share) else None


def _lines_with_heights(text: str, fragments: list[tuple[str, float | None]]) -> list[PageLine]:
    starts: list[int] = []
    offset = 0
    for fragment, _ in fragments:
        starts.append(offset)
        offset += len(fragment)
    lines: list[PageLine] = []
    line_start = 0
    for match in LINE_SPLIT.finditer(text):
        lines.append(_placed_line(text, line_start, match.start(), starts, fragments))
        line_start = match.end()
    lines.append(_placed_line(text, line_start, len(text), starts, fragments))
    return lines


def _placed_line(
    text: str, start: int, end: int, starts: list[int], fragments: list[tuple[str, float | None]]
) -> PageLine:
    """The line text[start:end] with the common height of the fragments that print it, if any."""
    heights: list[float | None] = []
    index = max(0, bisect.bisect_right(starts, start) - 1)
    while index < len(fragments) and starts[index] < end:
        lo, hi = max(start, starts[index]), min(end, starts[index] + len(fragments[index][0]))
        if hi > lo and text[lo:hi].strip():
            heights.append(fragments[index][1])
        index += 1
    line = text[start:end]
    if not heights or any(h is None for h in heights):
        return PageLine(line)
    known = [h for h in heights if h is not None]
    if max(known) - min(known) > MARGIN_TOLERANCE:
        return PageLine(line)
    return PageLine(line, known[0])
