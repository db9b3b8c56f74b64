"""PDF rendering of exports with fpdf2.

PDF's built-in fonts only cover Latin-1, so a Unicode TrueType font is looked up on the
system (DejaVu Sans, which most Linux distributions install). Without one the PDF is still
produced, with characters outside Latin-1 replaced and a note saying so.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING

from fpdf import FPDF
from fpdf.enums import XPos, YPos

if TYPE_CHECKING:
    from .exports import Report

FONT_DIRS = (
    Path("/usr/share/fonts"),
    Path("/usr/local/share/fonts"),
    Path.home() / ".local/share/fonts",
    Path("/Library/Fonts"),
    Path("C:/Windows/Fonts"),
)
REGULAR_NAMES = ("DejaVuSans.ttf",)
BOLD_NAMES = ("DejaVuSans-Bold.ttf",)
# Scripts DejaVu lacks (Chinese, Japanese, Korean) come from these when installed.
FALLBACK_NAMES = ("NotoSansCJK-Regular.ttc", "NotoSansCJKsc-Regular.otf", "DroidSansFallbackFull.ttf")
FAMILY = "DocSans"
NO_FONT_NOTE = (
    "No Unicode font was found on this computer (install DejaVu Sans), so characters outside "
    "Western European scripts are shown as '?'."
)
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")


@dataclass(frozen=True, slots=True)
class FontSet:
    regular: Path | None
    bold: Path | None
    fallbacks: tuple[Path, ...]


def _find(names: tuple[str, ...]) -> Path | None:
    for folder in FONT_DIRS:
        if not folder.is_dir():
            continue
        for name in names:
            for path in folder.rglob(name):
                return path
    return None


@lru_cache(maxsize=1)
def find_fonts() -> FontSet:
    fallbacks = tuple(p for p in (_find((name,)) for name in FALLBACK_NAMES) if p is not None)
    return FontSet(_find(REGULAR_NAMES), _find(BOLD_NAMES), fallbacks)


class _Writer:
    """A thin layer over FPDF that knows the chosen font and how to clean text for it."""

    def __init__(self, title: str, fonts: FontSet) -> None:
        self.pdf = FPDF(format="A4")
        self.pdf.set_margins(18, 18, 18)
        self.pdf.set_auto_page_break(True, margin=18)
        self.unicode = fonts.regular is not None
        self.family = FAMILY if self.unicode else "helvetica"
        if fonts.regular is not None:
            self.pdf.add_font(FAMILY, "", str(fonts.regular))
            self.pdf.add_font(FAMILY, "B", str(fonts.bold or fonts.regular))
            names = []
            for number, path in enumerate(fonts.fallbacks):
                names.append(f"Fallback{number}")
                self.pdf.add_font(names[-1], "", str(path))
            if names:
                self.pdf.set_fallback_fonts(names, exact_match=False)
        self.pdf.set_title(self.clean(title))
        self.pdf.set_creator("Document analyst")
        self.pdf.add_page()

    def clean(self, text: str) -> str:
        text = _CONTROL.sub("", text.replace("\t", "    ").replace("\r\n", "\n").replace("\r", "\n"))
        if self.unicode:
            return text
        text = text.translate(str.maketrans({"“": '"', "”": '"', "‘": "'", "’": "'", "–": "-", "—": "-"}))
        return text.encode("latin-1", "replace").decode("latin-1")

    def block(self, text: str, size: float, style: str = "", gap: float = 1.5) -> None:
        self.pdf.set_font(self.family, style, size)
        self.pdf.multi_cell(
            0, size * 0.5, self.clean(text), align="L", new_x=XPos.LMARGIN, new_y=YPos.NEXT
        )
        self.pdf.ln(gap)


def render_pdf(report: Report) -> bytes:
    writer = _Writer(report.title, find_fonts())
    writer.block(report.title, 18, "B", gap=3)
    for label, value in report.details:
        writer.block(f"{label}: {value}", 9.5, gap=0.5)
    if not writer.unicode:
        writer.block(NO_FONT_NOTE, 8.5, gap=0.5)
    for section in report.sections:
        writer.pdf.ln(3)
        writer.block(section.heading, 13, "B", gap=1.5)
        if section.note:
            writer.block(section.note, 9.5, gap=1)
        writer.block(section.text.strip() or "(empty)", 10.5, gap=2)
        if section.citations:
            writer.block("Citations", 11, "B", gap=1)
            for number, citation in enumerate(section.citations, 1):
                quote = " ".join(citation.quote.split())
                writer.block(f"{number}. {citation.where} ({citation.mark}): “{quote}”", 9.5, gap=1)
    return bytes(writer.pdf.output())
