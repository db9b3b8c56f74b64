"""Library page parts: upload, the document table, search, the page reader and deletion."""

from __future__ import annotations

from collections.abc import Sequence

import streamlit as st

from app.services.library import Library, UploadResult
from app.services.reading import ReadAhead, ReadStatus
from app.services.uploads import JobStatus
from app.ui import pickers, state
from app.ui.citations import ocr_note, unit_word
from app.ui.text import escape, find_spans, human_bytes, number, plural, seconds, to_markdown, when
from storage import DocumentInfo, DocumentStore

FILE_TYPES = ["pdf", "docx", "txt", "md", "markdown"]
RESULTS = "upload_results"
READER_DOC, READER_PAGE, CONFIRM_DELETE = "reader_document", "reader_page", "confirm_delete"
SEARCH_LIMIT = 200
SNIPPETS_PER_PAGE = 3
READER_HEIGHT = 520
POLL_S = 1.0
AS_PRINTED = "reader_as_printed"


def upload_panel(library: Library, limit_mb: int) -> None:
    """Queue every newly chosen file once, then follow each one until it is in the library."""
    files = st.file_uploader(
        "Add documents: PDF (scans are read with OCR), Word (.docx), text or Markdown", type=FILE_TYPES,
        accept_multiple_files=True, key="uploader", max_upload_size=limit_mb,
    )
    jobs: dict[str, int] = st.session_state.setdefault(RESULTS, {})
    for file in files or []:
        if file.file_id not in jobs:
            jobs[file.file_id] = library.submit(file.getvalue(), file.name)
    shown = [jobs[file.file_id] for file in files or []]
    if shown:
        upload_status(library, shown)


def upload_status(library: Library, job_ids: list[int]) -> None:
    """Each chosen file's place in the queue, reading progress or result; refreshes itself while any runs."""
    statuses = [library.status(job_id) for job_id in job_ids]
    running = any(status is not None and status.state != "done" for status in statuses)

    def render() -> None:
        current = [library.status(job_id) for job_id in job_ids]
        for status in current:
            if status is not None:
                show_status(status)
        still_running = any(status is not None and status.state != "done" for status in current)
        if running and not still_running:
            st.rerun()  # the whole page, so the new documents appear in the table below

    st.fragment(render, run_every=POLL_S if running else None)()


def reads_panel(reading: ReadAhead | None) -> None:
    """Each document being read ahead of questions: its place in line, progress and time left;
    refreshes itself while any read runs, and the page once they are all done."""
    if reading is None:
        return
    running = bool(reading.active())

    def render() -> None:
        current = reading.active()
        if current:
            st.caption("Reading the new documents ahead, so the first question about each one answers sooner. "
                       "Questions go first.")
        for read in current:
            show_read(read)
        for read in reading.statuses():
            if read.state in ("skipped", "failed"):
                st.caption(f":material/info: “{escape(read.title)}” was not read ahead: {escape(read.message)}")
        if running and not current:
            st.rerun()

    st.fragment(render, run_every=POLL_S if running else None)()


def show_read(read: ReadStatus) -> None:
    share = min(read.done / read.total, 1.0) if read.total else 0.0
    if read.state == "queued":
        place = "next" if read.position in (None, 1) else f"number {read.position} in line"
        st.progress(0.0, text=f"**{escape(read.title)}**: waiting to be read ahead, {place}")
    elif read.state == "paused":
        st.progress(share, text=f"**{escape(read.title)}**: paused while an answer is written, "
                                f"{number(read.done)} of {number(read.total)} tokens read")
    else:
        parts = [f"**{escape(read.title)}**: reading ahead, {number(read.done)} of {number(read.total)} tokens"]
        if read.tokens_per_s > 0:
            parts.append(f"{read.tokens_per_s:,.0f} tok/s")
        if read.eta_s is not None:
            parts.append(f"about {seconds(read.eta_s)} left")
        st.progress(share, text=" · ".join(parts))


def show_status(status: JobStatus) -> None:
    name = f"**{escape(status.filename)}**"
    if status.state == "queued":
        st.info(f"{name}: waiting to be read, number {status.position or 1} in the queue.",
                icon=":material/hourglass_empty:")
    elif status.state == "reading":
        st.progress(min(status.done / status.total, 1.0) if status.total else 0.0, text=progress_line(status))
    elif isinstance(status.result, UploadResult):
        show_result(status.result)
    else:
        st.error(f"{name}: the file could not be read.", icon=":material/error:")


def progress_line(status: JobStatus) -> str:
    name = f"**{escape(status.filename)}**"
    if status.phase == "ocr" and status.total:
        return f"{name}: reading scanned pages with OCR, {min(status.done + 1, status.total)} of {status.total}…"
    if status.total:
        return f"{name}: reading page {min(status.done + 1, status.total)} of {status.total}…"
    return f"{name}: reading…"


def show_result(result: UploadResult) -> None:
    name = f"**{escape(result.filename)}**"
    document = result.document
    if result.status == "added" and document is not None:
        st.success(
            f"{name}: added · {plural(document.page_count, unit_word(document.kind))} · "
            f"{number(document.token_count)} tokens",
            icon=":material/check_circle:",
        )
        for warning in result.warnings:
            st.caption(f":material/info: {escape(warning)}")
    elif result.status == "duplicate" and document is not None:
        st.info(f"{name}: already in the library as “{escape(document.title)}”.", icon=":material/content_copy:")
    else:
        st.error(f"{name}: {escape(result.message)}", icon=":material/error:")


def document_table(documents: Sequence[DocumentInfo]) -> None:
    rows = [
        {
            "Title": d.title, "File": d.filename, "Type": d.kind.upper(), "Size": human_bytes(d.size_bytes),
            "Pages": d.page_count, "Tokens": d.token_count, "Added": when(d.created_at),
        }
        for d in documents
    ]
    st.dataframe(rows, hide_index=True, width="stretch")


def open_page(document_id: int, page: int) -> None:
    st.session_state[READER_DOC] = document_id
    st.session_state[READER_PAGE] = page


def search_panel(library: Library) -> str:
    """Search box and hits by document and page; returns the query so the reader can mark it."""
    query = st.text_input("Search the library", key="library_search", placeholder="A word or a phrase")
    if not query.strip():
        return ""
    groups = library.search(query, limit=SEARCH_LIMIT)
    total = sum(group.count for group in groups)
    if not groups:
        st.info("No matches.")
        return query
    more = " (showing the first ones)" if total >= SEARCH_LIMIT else ""
    st.caption(f"{plural(total, 'match', 'matches')} in {plural(len(groups), 'document')}{more}")
    for group in groups:
        heading = f"{escape(group.title)} · {plural(group.count, 'match', 'matches')}"
        with st.expander(heading, expanded=len(groups) <= 3):
            for page, hits in group.pages.items():
                label = hits[0].unit_label if len(hits[0].unit_label) <= 40 else f"{hits[0].unit_label[:39]}…"
                st.button(
                    f"Open {label} ({len(hits)})", key=f"hit:{group.document_id}:{page}", type="tertiary",
                    on_click=open_page, args=(group.document_id, page),
                )
                for hit in hits[:SNIPPETS_PER_PAGE]:
                    st.markdown(to_markdown(hit.snippet, find_spans(hit.snippet, query)))
    return query


def _step(numbers: list[int], offset: int) -> None:
    at = numbers.index(st.session_state[READER_PAGE]) + offset
    st.session_state[READER_PAGE] = numbers[max(0, min(at, len(numbers) - 1))]


def reader(store: DocumentStore, documents: Sequence[DocumentInfo], query: str = "") -> DocumentInfo:
    """Read a document page by page (sections for Word and text files); returns the one shown."""
    by_id = {d.id: d for d in documents}
    document = by_id[pickers.pick("Document", {d.id: d.title for d in documents}, READER_DOC)]
    units = {u.number: u for u in store.get_units(document.id)}
    numbers = list(units)
    if not numbers:
        st.info("This document has no text.")
        return document
    labels = {n: f"{units[n].label} ({position} of {len(numbers)})" for position, n in enumerate(numbers, 1)}
    choose, back, forward = st.columns([4, 1, 1], vertical_alignment="bottom")
    with choose:
        unit = units[pickers.pick(unit_word(document.kind).capitalize(), labels, READER_PAGE)]
    back.button("Previous", on_click=_step, args=(numbers, -1), width="stretch")
    forward.button("Next", on_click=_step, args=(numbers, 1), width="stretch")
    reading_notes(document, units.values())
    text = unit.text
    has_margins = bool(unit.removed_header or unit.removed_footer)
    if has_margins and st.toggle("Show the running header and footer left out of the text", key=AS_PRINTED):
        text = unit.as_printed
    if unit.ocr:
        st.caption(ocr_note(unit))
    with st.container(border=True, height=READER_HEIGHT):
        st.markdown(to_markdown(text, find_spans(text, query)))
    return document


def reading_notes(document: DocumentInfo, units) -> None:
    """What reading the document left out or guessed, so nothing is lost without the user knowing."""
    if not document.warnings:
        return
    ocr_pages = sum(1 for unit in units if unit.ocr)
    title = "Notes on reading this document" + (f" ({plural(ocr_pages, 'page')} read with OCR)" if ocr_pages else "")
    with st.expander(title, icon=":material/info:"):
        for warning in document.warnings:
            st.markdown(f"- {escape(warning)}")


def _delete(store: DocumentStore, document: DocumentInfo, reading: ReadAhead | None) -> None:
    if reading is not None:
        reading.cancel(document.id)
    store.delete_document(document.id)
    st.session_state.pop(CONFIRM_DELETE, None)
    st.session_state.pop(READER_DOC, None)
    state.flash("success", f"Deleted “{escape(document.title)}”.")


def delete_control(store: DocumentStore, document: DocumentInfo, reading: ReadAhead | None = None) -> None:
    """Delete behind a confirmation, because chat sessions and summaries lose the document."""
    if st.session_state.get(CONFIRM_DELETE) != document.id:
        st.button(
            "Delete this document…", icon=":material/delete:",
            on_click=lambda: st.session_state.update({CONFIRM_DELETE: document.id}),
        )
        return
    st.warning(
        f"Delete “{escape(document.title)}” from the library? Chat sessions and summaries keep their "
        "text, but the document can no longer be read or asked about."
    )
    yes, no = st.columns(2)
    yes.button("Delete", type="primary", on_click=_delete, args=(store, document, reading), width="stretch")
    no.button("Cancel", on_click=lambda: st.session_state.pop(CONFIRM_DELETE, None), width="stretch")
