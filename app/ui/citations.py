"""Citations under an answer or summary, and the page view that opens from one."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import streamlit as st

from app.services import safe_markdown
from app.ui import state
from app.ui.text import escape, to_markdown
from storage import DocumentInfo, DocumentStore, UnitInfo

OPEN_KEY = "open_citation"
PAGE_HEIGHT = 360
QUOTE_CHARS = 90


def ocr_note(unit: UnitInfo) -> str:
    """The mark of a page read with OCR, with how sure tesseract was."""
    confidence = unit.ocr_confidence
    sure = f", confidence {confidence:.0f}%" if confidence is not None else ""
    return f":material/document_scanner: This page was read with OCR from its image{sure}; words may be misread."


def unit_word(kind: str | None) -> str:
    return "page" if kind in (None, "pdf") else "section"


def label(citation: dict[str, Any], document: DocumentInfo | None) -> str:
    """``✓ Title, page 3 — “quote”``; the mark says whether the quote was found on that page.

    Title and quote come from the model's answer (the title when no document matched), so
    they go through the same escaping as the answer itself.
    """
    mark = "✓" if citation.get("verified") else "⚠ not verified ·"
    title = " ".join(str(citation.get("document_title") or "Unknown document").split())
    where = safe_markdown.plain(title)
    page = citation.get("page")
    if page is not None:
        where += f", {unit_word(document.kind if document else None)} {page}"
        if citation.get("ocr"):
            where += " (OCR)"
    quote = " ".join(str(citation.get("quote") or "").split())
    if len(quote) > QUOTE_CHARS:
        quote = quote[: QUOTE_CHARS - 1].rstrip() + "…"
    return f"{mark} {where} — “{safe_markdown.plain(quote)}”"


def show(documents: DocumentStore, owner: str, citations: Sequence[dict[str, Any]]) -> None:
    """List citations; clicking one opens (or closes) its page right below it."""
    if not citations:
        return
    known: dict[int, DocumentInfo | None] = {}
    with st.container(gap=None):
        st.caption(f"Citations ({len(citations)})")
        for index, citation in enumerate(citations):
            document_id = citation.get("document_id")
            if document_id is not None and document_id not in known:
                known[document_id] = documents.get_document(document_id)
            document = known.get(document_id) if document_id is not None else None
            key = f"{owner}:{index}"
            st.button(
                label(citation, document), key=f"cite:{key}", type="tertiary",
                on_click=state.toggle, args=(OPEN_KEY, key),
            )
            if st.session_state.get(OPEN_KEY) == key:
                page_view(documents, citation, document)


def page_view(documents: DocumentStore, citation: dict[str, Any], document: DocumentInfo | None) -> None:
    """The cited page as plain text with the verified quote highlighted."""
    if document is None:
        st.info("This document is not in the library any more, so its page cannot be shown.")
        return
    page = citation.get("page")
    unit = next((u for u in documents.get_units(document.id) if u.number == page), None)
    if unit is None:
        st.info(f"{escape(document.title)} has no {unit_word(document.kind)} {page}.")
        return
    start, end = citation.get("start"), citation.get("end")
    spans = [(start, end)] if citation.get("verified") and start is not None and end is not None else []
    with st.container(border=True, height=PAGE_HEIGHT):
        st.caption(f"{escape(document.title)} · {escape(unit.label)}")
        if unit.ocr:
            st.caption(ocr_note(unit))
        st.markdown(to_markdown(unit.text, spans))
    if not spans:
        st.caption("The quote was not found on this page, so nothing is highlighted.")
