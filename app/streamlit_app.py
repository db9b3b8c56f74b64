"""Entry point: `streamlit run app/streamlit_app.py`."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import streamlit as st  # noqa: E402

st.set_page_config(page_title="Document analyst", layout="wide")
st.title("Document analyst")
st.write("The runtime is installed. Pages for the library, questions and sessions come next.")
