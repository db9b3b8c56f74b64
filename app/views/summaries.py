"""Summaries: summarise one document or several, then read, export or delete past summaries."""

import streamlit as st

from app.ui import activity, context, state
from app.ui import summaries as summary_ui

services = context.services()
analysis = services.analysis

st.title("Summaries")
state.show_flashes()
activity.sidebar(services)

documents = services.documents.list_documents()
mine = summary_ui.own_job(services.jobs)
if documents:
    picked = summary_ui.document_picker(services.sessions, documents)
    st.button("Summarise", type="primary", disabled=not picked or mine is not None,
              on_click=summary_ui.start, args=(analysis, services.jobs, documents, picked))
else:
    st.info("The library is empty. Add documents on the Library page to summarise them.")
summary_ui.running(services.jobs)

summaries = services.summaries.list_summaries()
st.subheader(f"Past summaries ({len(summaries)})")
if not summaries:
    st.caption("No summaries yet.")
    st.stop()
summary_ui.summary_table(summaries)
summary_ui.show(services.summaries, services.documents, summary_ui.choose(summaries))
