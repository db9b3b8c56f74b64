"""Library: add documents, see what is stored, search it, read it page by page, delete."""

import streamlit as st

from app.ui import activity, context, state
from app.ui import library as library_ui

services = context.services()
store = services.documents

st.title("Library")
state.show_flashes()
activity.sidebar(services)

library_ui.upload_panel(services.library, services.settings.upload_limit_mb)
library_ui.reads_panel(services.reading)

documents = store.list_documents()
if not documents:
    st.info("No documents yet. Add PDF, Word, text or Markdown files above.")
    st.stop()

st.subheader(f"Documents ({len(documents)})")
library_ui.document_table(documents)

search, read = st.columns([2, 3], gap="large")
with search:
    st.subheader("Search")
    query = library_ui.search_panel(services.library)
with read:
    st.subheader("Read")
    shown = library_ui.reader(store, documents, query)
    library_ui.delete_control(store, shown, services.reading)
