"""Summaries: summarise one document or several, then read, export or delete past summaries."""

import streamlit as st

from app.ui import context, state, streaming
from app.ui import summaries as summary_ui

services = context.services()
analysis = services.analysis

st.title("Summaries")
state.show_flashes()

documents = services.documents.list_documents()
if documents:
    picked = summary_ui.document_picker(services.sessions, documents)
    job = summary_ui.running_job()
    if st.button("Summarise", type="primary", disabled=not picked or job is not None):
        job = summary_ui.start(analysis, picked)
    if job is not None:
        with st.container(border=True):
            streaming.follow(job)
        st.rerun()
else:
    st.info("The library is empty. Add documents on the Library page to summarise them.")

summaries = services.summaries.list_summaries()
st.subheader(f"Past summaries ({len(summaries)})")
if not summaries:
    st.caption("No summaries yet.")
    st.stop()
summary_ui.summary_table(summaries)
summary_ui.show(services.summaries, services.documents, summary_ui.choose(summaries))
