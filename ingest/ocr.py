"""Reading page images: pages rendered with pdfium, text recognised by tesseract.

Tesseract runs as a program (Debian's ``tesseract-ocr`` plus one package per language,
installed by ``scripts/ocr.sh``); its TSV output gives each word with a confidence, which is
kept per page so the reader and citations can say how far an OCR'd page can be trusted.
"""

from __future__ import annotations

import csv
import functools
import io
import logging
import os
import shutil
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass

import pypdfium2 as pdfium
import pypdfium2.raw as pdfium_c

from .errors import TIMEOUT, IngestError
from .settings import IngestSettings
from .watchdog import Deadline

logger = logging.getLogger(__name__)
TESSERACT = "tesseract"
POINTS_PER_INCH = 72
# A page rendered larger than this is rendered at a lower resolution (a huge media box must not
# become gigabytes of pixels); 40 MP is an A2 sheet at 300 DPI.
MAX_PAGE_PIXELS = 40_000_000
# Text-layer pages with fewer letters than this but a page-sized image are scans with a stamp
# (a Bates number, a page number) on top: the image is what holds the text.
STAMP_MAX_LETTERS = 40
PAGE_IMAGE_SHARE = 0.5
# Below this mean word confidence (0-100) a page gets a warning to check quotes against the image.
LOW_CONFIDENCE = 60.0
# Page segmentation "automatic, no orientation detection": the default for full pages.
PAGE_SEGMENTATION = "3"


@dataclass(frozen=True, slots=True)
class OcrPage:
    """Recognised text of one page; ``confidence`` is the mean word confidence, None without words."""

    number: int
    text: str
    confidence: float | None
    dpi: int
    failed: bool = False


class OcrUnavailable(Exception):
    """Tesseract or a language pack it needs is not installed; the message says which."""


@functools.cache
def installed_languages() -> frozenset[str]:
    """Language codes tesseract can use here (empty when tesseract is not installed)."""
    if shutil.which(TESSERACT) is None:
        return frozenset()
    try:
        listing = subprocess.run(
            [TESSERACT, "--list-langs"], capture_output=True, text=True, timeout=30, check=False
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return frozenset()
    return frozenset(line.strip() for line in listing.splitlines()[1:] if line.strip())


def check_available(languages: str) -> None:
    """Raise :class:`OcrUnavailable` unless tesseract and every language in ``languages`` are installed."""
    installed = installed_languages()
    if not installed:
        raise OcrUnavailable("OCR is not installed on this server (tesseract, installed by scripts/ocr.sh)")
    missing = [code for code in languages.split("+") if code and code not in installed]
    if missing:
        raise OcrUnavailable(
            f"the OCR language pack{'s' if len(missing) > 1 else ''} {', '.join(missing)} "
            "is not installed (scripts/ocr.sh installs the configured languages)"
        )


def page_needs_ocr(page: pdfium.PdfPage, text_letters: int) -> bool:
    """Whether a page's words are in an image: no text layer but something drawn, or a stamped scan."""
    objects = list(page.get_objects(max_depth=2))
    if text_letters == 0:
        return any(obj.type != pdfium_c.FPDF_PAGEOBJ_TEXT for obj in objects)
    if text_letters >= STAMP_MAX_LETTERS:
        return False
    width, height = page.get_size()
    page_area = max(width * height, 1.0)
    for obj in objects:
        if obj.type == pdfium_c.FPDF_PAGEOBJ_IMAGE:
            left, bottom, right, top = obj.get_bounds()
            if (right - left) * (top - bottom) >= PAGE_IMAGE_SHARE * page_area:
                return True
    return False


def render_page(page: pdfium.PdfPage, dpi: int) -> tuple[bytes, int]:
    """The page as a greyscale PNG at ``dpi`` (lowered for oversized pages) and the dpi used."""
    width, height = page.get_size()
    scale = dpi / POINTS_PER_INCH
    pixels = width * height * scale * scale
    if pixels > MAX_PAGE_PIXELS:
        scale *= (MAX_PAGE_PIXELS / pixels) ** 0.5
    bitmap = page.render(scale=scale, grayscale=True)
    buffer = io.BytesIO()
    bitmap.to_pil().save(buffer, format="PNG")
    return buffer.getvalue(), round(scale * POINTS_PER_INCH)


def recognise(image: bytes, languages: str, deadline: Deadline) -> tuple[str, float | None]:
    """Text and mean word confidence of one page image, from tesseract's TSV output."""
    env = dict(os.environ, OMP_THREAD_LIMIT="1")  # tesseract's own threads only slow it down here
    try:
        done = subprocess.run(
            [TESSERACT, "stdin", "stdout", "-l", languages, "--psm", PAGE_SEGMENTATION, "tsv"],
            input=image, capture_output=True, timeout=max(deadline.remaining_s, 0.1), check=False, env=env,
        )
    except subprocess.TimeoutExpired as exc:
        raise IngestError(TIMEOUT, "Reading the scanned pages took too long and was stopped.") from exc
    if done.returncode != 0:
        detail = done.stderr.decode("utf-8", "replace").strip().splitlines()
        raise RuntimeError(f"tesseract failed: {detail[-1] if detail else done.returncode}")
    return words_to_text(done.stdout.decode("utf-8", "replace"))


def words_to_text(tsv: str) -> tuple[str, float | None]:
    """Lines from tesseract's word rows (blank line between paragraphs), and their mean confidence.

    The confidence is weighted by word length, so a page is not judged by its stray marks.
    """
    lines: dict[tuple[int, int, int], list[str]] = {}
    weighted = weight = 0.0
    for row in csv.DictReader(io.StringIO(tsv), delimiter="\t", quoting=csv.QUOTE_NONE):
        word = (row.get("text") or "").strip()
        if row.get("level") != "5" or not word:
            continue
        key = (int(row["block_num"]), int(row["par_num"]), int(row["line_num"]))
        lines.setdefault(key, []).append(word)
        confidence = float(row["conf"])
        if confidence >= 0:
            weighted += confidence * len(word)
            weight += len(word)
    out: list[str] = []
    previous: tuple[int, int] | None = None
    for (block, paragraph, _), words in lines.items():
        if previous is not None and previous != (block, paragraph):
            out.append("")
        out.append(" ".join(words))
        previous = (block, paragraph)
    return "\n".join(out), (weighted / weight if weight else None)


def read_pages(
    document: pdfium.PdfDocument, numbers: Sequence[int], languages: str, dpi: int, deadline: Deadline
) -> list[OcrPage]:
    """Recognise the 1-based pages ``numbers``, reporting progress as "ocr" after each page."""
    pages: list[OcrPage] = []
    for done, number in enumerate(numbers):
        deadline.check()
        deadline.report("ocr", done, len(numbers))
        try:
            page = document[number - 1]
            try:
                image, used_dpi = render_page(page, dpi)
            finally:
                page.close()
            text, confidence = recognise(image, languages, deadline)
        except IngestError:
            raise
        except Exception:  # one page that cannot be rendered or recognised must not cost the others
            logger.info("OCR of page %d failed", number, exc_info=True)
            pages.append(OcrPage(number, "", None, dpi, failed=True))
            continue
        pages.append(OcrPage(number, text, confidence, used_dpi))
    deadline.report("ocr", len(numbers), len(numbers))
    return pages


@dataclass(frozen=True, slots=True)
class OcrOutcome:
    """OCR results by page number, and what the document's reader should be told."""

    pages: dict[int, OcrPage]
    warnings: tuple[str, ...]
    unavailable: str | None = None


def ocr_image_pages(data: bytes, texts: Sequence[str], settings: IngestSettings, deadline: Deadline) -> OcrOutcome:
    """Recognise the pages whose words are only in images; ``texts`` are the text-layer texts."""
    try:
        document = pdfium.PdfDocument(data)
    except pdfium.PdfiumError:
        return OcrOutcome({}, ())
    try:
        wanted = [n for n, text in enumerate(texts, 1) if _needs_ocr(document, n, text)]
        if not wanted:
            return OcrOutcome({}, ())
        try:
            check_available(settings.ocr_languages)
        except OcrUnavailable as exc:
            return OcrOutcome({}, (f"{page_list(wanted).capitalize()} {_are_images(wanted)} without a text layer "
                                   f"and {_were(wanted)} not read: {exc}.",), unavailable=str(exc))
        chosen, skipped = wanted[: settings.ocr_max_pages], wanted[settings.ocr_max_pages :]
        deadline.extend(len(chosen) * settings.ocr_seconds_per_page)
        pages = {page.number: page for page in read_pages(document, chosen, settings.ocr_languages,
                                                           settings.ocr_dpi, deadline)}
    finally:
        document.close()
    return OcrOutcome(pages, _warnings(pages, skipped, settings.ocr_max_pages))


def _needs_ocr(document: pdfium.PdfDocument, number: int, text: str) -> bool:
    try:
        page = document[number - 1]
    except pdfium.PdfiumError:  # a page pdfium cannot load; pypdf may still have read its text
        return False
    try:
        return page_needs_ocr(page, sum(ch.isalnum() for ch in text))
    finally:
        page.close()


def _warnings(pages: dict[int, OcrPage], skipped: Sequence[int], limit: int) -> tuple[str, ...]:
    read = [n for n, page in pages.items() if page.text.strip()]
    blank = [n for n, page in pages.items() if not page.text.strip() and not page.failed]
    broken = [n for n, page in pages.items() if page.failed]
    low = [n for n in read if (pages[n].confidence or 0.0) < LOW_CONFIDENCE]
    warnings = []
    if read:
        warnings.append(f"{page_list(read).capitalize()} {_were(read)} read with OCR from the page image; "
                        "check quotes from OCR'd pages against the original.")
    if low:
        warnings.append(f"OCR was unsure of {page_list(low)} (confidence below {LOW_CONFIDENCE:.0f}%): "
                        "the text there may contain misread words.")
    if blank:
        warnings.append(f"OCR found no text in the image of {page_list(blank)}.")
    if broken:
        warnings.append(f"The image of {page_list(broken)} could not be rendered or recognised, so it was not read.")
    if skipped:
        warnings.append(f"{page_list(skipped).capitalize()} {_are_images(skipped)} without a text layer "
                        f"and {_were(skipped)} not read: OCR stops after {limit:,} pages of one document.")
    return tuple(warnings)


def page_list(numbers: Sequence[int]) -> str:
    """ "page 3", "pages 1-4, 7 and 9": consecutive pages as ranges."""
    ranges: list[str] = []
    start = previous = None
    for number in [*sorted(numbers), None]:
        if start is not None and (number is None or number != previous + 1):
            ranges.append(str(start) if start == previous else f"{start}-{previous}")
            start = None
        if number is not None and start is None:
            start = number
        previous = number
    word = "page" if len(numbers) == 1 else "pages"
    listed = ranges[0] if len(ranges) == 1 else ", ".join(ranges[:-1]) + " and " + ranges[-1]
    return f"{word} {listed}"


def _are_images(numbers: Sequence[int]) -> str:
    return "is an image" if len(numbers) == 1 else "are images"


def _were(numbers: Sequence[int]) -> str:
    return "was" if len(numbers) == 1 else "were"
