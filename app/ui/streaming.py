"""Showing a running :class:`StreamJob`: prefill progress, reasoning, the growing answer, Stop."""

from __future__ import annotations

import time
from typing import Any

import streamlit as st

from app.services import safe_markdown
from app.services.jobs import JobSnapshot, StreamJob
from app.ui.text import number, seconds

POLL_S = 0.1
CURSOR = " ▌"


def progress_text(progress: Any) -> str:
    """One line for a ``PrefillProgress``: tokens read, speed and time left."""
    parts = [f"Reading the documents: {number(progress.done)} of {number(progress.total)} tokens"]
    if progress.tokens_per_s > 0:
        parts.append(f"{progress.tokens_per_s:,.0f} tok/s")
    if progress.eta_s is not None and progress.done < progress.total:
        parts.append(f"about {seconds(progress.eta_s)} left")
    return " · ".join(parts)


class _View:
    """Placeholders for one job; each poll updates only what changed."""

    def __init__(self, job: StreamJob) -> None:
        self.status = st.empty()
        self.reasoning_slot = st.empty()
        self.reasoning: Any | None = None
        self.answer = st.empty()
        stop = st.empty()
        if stop.button("Stop", key=f"stop:{job.id}", icon=":material/stop_circle:"):
            job.cancel()
        self.stop = stop
        self.shown: tuple[Any, ...] | None = None

    def update(self, snap: JobSnapshot) -> None:
        progress = snap.progress
        fingerprint = (
            len(snap.answer), len(snap.reasoning), snap.cancel_requested,
            None if progress is None else (progress.done, progress.total),
        )
        if fingerprint == self.shown:
            return
        self.shown = fingerprint
        self._status(snap)
        if snap.reasoning:
            if self.reasoning is None:
                self.reasoning = self.reasoning_slot.expander("Reasoning", expanded=False).empty()
            self.reasoning.markdown(safe_markdown.render(snap.reasoning))
        if snap.answer:
            self.answer.markdown(safe_markdown.render(snap.answer) + CURSOR)

    def _status(self, snap: JobSnapshot) -> None:
        if snap.cancel_requested:
            self.status.caption("Stopping…")
        elif snap.answer or snap.reasoning:
            self.status.empty()
        elif snap.progress is None:
            self.status.caption("Waiting for the model…")
        else:
            progress = snap.progress
            share = progress.done / progress.total if progress.total else 1.0
            self.status.progress(min(max(share, 0.0), 1.0), text=progress_text(progress))

    def clear(self) -> None:
        self.status.empty()
        self.stop.empty()


def follow(job: StreamJob) -> JobSnapshot:
    """Render the job's output as it grows; returns once the job has finished.

    A click anywhere reruns the page and abandons this loop, which is fine: the job keeps
    running on its thread and the next run picks it up again.
    """
    view = _View(job)
    while True:
        snap = job.snapshot()
        view.update(snap)
        if snap.done:
            view.clear()
            return snap
        time.sleep(POLL_S)
