"""The context check keeps room for the answer: a prompt may take the context minus MAX_NEW_TOKENS."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from streamlit.testing.v1 import AppTest

from app.services.analysis import AnalysisService, ContextTooLong
from app.services.prompting import SUMMARY_REQUEST, question_segment, system_segment
from model import load_model
from storage.repository import Storage

MAX_NEW_TOKENS = 6
QUESTION = "How long does the lease run?"


@pytest.fixture(scope="module")
def lm(demo_checkpoint):
    return load_model(demo_checkpoint)


@pytest.fixture()
def storage(tmp_path):
    store = Storage.open(tmp_path / "data")
    yield store
    store.close()


def service(lm, storage, context_limit: int) -> AnalysisService:
    return AnalysisService(lm, storage.documents, storage.chats, storage.summaries, None, memory_budget_bytes=0,
                           context_limit=context_limit, max_new_tokens=MAX_NEW_TOKENS)


class Extracted:
    """A one-page extracted document, as ingest returns it."""

    def __init__(self, title: str, text: str):
        self.title, self.kind, self.text = title, "pdf", text
        self.units = (SimpleNamespace(number=1, label="page 1", text=text, start=0, end=len(text)),)
        self.sha256 = title.encode().hex().ljust(64, "0")[:64]
        self.size, self.metadata = len(text), {}


def add_document(storage) -> int:
    info, _ = storage.documents.add_document(Extracted("Lease", "The lease runs for two years."), "Lease.pdf")
    return info.id


def prompt_tokens(svc: AnalysisService, document_id: int, request: str) -> int:
    """Tokens the model reads before answering: system prompt, document, request, answer prompt."""
    tokenizer = svc.tokenizer
    return (len(system_segment(tokenizer).ids) + len(svc.document_segment(document_id).ids)
            + len(question_segment(tokenizer, request).ids) + len(tokenizer.generation_prompt()))


def test_question_fits_exactly_when_the_answer_room_is_left_and_not_a_token_less(lm, storage):
    document = add_document(storage)
    prompt = prompt_tokens(service(lm, storage, 1 << 20), document, QUESTION)

    short = prompt + MAX_NEW_TOKENS - 1  # the prompt is one token into the room for the answer
    session = storage.chats.create_session("Too long", [document]).id
    with pytest.raises(ContextTooLong) as refused:
        list(service(lm, storage, short).ask(session, QUESTION))
    assert refused.value.reserved == MAX_NEW_TOKENS
    message = str(refused.value)
    assert f"{prompt:,} tokens" in message and f"plus {MAX_NEW_TOKENS} reserved for the answer" in message
    assert f"context of {short:,}" in message
    assert storage.chats.list_messages(session) == []

    events = list(service(lm, storage, prompt + MAX_NEW_TOKENS).ask(session, QUESTION))
    assert events[-1].message is not None and events[-1].message.status == "complete"


def test_summary_keeps_the_same_answer_room(lm, storage):
    document = add_document(storage)
    prompt = prompt_tokens(service(lm, storage, 1 << 20), document, SUMMARY_REQUEST)
    refused_by = service(lm, storage, prompt + MAX_NEW_TOKENS - 1)
    with pytest.raises(ContextTooLong, match="reserved for the answer"):
        list(refused_by.summarize([document]))
    assert storage.summaries.list_summaries() == []
    events = list(service(lm, storage, prompt + MAX_NEW_TOKENS).summarize([document]))
    assert events[-1].summary is not None


def budget_script() -> None:
    """The Ask page's budget bar for a stub service: 900 document tokens, 100 kept for the answer."""
    import streamlit as st

    from app.ui.chat import context_budget

    class Analysis:
        answer_reserve = 100

        def selection_tokens(self, document_ids):
            return 900

    st.session_state["share"] = context_budget(Analysis(), [1], st.session_state["limit"])


@pytest.mark.parametrize(("limit", "fits"), [(1000, True), (999, False)], ids=["exactly fits", "one token short"])
def test_ask_page_budget_counts_the_answer_room(limit, fits):
    at = AppTest.from_function(budget_script)
    at.session_state["limit"] = limit
    at.run()
    assert not at.exception, at.exception
    bar = at.get("progress")[0].proto.text
    assert "900 of" in bar and "100 reserved for the answer" in bar
    errors = "\n".join(str(e.value) for e in at.error)
    assert (at.session_state["share"] <= 1) is fits
    assert ("do not fit" in errors) is not fits
    if not fits:
        assert "100 tokens reserved for the answer" in errors
