"""Stored chat messages: reasoning, text, citations and generation statistics."""

from __future__ import annotations

import streamlit as st

from app.services import safe_markdown
from app.ui import citations
from storage import DocumentStore, MessageInfo, MessageStats

STATUS_NOTES = {
    "cancelled": "Stopped before the end.",
    "error": "The answer failed before it was finished.",
    "streaming": "Unfinished: the app stopped while this answer was being written.",
}


def stats_caption(stats: MessageStats) -> str:
    parts = []
    if stats.cached_tokens is not None:
        parts.append(f"{stats.cached_tokens:,} tokens from cache")
    if stats.time_to_first_token_s is not None:
        parts.append(f"time to first token {stats.time_to_first_token_s:.1f} s")
    if stats.tokens_per_s is not None:
        parts.append(f"{stats.tokens_per_s:.1f} tok/s")
    return " · ".join(parts)


def show(documents: DocumentStore, message: MessageInfo) -> None:
    with st.chat_message(message.role):
        if message.reasoning:
            with st.expander("Reasoning", expanded=False):
                st.markdown(safe_markdown.render(message.reasoning))
        if message.text:
            st.markdown(safe_markdown.render(message.text))
        elif message.role == "assistant":
            st.caption("(no answer text)")
        note = STATUS_NOTES.get(message.status)
        if note:
            st.caption(note)
        citations.show(documents, f"m{message.id}", message.citations)
        if message.role == "assistant":
            caption = stats_caption(message.stats)
            if caption:
                st.caption(caption)
