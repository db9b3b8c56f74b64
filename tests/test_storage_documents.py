"""Documents: dedup, units, search, and cascading deletion across checkpoints and chat sessions."""

from __future__ import annotations

from pathlib import Path

import pytest
from sqlalchemy import func, select

from storage import NotFoundError, Storage
from storage.models import DocumentUnit, StateCheckpoint
from tests.test_storage_support import (
    BACKENDS,
    FakeMetadata,
    backend_for,
    make_document,
    open_storage,
    write_bytes,
)


@pytest.fixture(params=BACKENDS)
def storage(request: pytest.FixtureRequest, tmp_path: Path):
    for backend in backend_for(request.param, tmp_path):
        opened = open_storage(backend)
        yield opened
        opened.close()


def test_same_bytes_are_stored_once(storage: Storage) -> None:
    extracted = make_document("Report", ["alpha page", "beta page"])
    first, created = storage.documents.add_document(extracted, "report.pdf", 42, "qwen3-next")
    again, created_again = storage.documents.add_document(extracted, "copy-of-report.pdf")
    assert created and not created_again
    assert again == first
    assert again.filename == "report.pdf"
    assert [doc.id for doc in storage.documents.list_documents()] == [first.id]


def test_document_fields_units_and_text(storage: Storage) -> None:
    pages = ["First page text.", "Second page\x00with a NUL."]
    extracted = make_document("Paper", pages, kind="pdf", metadata=FakeMetadata("Grace", "2024-01-02"))
    info, _ = storage.documents.add_document(extracted, "paper.pdf")
    assert (info.title, info.kind, info.page_count, info.size_bytes) == ("Paper", "pdf", 2, extracted.size)
    assert info.metadata == {"author": "Grace", "created": "2024-01-02"}
    assert info.token_count is None and info.created_at.tzinfo is not None
    text = storage.documents.get_text(info.id)
    assert len(text) == len(extracted.text) and "\x00" not in text
    units = storage.documents.get_units(info.id)
    assert [(u.number, u.label) for u in units] == [(1, "Page 1"), (2, "Page 2")]
    assert all(text[u.start : u.end] == u.text for u in units)
    updated = storage.documents.set_token_count(info.id, 1234, "qwen3-next-tok")
    assert (updated.token_count, updated.tokenizer_id) == (1234, "qwen3-next-tok")
    assert storage.documents.get_document(info.id) == updated
    assert storage.documents.get_by_sha256(extracted.sha256) == updated


def test_missing_documents(storage: Storage) -> None:
    assert storage.documents.get_document(999) is None
    assert storage.documents.get_units(999) == []
    assert storage.documents.delete_document(999) is False
    with pytest.raises(NotFoundError):
        storage.documents.get_text(999)


def test_list_is_newest_first(storage: Storage) -> None:
    ids = [storage.documents.add_document(make_document(f"D{i}", [f"text {i}"]), f"{i}.txt")[0].id for i in range(3)]
    assert [doc.id for doc in storage.documents.list_documents()] == ids[::-1]


def test_search_reports_document_unit_and_offsets(storage: Storage) -> None:
    first, _ = storage.documents.add_document(
        make_document("Alpha", ["The Quick fox.", "nothing here", "quick QUICK"]), "a.pdf"
    )
    second, _ = storage.documents.add_document(make_document("Beta", ["so quick"]), "b.pdf")
    hits = storage.documents.search("quick", limit=10)
    assert [(h.document_id, h.unit_number) for h in hits] == [
        (first.id, 1),
        (first.id, 3),
        (first.id, 3),
        (second.id, 1),
    ]
    text = storage.documents.get_text(first.id)
    for hit in hits[:3]:
        assert text[hit.char_offset : hit.char_offset + 5].lower() == "quick"
    assert hits[0].document_title == "Alpha" and hits[0].unit_label == "Page 1"
    assert "Quick fox" in hits[0].snippet
    assert len(storage.documents.search("quick", limit=2)) == 2
    only_second = storage.documents.search("quick", document_ids=[second.id])
    assert [(h.document_id, h.unit_char_offset) for h in only_second] == [(second.id, 3)]


def test_search_phrases_unicode_and_literal_wildcards(storage: Storage) -> None:
    info, _ = storage.documents.add_document(
        make_document("Mixed", ["a phrase broken\nacross lines", "Über große Straße", "100% sure, a_b"]),
        "m.md",
    )
    assert [h.unit_number for h in storage.documents.search("broken   across")] == [1]
    assert [h.unit_number for h in storage.documents.search("über")] == [2]
    assert [h.unit_number for h in storage.documents.search("100%")] == [3]
    assert storage.documents.search("1%0") == []
    assert storage.documents.search("a_b")[0].document_id == info.id
    assert storage.documents.search("a%b") == []
    assert storage.documents.search("   ") == []


def test_delete_cascades_to_units_and_checkpoints_but_keeps_chats(storage: Storage) -> None:
    doomed, _ = storage.documents.add_document(make_document("Doomed", ["p1", "p2"]), "doomed.pdf")
    kept, _ = storage.documents.add_document(make_document("Kept", ["k1"]), "kept.pdf")
    storage.blobs.put("only-doomed", "fp", 10, write_bytes(b"a" * 50), depends_on=[doomed.sha256])
    storage.blobs.put("both", "fp", 10, write_bytes(b"b" * 50), depends_on=[doomed.sha256, kept.sha256])
    storage.blobs.put("only-kept", "fp", 10, write_bytes(b"c" * 50), depends_on=[kept.sha256])
    doomed_files = [storage.blobs.info(key).path for key in ("only-doomed", "both")]
    chat = storage.chats.create_session("Reading", [doomed.id, kept.id])
    storage.chats.append_message(chat.id, "user", "What is in Doomed?")
    storage.chats.append_message(chat.id, "assistant", "Two pages.", citations=[{"doc": doomed.sha256}])

    assert storage.documents.delete_document(doomed.id) is True

    assert storage.documents.get_document(doomed.id) is None
    assert storage.documents.get_units(doomed.id) == []
    with storage.db.session(readonly=True) as session:
        assert session.scalar(select(func.count()).select_from(DocumentUnit)) == 1
        assert set(session.scalars(select(StateCheckpoint.key))) == {"only-kept"}
    assert not any(path.exists() for path in doomed_files)
    assert storage.blobs.get("only-kept", "fp") is not None
    assert [m.text for m in storage.chats.list_messages(chat.id)] == ["What is in Doomed?", "Two pages."]
    selection = storage.chats.get_documents(chat.id)
    assert [(e.document_id, e.title, e.removed) for e in selection] == [
        (None, "Doomed", True),
        (kept.id, "Kept", False),
    ]
    assert selection[0].display_title == "Doomed (removed)"
    assert selection[0].sha256 == doomed.sha256
    again, created = storage.documents.add_document(make_document("Doomed", ["p1", "p2"]), "doomed.pdf")
    assert created and again.id != doomed.id
