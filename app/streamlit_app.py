"""Entry point: `streamlit run app/streamlit_app.py`.

Page scripts live in `app/views/`, not `app/pages/`: Streamlit treats a `pages/` folder next to
the entry script as a legacy multipage app, and a deep link such as /library on a freshly started
server would then run that page without this script (and without its `sys.path` line)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import streamlit as st  # noqa: E402

st.set_page_config(page_title="Document analyst", page_icon=":material/description:", layout="wide")

PAGES = [
    st.Page("views/library.py", title="Library", icon=":material/library_books:"),
    st.Page("views/ask.py", title="Ask", icon=":material/forum:", default=True),
    st.Page("views/summaries.py", title="Summaries", icon=":material/summarize:"),
    st.Page("views/sessions.py", title="Chat sessions", icon=":material/history:"),
    st.Page("views/model.py", title="Model", icon=":material/memory:"),
]

st.navigation(PAGES).run()
