"""The Ask page's controls: which chat session, which documents, how much context they use."""

from __future__ import annotations

from collections.abc import Sequence

import streamlit as st

from app.services.analysis import AnalysisService
from app.services.jobs import Busy, JobRegistry, StreamJob
from app.ui import pickers, state
from app.ui.text import escape, number, unique_labels
from storage import ChatSessionInfo, DocumentInfo, MessageInfo, SessionStore

DEFAULT_NAME = "New chat"
NAME_LENGTH = 60
WARN_SHARE = 0.8
QUESTION = "question"


def job_key(chat_id: int) -> str:
    return f"ask:{chat_id}"


def chat_of(key: str) -> int | None:
    """The chat session of an answer's job key (None for other jobs)."""
    kind, _, chat_id = key.partition(":")
    return int(chat_id) if kind == "ask" and chat_id.isdigit() else None


def current_chat(sessions: SessionStore) -> ChatSessionInfo:
    """The chat session this tab shows: the one chosen before, else the latest, else a new one."""
    chat_id = state.current_chat_id()
    chat = sessions.get_session(chat_id) if chat_id is not None else None
    if chat is None:
        existing = sessions.list_sessions()
        chat = existing[0] if existing else sessions.create_session(DEFAULT_NAME)
        state.set_current_chat(chat.id)
    return chat


def new_chat(sessions: SessionStore, copy_from: int | None = None) -> None:
    """Start a chat session over the same documents, which is what people usually want next."""
    show = state.chat_opener()  # no Streamlit call may come between creating the chat session and showing it
    selection = sessions.get_documents(copy_from) if copy_from is not None else []
    ids = [entry.document_id for entry in selection if entry.document_id is not None]
    show(sessions.create_session(DEFAULT_NAME, ids).id)


def chat_picker(sessions: SessionStore, chat: ChatSessionInfo) -> None:
    names = {c.id: c.name for c in sessions.list_sessions()}
    left, right = st.columns([4, 1], vertical_alignment="bottom")
    with left:
        pickers.pick("Chat session", names, state.CHAT_ID, default=chat.id)
    right.button(
        "New chat session", icon=":material/add_comment:", on_click=new_chat, args=(sessions, chat.id),
        width="stretch", disabled=chat.message_count == 0,
        help="Starts over with the same documents." if chat.message_count else "This chat session is still empty.",
    )


def _save_selection(sessions: SessionStore, chat_id: int, key: str) -> None:
    sessions.set_documents(chat_id, st.session_state[key])


def document_picker(sessions: SessionStore, documents: Sequence[DocumentInfo], chat: ChatSessionInfo) -> list[int]:
    """The chat session's ordered document selection, saved on every change."""
    available = {d.id: d for d in documents}
    names = unique_labels({d.id: f"{d.title} · {number(d.token_count)} tokens" for d in documents})
    stored = sessions.get_documents(chat.id)
    key = f"selection:{chat.id}"
    current = st.session_state.get(key, [entry.document_id for entry in stored])
    state.keep_widget_value(key, [i for i in current if i in available])
    st.multiselect(
        "Documents for this chat session", list(available), key=key,
        on_change=_save_selection, args=(sessions, chat.id, key),
        format_func=names.__getitem__,
        placeholder="Choose documents from the library",
    )
    removed = [entry.title for entry in stored if entry.removed]
    if removed:
        st.caption("No longer in the library: " + "; ".join(escape(title) for title in removed))
    return list(st.session_state[key])


def context_budget(analysis: AnalysisService, document_ids: Sequence[int], limit: int) -> float:
    """A bar of the tokens the selection takes, plus the room kept for the answer, against the
    model's context; returns the share of the context both take together (over 1: cannot ask)."""
    try:
        used = analysis.selection_tokens(list(document_ids)) if document_ids else 0
    except ValueError as error:
        st.error(escape(str(error)))
        return 0.0
    reserved = analysis.answer_reserve
    share = used / limit if limit else 0.0
    needed = (used + reserved) / limit if limit else 0.0
    st.progress(
        min(needed, 1.0),
        text=f"Context: {number(used)} of {number(limit)} tokens ({share:.0%}) for documents, "
        f"{number(reserved)} reserved for the answer",
    )
    if needed > 1:
        st.error(
            f"The selected documents ({number(used)} tokens) and the {number(reserved)} tokens reserved for "
            f"the answer do not fit the model's context of {number(limit)}. Remove some documents to ask."
        )
    elif share >= WARN_SHARE:
        st.warning(
            f"The selected documents use {share:.0%} of the model's context; "
            "little room is left for the conversation."
        )
    return needed


def chat_name(question: str) -> str:
    words = " ".join(question.split())
    return words if len(words) <= NAME_LENGTH else words[: NAME_LENGTH - 1].rstrip() + "…"


def start_ask(
    analysis: AnalysisService, sessions: SessionStore, jobs: JobRegistry, chat: ChatSessionInfo, question: str
) -> StreamJob:
    """Start answering on a worker thread; the first question also names a new chat session."""
    job = jobs.start(
        job_key(chat.id),
        lambda progress, cancel: analysis.ask(chat.id, question, progress=progress, cancel=cancel),
        kind="answer", label=question, max_tokens=analysis.max_new_tokens,
        busy="An answer is already being written in this chat session.",
    )
    if chat.name == DEFAULT_NAME and chat.message_count == 0:
        sessions.rename_session(chat.id, chat_name(question))
    state.watch(job.id)
    return job


def submit(analysis: AnalysisService, sessions: SessionStore, jobs: JobRegistry, chat: ChatSessionInfo) -> None:
    """The chat input's callback: runs before the page, so the page already shows the answer running."""
    question = st.session_state.get(QUESTION)
    if not question:
        return
    try:
        start_ask(analysis, sessions, jobs, chat, question)
    except Busy as error:  # another tab asked in this chat session a moment ago
        state.flash("error", escape(str(error)))


def running_job(jobs: JobRegistry, chat_id: int) -> StreamJob | None:
    """The chat session's answer being written, whichever tab asked. One that ended with an error
    (nothing was saved) is reported in each tab that watched it, until the next question."""
    job = jobs.get(job_key(chat_id))
    if job is None:
        return None
    if not job.done:
        state.watch(job.id)
        return job
    if state.watched(job.id):
        error = job.snapshot().error
        if error:
            st.error(escape(error))
    return None


def visible_messages(history: Sequence[MessageInfo], job: StreamJob | None) -> list[MessageInfo]:
    """Stored messages, minus the question and answer a running job is still drawing live.

    Only the job's own answer is hidden: an earlier answer still marked as being written has
    lost its worker (the app stopped) and is shown with that note."""
    shown = list(history)
    if job is None:
        return shown
    if shown and shown[-1].role == "assistant" and shown[-1].status == "streaming":
        shown.pop()
    if shown and shown[-1].role == "user" and shown[-1].text == job.label:
        shown.pop()
    return shown
