"""Ask: question the documents chosen for a chat session and watch the answer arrive."""

import streamlit as st

from app.services import safe_markdown
from app.ui import activity, context, messages, state, streaming
from app.ui import chat as chat_ui

services = context.services()
analysis, sessions = services.analysis, services.sessions
model = analysis.model_info()

st.title("Ask")
if model.is_demo:
    st.info(
        "Demo checkpoint: the model has random weights, so its answers are meaningless. "
        "The Model page explains how to use a real one.",
        icon=":material/science:",
    )
state.show_flashes()
activity.sidebar(services)

chat = chat_ui.current_chat(sessions)
chat_ui.chat_picker(sessions, chat)

documents = services.documents.list_documents()
if not documents:
    st.info("The library is empty. Add documents first.")
    st.page_link("views/library.py", label="Go to the library", icon=":material/library_books:")
selected = chat_ui.document_picker(sessions, documents, chat)
share = chat_ui.context_budget(analysis, selected, model.context_limit)

job = chat_ui.running_job(services.jobs, chat.id)
st.chat_input(
    "Ask about the selected documents" if selected else "Choose documents above to ask about them",
    key=chat_ui.QUESTION, disabled=job is not None or not selected or share > 1,
    on_submit=chat_ui.submit, args=(analysis, sessions, services.jobs, chat),
)

for message in chat_ui.visible_messages(sessions.list_messages(chat.id), job):
    messages.show(services.documents, message)

if job is not None:
    with st.chat_message("user"):
        st.markdown(safe_markdown.render(job.label))
    with st.chat_message("assistant"):
        streaming.live(job)
