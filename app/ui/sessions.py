"""Chat sessions page parts: the list, rename, delete and transcript export."""

from __future__ import annotations

from collections.abc import Sequence

import streamlit as st

from app.services.exports import Report, transcript_report
from app.ui import downloads, pickers, state
from app.ui.text import escape, when
from storage import ChatSessionInfo, SessionStore

CHOSEN, CONFIRM = "sessions_chosen", "sessions_confirm_delete"


def session_table(sessions: SessionStore, chats: Sequence[ChatSessionInfo]) -> None:
    rows = []
    for chat in chats:
        documents = sessions.get_documents(chat.id)
        rows.append({
            "Name": chat.name, "Messages": chat.message_count,
            "Documents": "; ".join(d.display_title for d in documents),
            "Created": when(chat.created_at), "Last activity": when(chat.updated_at),
        })
    st.dataframe(rows, hide_index=True, width="stretch")


def choose(chats: Sequence[ChatSessionInfo]) -> ChatSessionInfo:
    by_id = {c.id: c for c in chats}
    names = {c.id: c.name for c in chats}
    return by_id[pickers.pick("Chat session", names, CHOSEN, default=state.current_chat_id())]


def rename_form(sessions: SessionStore, chat: ChatSessionInfo) -> None:
    with st.form(f"rename:{chat.id}", border=False):
        name = st.text_input("Name", value=chat.name, max_chars=255)
        if st.form_submit_button("Rename", icon=":material/edit:"):
            if not name.strip():
                st.error("A chat session needs a name.")
            else:
                sessions.rename_session(chat.id, name)
                state.flash("success", f"Renamed to “{escape(' '.join(name.split()))}”.")
                st.rerun()


def _delete(sessions: SessionStore, chat_id: int) -> None:
    sessions.delete_session(chat_id)
    st.session_state.pop(CONFIRM, None)
    st.session_state.pop(CHOSEN, None)
    if state.current_chat_id() == chat_id:
        state.set_current_chat(None)
    state.flash("success", "Chat session deleted.")


def delete_control(sessions: SessionStore, chat: ChatSessionInfo) -> None:
    if st.session_state.get(CONFIRM) != chat.id:
        st.button(
            "Delete this chat session…", icon=":material/delete:",
            on_click=lambda: st.session_state.update({CONFIRM: chat.id}),
        )
        return
    st.warning(
        f"Delete “{escape(chat.name)}” and its {chat.message_count} messages? "
        "The documents stay in the library."
    )
    yes, no = st.columns(2)
    yes.button("Delete", type="primary", on_click=_delete, args=(sessions, chat.id), width="stretch")
    no.button("Cancel", on_click=lambda: st.session_state.pop(CONFIRM, None), width="stretch")


def transcript(sessions: SessionStore, chat: ChatSessionInfo, model_name: str) -> Report:
    return transcript_report(
        chat, sessions.get_documents(chat.id), sessions.list_messages(chat.id), model_name
    )


def export_buttons(sessions: SessionStore, chat: ChatSessionInfo, model_name: str) -> None:
    st.caption("Export the transcript")
    downloads.export_buttons(lambda: transcript(sessions, chat, model_name), chat.name, f"chat{chat.id}")
