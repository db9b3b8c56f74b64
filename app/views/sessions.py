"""Chat sessions: open one on the Ask page, rename it, delete it or export its transcript."""

import streamlit as st

from app.ui import activity, context, state
from app.ui import sessions as sessions_ui

services = context.services()
sessions = services.sessions

st.title("Chat sessions")
state.show_flashes()
activity.sidebar(services)

chats = sessions.list_sessions()
if not chats:
    st.info("No chat sessions yet. Ask a question on the Ask page to start one.")
    st.stop()

sessions_ui.session_table(sessions, chats)
chat = sessions_ui.choose(chats)

if st.button("Open on the Ask page", type="primary", icon=":material/forum:"):
    state.set_current_chat(chat.id)
    st.switch_page("views/ask.py")

sessions_ui.rename_form(sessions, chat)
sessions_ui.export_buttons(sessions, chat, services.analysis.model_info().path)
sessions_ui.delete_control(sessions, chat)
