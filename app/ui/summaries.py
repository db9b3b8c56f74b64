"""Summaries page parts: choosing documents, writing a summary, browsing and exporting them."""

from __future__ import annotations

import uuid
from collections.abc import Sequence

import streamlit as st

from app.services import safe_markdown
from app.services.analysis import AnalysisService
from app.services.exports import summary_report, summary_title
from app.services.jobs import JobRegistry, StreamJob
from app.ui import citations, downloads, pickers, state, streaming
from app.ui.text import escape, unique_labels, when
from storage import DocumentInfo, SessionStore, SummaryInfo, SummaryStore

MINE = "summary_job"
PICKED, CHOSEN, CONFIRM = "summary_documents", "summary_chosen", "summary_confirm_delete"


def document_picker(sessions: SessionStore, documents: Sequence[DocumentInfo]) -> list[int]:
    """Start from the current chat session's selection; one document is just as fine."""
    by_id = {d.id: d for d in documents}
    names = unique_labels({d.id: d.title for d in documents})
    if PICKED not in st.session_state:
        chat_id = state.current_chat_id()
        selection = sessions.get_documents(chat_id) if chat_id is not None else []
        st.session_state[PICKED] = [e.document_id for e in selection if e.document_id is not None]
    state.keep_widget_value(PICKED, [i for i in st.session_state[PICKED] if i in by_id])
    st.multiselect(
        "Documents to summarise", list(by_id), key=PICKED, format_func=names.__getitem__,
        help="Starts with the documents of the chat session open on the Ask page.",
        placeholder="Choose one or more documents",
    )
    return list(st.session_state[PICKED])


def start(analysis: AnalysisService, jobs: JobRegistry, documents: Sequence[DocumentInfo],
          document_ids: Sequence[int]) -> StreamJob:
    """Write a summary on a worker thread, registered for every tab; this tab remembers it as its own."""
    ids = list(document_ids)
    titles = {d.id: d.title for d in documents}
    job = jobs.start(
        f"summary:{uuid.uuid4().hex}",
        lambda progress, cancel: analysis.summarize(ids, progress=progress, cancel=cancel),
        kind="summary", label="; ".join(titles.get(i, str(i)) for i in ids), max_tokens=analysis.max_new_tokens,
    )
    st.session_state[MINE] = job.key
    state.watch(job.id)
    return job


def own_job(jobs: JobRegistry) -> StreamJob | None:
    """The summary this tab started, while it runs; once it ends, its summary is chosen or its error shown."""
    job = jobs.get(st.session_state.get(MINE, ""))
    if job is None or not job.done:
        return job
    st.session_state.pop(MINE, None)
    snap = job.snapshot()
    if state.watched(job.id) and snap.error:
        st.error(escape(snap.error))
    elif snap.summary is not None:
        st.session_state[CHOSEN] = snap.summary.id
    return None


def running(jobs: JobRegistry) -> None:
    """Every summary being written, whichever tab started it."""
    for job in jobs.running(kind="summary"):
        with st.container(border=True):
            st.caption(f"Summary of {escape(job.label)}")
            streaming.live(job)


def label(summary: SummaryInfo) -> str:
    return f"{when(summary.created_at)} · {summary_title(summary)}"


def summary_table(summaries: Sequence[SummaryInfo]) -> None:
    rows = [
        {
            "Written": when(s.created_at), "Documents": "; ".join(r.title for r in s.documents),
            "Model": s.model_name, "Citations": len(s.citations),
        }
        for s in summaries
    ]
    st.dataframe(rows, hide_index=True, width="stretch")


def choose(summaries: Sequence[SummaryInfo]) -> SummaryInfo:
    by_id = {s.id: s for s in summaries}
    return by_id[pickers.pick("Summary", {s.id: label(s) for s in summaries}, CHOSEN)]


def show(store: SummaryStore, documents_store, summary: SummaryInfo) -> None:
    with st.container(border=True):
        st.markdown(f"#### {escape(summary_title(summary))}")
        st.caption(
            f"{when(summary.created_at)} · model {escape(summary.model_name)} · "
            + "; ".join(escape(r.title) for r in summary.documents)
        )
        st.markdown(safe_markdown.render(summary.text) or "*(empty)*")
        citations.show(documents_store, f"s{summary.id}", summary.citations)
    st.caption("Export")
    downloads.export_buttons(lambda: summary_report(summary), summary_title(summary), f"summary{summary.id}")
    _delete_control(store, summary)


def _delete(store: SummaryStore, summary_id: int) -> None:
    store.delete_summary(summary_id)
    st.session_state.pop(CONFIRM, None)
    st.session_state.pop(CHOSEN, None)
    state.flash("success", "Summary deleted.")


def _delete_control(store: SummaryStore, summary: SummaryInfo) -> None:
    if st.session_state.get(CONFIRM) != summary.id:
        st.button(
            "Delete this summary…", icon=":material/delete:",
            on_click=lambda: st.session_state.update({CONFIRM: summary.id}),
        )
        return
    st.warning("Delete this summary? This cannot be undone.")
    yes, no = st.columns(2)
    yes.button("Delete", type="primary", on_click=_delete, args=(store, summary.id), width="stretch")
    no.button("Cancel", on_click=lambda: st.session_state.pop(CONFIRM, None), width="stretch")
