"""Chat sessions (CRUD, ordered document selection, messages) and summaries."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from storage import DocumentRef, MessageStats, NotFoundError, Storage
from tests.test_storage_support import BACKENDS, backend_for, make_document, open_storage


@pytest.fixture(params=BACKENDS)
def storage(request: pytest.FixtureRequest, tmp_path: Path):
    for backend in backend_for(request.param, tmp_path):
        opened = open_storage(backend)
        yield opened
        opened.close()


def add_docs(storage: Storage, *titles: str) -> list[int]:
    return [storage.documents.add_document(make_document(t, [f"{t} text"]), f"{t}.txt")[0].id for t in titles]


def test_session_crud(storage: Storage) -> None:
    first = storage.chats.create_session("  First   chat ")
    second = storage.chats.create_session("Second")
    assert first.name == "First chat" and first.message_count == 0
    assert [s.id for s in storage.chats.list_sessions()] == [second.id, first.id]

    storage.chats.append_message(first.id, "user", "hello")
    listed = storage.chats.list_sessions()
    assert [(s.id, s.message_count) for s in listed] == [(first.id, 1), (second.id, 0)]

    renamed = storage.chats.rename_session(second.id, "Renamed")
    assert renamed.name == "Renamed" and renamed.updated_at >= second.updated_at
    assert storage.chats.get_session(second.id) == renamed
    assert storage.chats.get_session(12345) is None
    with pytest.raises(ValueError):
        storage.chats.rename_session(second.id, "   ")
    with pytest.raises(NotFoundError):
        storage.chats.rename_session(12345, "x")

    assert storage.chats.delete_session(first.id) is True
    assert storage.chats.delete_session(first.id) is False
    assert storage.chats.list_messages(first.id) == []
    assert [s.id for s in storage.chats.list_sessions()] == [second.id]


def test_ordered_document_selection(storage: Storage) -> None:
    a, b, c = add_docs(storage, "A", "B", "C")
    chat = storage.chats.create_session("Compare", [c, a])
    assert [e.document_id for e in storage.chats.get_documents(chat.id)] == [c, a]

    selection = storage.chats.set_documents(chat.id, [b, c, b, a])
    assert [(e.position, e.document_id, e.title) for e in selection] == [
        (0, b, "B"),
        (1, c, "C"),
        (2, a, "A"),
    ]
    with pytest.raises(NotFoundError, match="999"):
        storage.chats.set_documents(chat.id, [a, 999])
    assert [e.document_id for e in storage.chats.get_documents(chat.id)] == [b, c, a]
    assert storage.chats.set_documents(chat.id, []) == []
    with pytest.raises(NotFoundError):
        storage.chats.set_documents(4321, [a])

    storage.chats.set_documents(chat.id, [a])
    storage.chats.delete_session(chat.id)
    assert storage.chats.get_documents(chat.id) == []
    assert storage.documents.get_document(a) is not None


def test_messages_append_update_and_list(storage: Storage) -> None:
    chat = storage.chats.create_session("Q&A")
    question = storage.chats.append_message(chat.id, "user", "What does page 2 say?")
    draft = storage.chats.append_message(chat.id, "assistant", "", status="streaming")
    assert (question.position, draft.position) == (0, 1)
    assert draft.stats == MessageStats() and draft.citations == [] and draft.reasoning is None

    stats = MessageStats(prefill_tokens=5000, cached_tokens=4000, time_to_first_token_s=0.25, tokens_per_s=31.5)
    citations = [{"document": "abc", "unit": 2, "quote": "x"}]
    final = storage.chats.update_message(
        draft.id,
        text="It says x.",
        reasoning="look at page 2",
        citations=citations,
        stats=stats,
        status="complete",
    )
    assert (final.text, final.reasoning, final.citations, final.stats, final.status) == (
        "It says x.",
        "look at page 2",
        citations,
        stats,
        "complete",
    )
    assert storage.chats.update_message(draft.id, status="cancelled").reasoning == "look at page 2"
    assert storage.chats.update_message(draft.id, reasoning=None).reasoning is None

    storage.chats.append_message(chat.id, "user", "Thanks", status="complete")
    messages = storage.chats.list_messages(chat.id)
    assert [(m.position, m.role) for m in messages] == [(0, "user"), (1, "assistant"), (2, "user")]
    assert messages[1].status == "cancelled" and messages[1].stats == stats
    with pytest.raises(dataclasses.FrozenInstanceError):
        messages[0].text = "changed"  # type: ignore[misc]

    assert storage.chats.delete_message(messages[2].id) is True
    assert storage.chats.append_message(chat.id, "user", "again").position == 2


def test_message_validation(storage: Storage) -> None:
    chat = storage.chats.create_session("Checks")
    with pytest.raises(ValueError, match="role"):
        storage.chats.append_message(chat.id, "robot", "beep")
    with pytest.raises(ValueError, match="status"):
        storage.chats.append_message(chat.id, "user", "x", status="done")
    with pytest.raises(NotFoundError):
        storage.chats.append_message(9999, "user", "orphan")
    with pytest.raises(NotFoundError):
        storage.chats.update_message(9999, text="nope")
    assert storage.chats.list_messages(chat.id) == []


def test_summaries(storage: Storage) -> None:
    a, b = add_docs(storage, "A", "B")
    doc_a, doc_b = storage.documents.get_document(a), storage.documents.get_document(b)
    only_a = storage.summaries.add_summary([doc_a], "A in short.", model_name="qwen3-next-80b")
    both = storage.summaries.add_summary(
        [doc_b, doc_a], "A and B.", model_name="qwen3-next-80b", citations=[{"unit": 1}]
    )
    assert both.documents == (DocumentRef(doc_b.sha256, "B"), DocumentRef(doc_a.sha256, "A"))
    assert [s.id for s in storage.summaries.list_summaries()] == [both.id, only_a.id]
    assert [s.id for s in storage.summaries.list_summaries([doc_a.sha256, doc_b.sha256])] == [both.id]
    assert [s.id for s in storage.summaries.list_summaries([doc_a.sha256])] == [only_a.id]
    assert len(storage.summaries.list_summaries(limit=1)) == 1
    assert storage.summaries.get_summary(both.id) == both

    storage.documents.delete_document(a)
    assert storage.summaries.get_summary(only_a.id).text == "A in short."
    assert storage.summaries.delete_summary(only_a.id) is True
    assert storage.summaries.get_summary(only_a.id) is None
    with pytest.raises(ValueError):
        storage.summaries.add_summary([], "nothing", model_name="m")
