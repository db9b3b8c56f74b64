"""A select box over ids whose choice lives in our own state key.

Streamlit keeps a keyed widget's value and shown label across reruns, so a renamed item
would keep its old label, and setting the choice from code (opening a chat session from
another page) would be ignored. Here the widget key changes whenever the labels do, and
the choice is copied into the widget before it is drawn.
"""

from __future__ import annotations

import zlib
from typing import Any

import streamlit as st

from app.ui import state
from app.ui.text import unique_labels


def _sync(state_key: str, widget_key: str) -> None:
    st.session_state[state_key] = st.session_state[widget_key]


def pick(label: str, labels: dict[int, str], state_key: str, *, default: int | None = None, **kwargs: Any) -> int:
    """Show a select box of ``labels`` (id to text) and return the chosen id."""
    labels = unique_labels(labels)
    ids = list(labels)
    chosen = st.session_state.get(state_key)
    if chosen not in labels:
        chosen = default if default in labels else ids[0]
    st.session_state[state_key] = chosen
    widget_key = f"{state_key}:{zlib.crc32(chr(31).join(labels.values()).encode()):08x}"
    state.keep_widget_value(widget_key, chosen)
    st.selectbox(
        label, ids, key=widget_key, format_func=labels.__getitem__,
        on_change=_sync, args=(state_key, widget_key), **kwargs,
    )
    return chosen
