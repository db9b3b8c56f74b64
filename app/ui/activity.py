"""What the model is doing for everyone, in the sidebar of every page: answers, summaries and reads
ahead, in the order they have the model, with their place in line and time left; an answer in
another chat session than the one open can be opened from there."""

from __future__ import annotations

import streamlit as st

from app.services.container import Services
from app.services.jobs import JobSnapshot, StreamJob
from app.services.reading import ReadStatus
from app.ui import chat, state
from app.ui.streaming import place_text
from app.ui.text import escape, number, seconds

POLL_S = 2.0
LABEL_LENGTH = 48
KINDS = {"answer": "Answer", "summary": "Summary"}


def short(text: str, length: int = LABEL_LENGTH) -> str:
    words = " ".join(text.split())
    return words if len(words) <= length else words[: length - 1].rstrip() + "…"


def job_line(job: StreamJob, snap: JobSnapshot) -> str:
    """"Answer “When does…”: writing, 12 tokens · at most about 8.0 s left"."""
    head = f"{KINDS.get(job.kind, job.kind.capitalize())} “{escape(short(job.label))}”"
    if snap.cancel_requested:
        state = "stopping"
    elif snap.writing:
        state = f"writing, {number(snap.generated)} tokens"
        if snap.eta_s is not None:
            state += f" · at most about {seconds(snap.eta_s)} left"
    elif snap.progress is not None and snap.progress.total:
        state = f"reading the prompt, {snap.progress.done / snap.progress.total:.0%}"
        if snap.eta_s is not None:
            state += f" · about {seconds(snap.eta_s)} left"
    else:
        state = place_text(snap.position, snap.starts_in_s).removeprefix("Waiting for the model: ").lower()
    return f"{head}: {state}"


def read_line(read: ReadStatus) -> str:
    """"Reading ahead “Lease”: 40%, about 12.0 s left"."""
    head = f"Reading ahead “{escape(short(read.title))}”"
    share = f"{read.done / read.total:.0%}" if read.total else "0%"
    if read.state == "reading":
        state = share + (f", about {seconds(read.eta_s)} left" if read.eta_s is not None else "")
    elif read.state == "paused":
        state = f"paused for an answer at {share}"
    elif read.position is None:
        state = "waiting for the model"
    else:
        state = f"waiting, {'next' if read.position == 1 else f'number {read.position}'} among the reads"
    return f"{head}: {state}"


def sidebar(services: Services) -> None:
    with st.sidebar:
        _panel(services)


@st.fragment(run_every=POLL_S)
def _panel(services: Services) -> None:
    jobs = services.jobs.running()
    reads = services.reading.active() if services.reading is not None else []
    if not jobs and not reads:
        return
    st.caption("**The model is working on**")
    for job in jobs:
        chat_id = chat.chat_of(job.key)
        st.caption(job_line(job, job.snapshot()))
        if chat_id is not None and chat_id != state.current_chat_id() and st.button(
            "Open this chat session", key=f"open:{job.id}", type="tertiary", icon=":material/forum:"
        ):
            state.set_current_chat(chat_id)
            st.switch_page("views/ask.py")
    for read in reads:
        st.caption(read_line(read))
