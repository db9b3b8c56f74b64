"""Showing a running :class:`StreamJob`: its place in line, prefill progress, reasoning, the growing
answer, Stop.

The view is a fragment that reruns itself every ``POLL_S`` seconds and draws the job's latest
snapshot; the job lives in the process-wide registry, so any tab can draw it and a closed tab
loses nothing. When the job ends the whole page reruns to show what was saved.
"""

from __future__ import annotations

from typing import Any

import streamlit as st

from app.services import safe_markdown
from app.services.jobs import JobSnapshot, StreamJob
from app.ui.text import number, seconds

POLL_S = 0.5
CURSOR = " ▌"


def progress_text(progress: Any) -> str:
    """One line for a ``PrefillProgress``: tokens read, speed and time left."""
    parts = [f"Reading the documents: {number(progress.done)} of {number(progress.total)} tokens"]
    if progress.tokens_per_s > 0:
        parts.append(f"{progress.tokens_per_s:,.0f} tok/s")
    if progress.eta_s is not None and progress.done < progress.total:
        parts.append(f"about {seconds(progress.eta_s)} left")
    return " · ".join(parts)


def place_text(position: int | None, starts_in_s: float | None = None) -> str:
    """Where a request stands in the model's queue: "next in line · starts in about 4.0 s"."""
    if position is None:
        return "Waiting for the model…"
    if position == 0:
        return "Starting…"
    line = "Waiting for the model: " + ("next in line" if position == 1 else f"number {position} in line")
    if starts_in_s is not None:
        line += f" · starts in about {seconds(starts_in_s)}"
    return line


def draw(snap: JobSnapshot) -> None:
    """One frame of a running job: status or progress, reasoning (collapsed), answer so far."""
    progress = snap.progress
    if snap.cancel_requested:
        st.caption("Stopping…")
    elif snap.writing:
        pass
    elif progress is None:
        st.caption(place_text(snap.position, snap.starts_in_s))
    else:
        share = progress.done / progress.total if progress.total else 1.0
        st.progress(min(max(share, 0.0), 1.0), text=progress_text(progress))
    if snap.reasoning:
        with st.expander("Reasoning", expanded=False):
            st.markdown(safe_markdown.render(snap.reasoning))
    if snap.answer:
        st.markdown(safe_markdown.render(snap.answer) + CURSOR)


@st.fragment(run_every=POLL_S)
def live(job: StreamJob) -> None:
    """Follow ``job`` until it ends, then rerun the page so the saved result replaces this view."""
    snap = job.snapshot()
    if snap.done:
        st.rerun()
    draw(snap)
    st.button("Stop", key=f"stop:{job.id}", icon=":material/stop_circle:", on_click=job.cancel,
              disabled=snap.cancel_requested)
