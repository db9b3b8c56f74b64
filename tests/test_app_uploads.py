"""The upload queue: a fixed number of files read at once, the rest waiting in order with positions."""

from __future__ import annotations

import threading
from types import SimpleNamespace

import pytest

from app.services.library import Library
from app.services.uploads import UploadQueue
from tests.test_storage_support import BACKENDS, backend_for

WAIT_S = 10.0


class GatedReader:
    """A reader that reports progress and then blocks until the test releases that file."""

    def __init__(self) -> None:
        self.started: dict[str, threading.Event] = {}
        self.release: dict[str, threading.Event] = {}
        self.lock = threading.Lock()
        self.running = 0
        self.most_at_once = 0

    def gate(self, name: str) -> None:
        self.started[name] = threading.Event()
        self.release[name] = threading.Event()

    def __call__(self, data: bytes, filename: str, progress) -> str:
        with self.lock:
            self.running += 1
            self.most_at_once = max(self.most_at_once, self.running)
        progress(SimpleNamespace(phase="ocr", done=1, total=4))
        self.started[filename].set()
        self.release[filename].wait(WAIT_S)
        with self.lock:
            self.running -= 1
        return f"read {filename}"


def test_two_at_once_and_the_rest_wait_in_order() -> None:
    reader = GatedReader()
    names = [f"f{i}.pdf" for i in range(5)]
    for name in names:
        reader.gate(name)
    queue = UploadQueue(reader, workers=2)
    ids = [queue.submit(b"x", name) for name in names]
    assert reader.started["f0.pdf"].wait(WAIT_S) and reader.started["f1.pdf"].wait(WAIT_S)
    statuses = [queue.status(i) for i in ids]
    assert [s.state for s in statuses] == ["reading", "reading", "queued", "queued", "queued"]
    assert [s.position for s in statuses] == [None, None, 1, 2, 3]
    assert (statuses[0].phase, statuses[0].done, statuses[0].total) == ("ocr", 1, 4)
    assert [s.filename for s in queue.running()] == names

    reader.release["f1.pdf"].set()
    assert queue.wait(ids[1], WAIT_S).result == "read f1.pdf"
    assert reader.started["f2.pdf"].wait(WAIT_S)
    assert [queue.status(i).position for i in ids[3:]] == [1, 2]

    for name in names:
        reader.release[name].set()
    assert [queue.wait(i, WAIT_S).result for i in ids] == [f"read {n}" for n in names]
    assert reader.most_at_once == 2
    assert queue.running() == []


def test_workers_must_be_positive() -> None:
    with pytest.raises(ValueError):
        UploadQueue(lambda *_: None, workers=0)


@pytest.fixture(params=BACKENDS[:1])
def storage(request, tmp_path):
    from storage.repository import Storage

    for backend in backend_for(request.param, tmp_path):
        store = Storage.open(backend.data_dir, backend.url)
        yield store
        store.db.dispose()


def test_library_queues_uploads_and_reports_duplicates_at_once(storage) -> None:
    library = Library(storage.documents, workers=1)
    first = library.submit(b"The rent is due on the first day of the month.", "lease.txt")
    result = library.queue.wait(first, WAIT_S).result
    assert result.status == "added" and result.document.title
    again = library.status(library.submit(b"The rent is due on the first day of the month.", "copy.txt"))
    assert again.state == "done" and again.result.status == "duplicate"
    bad = library.queue.wait(library.submit(b"%PDF-1.4 not a pdf", "bad.pdf"), WAIT_S).result
    assert bad.status == "failed" and bad.message
    assert [d.filename for d in storage.documents.list_documents()] == ["lease.txt"]


def test_a_failure_outside_reading_is_reported_not_lost(storage, monkeypatch) -> None:
    library = Library(storage.documents, workers=1)

    def broken_store(*_args, **_kwargs):
        raise RuntimeError("disk unplugged")

    monkeypatch.setattr(storage.documents, "add_document", broken_store)
    result = library.queue.wait(library.submit(b"Some text to keep.", "note.txt"), WAIT_S).result
    assert result.status == "failed" and "could not be added" in result.message


def test_the_first_of_two_identical_files_is_the_one_added(storage, monkeypatch) -> None:
    import app.services.library as library_module

    real_extract = library_module.extract

    def slow_for_the_first(data, filename, **kwargs):
        if filename == "first.txt":
            threading.Event().wait(0.5)
        return real_extract(data, filename, **kwargs)

    monkeypatch.setattr(library_module, "extract", slow_for_the_first)
    library = Library(storage.documents, workers=2)
    text = b"Clause 4: the deposit is returned within 30 days."
    first, second = library.submit(text, "first.txt"), library.submit(text, "second.txt")
    assert library.queue.wait(first, WAIT_S).result.status == "added"
    assert library.queue.wait(second, WAIT_S).result.status == "duplicate"
    assert [d.filename for d in storage.documents.list_documents()] == ["first.txt"]
