"""Upload handling of the library: one result per file, duplicates, bad files, token counting."""

from __future__ import annotations

import pytest

from app.services.library import Library, group_hits
from storage import Storage


@pytest.fixture
def storage(tmp_path):
    opened = Storage.open(tmp_path)
    yield opened
    opened.close()


def test_each_file_gets_its_own_result(storage):
    library = Library(storage.documents, count_tokens=lambda text: len(text.split()), tokenizer_id="words")
    results = library.add_many([
        ("a.txt", b"First document about rent."),
        ("b.pdf", b"%PDF-1.4 truncated"),
        ("a-again.txt", b"First document about rent."),
        ("empty.txt", b"   "),
    ])
    assert [r.status for r in results] == ["added", "failed", "duplicate", "failed"]
    added = results[0].document
    assert added is not None and added.token_count == 4 and added.tokenizer_id == "words"
    assert results[2].document == added and results[2].message == "Already in the library."
    assert results[1].message and results[3].message == "The file is empty."
    assert [d.filename for d in storage.documents.list_documents()] == ["a.txt"]


def test_a_failing_token_counter_does_not_block_the_upload(storage):
    def broken(text: str) -> int:
        raise RuntimeError("tokenizer missing")

    result = Library(storage.documents, count_tokens=broken, tokenizer_id="x").add(b"Some text.", "t.txt")
    assert result.status == "added"
    assert result.document.token_count is None and result.document.tokenizer_id is None


def test_the_upload_limit_is_applied(storage):
    result = Library(storage.documents, max_bytes=10).add(b"x" * 100, "big.txt")
    assert result.status == "failed" and "upload limit" in result.message


def test_search_groups_hits_by_document_and_page(storage):
    library = Library(storage.documents)
    first = library.add(b"# One\n\nrent here\n\n# Two\n\nrent and rent again", "a.md").document
    second = library.add(b"the rent is due", "b.txt").document
    groups = library.search("rent")
    assert [g.document_id for g in groups] == [first.id, second.id]
    assert {page: len(hits) for page, hits in groups[0].pages.items()} == {1: 1, 2: 2}
    assert groups[0].count == 3 and groups[1].count == 1
    assert group_hits([]) == []
