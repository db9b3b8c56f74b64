"""Per-tab UI state kept in ``st.session_state``; nothing here is shared between tabs.

Running answers and summaries are not kept here but in the process-wide job registry
(``services.jobs``), so they outlive a closed or reloaded tab; a tab only remembers which jobs
it has watched, to report how they ended.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import streamlit as st

CHAT_ID = "chat_session_id"
_OPENED = "opened_chat"
_WATCHED = "watched_jobs"
_FLASH = "flash_messages"


def current_chat_id() -> int | None:
    opened = st.session_state.get(_OPENED)
    if opened:
        st.session_state[CHAT_ID] = opened["id"]
        # Dropped only once stored: the write above is where a newer event may stop the run.
        opened.clear()
    return st.session_state.get(CHAT_ID)


def set_current_chat(chat_id: int | None) -> None:
    st.session_state[CHAT_ID] = chat_id
    st.session_state.get(_OPENED, {}).clear()


def chat_opener() -> Callable[[int], None]:
    """A function that makes this tab show a chat session, for code that creates one first.

    Streamlit may stop a callback at any ``st.session_state`` access when a newer event has come
    from the browser (a quick click or choice), and does not send the first event again. Setting
    the tab's chat session after creating one could therefore leave it created but not shown, and
    the next event would act on the previous chat session. So all state access happens here,
    before anything is created, and the returned function only fills a plain dict that
    ``current_chat_id`` applies on the next run.
    """
    opened = st.session_state.setdefault(_OPENED, {})
    return lambda chat_id: opened.update(id=chat_id)


def watch(job_id: str) -> None:
    """Remember that this tab has shown the job running, so it reports how the job ended."""
    st.session_state.setdefault(_WATCHED, set()).add(job_id)


def watched(job_id: str) -> bool:
    return job_id in st.session_state.get(_WATCHED, set())


def flash(kind: str, text: str) -> None:
    """Queue a message to show after the next rerun (e.g. after a delete)."""
    st.session_state.setdefault(_FLASH, []).append((kind, text))


def show_flashes() -> None:
    for kind, text in st.session_state.pop(_FLASH, []):
        getattr(st, kind, st.info)(text)


def toggle(key: str, value: Any) -> None:
    """Open ``value`` under ``key``, or close it when it is already open."""
    st.session_state[key] = None if st.session_state.get(key) == value else value


def keep_widget_value(key: str, value: Any) -> None:
    """Set a widget's value from code only when it differs from what the widget holds.

    Any write to a widget's key, even of the same value, makes Streamlit push that value to
    the browser on the next render. A rerun still in flight would then undo a choice the
    person made meanwhile, and the browser would send the undone value with its next event.
    """
    if key not in st.session_state or st.session_state[key] != value:
        st.session_state[key] = value
