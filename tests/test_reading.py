"""Reading documents ahead: an added document is read into the state cache in the background,
answers go before reads, a read that gave way resumes where it stopped, and READ_AHEAD=0 turns it off."""

from __future__ import annotations

import threading
import uuid

import pytest
import torch

from app.services import reading as reading_module
from app.services.prompting import chain_keys, question_segment, system_segment
from model import prefill
from tests.conftest import app_services

WAIT_S = 120.0
CHUNK = 32


@pytest.fixture(scope="module")
def chunked(demo_checkpoint, tmp_path_factory):
    """Services whose prefill runs in small chunks, so a read has many chunk boundaries to stop at."""
    yield from app_services(demo_checkpoint, tmp_path_factory, PREFILL_CHUNK=str(CHUNK))


@pytest.fixture(scope="module")
def no_read_ahead(demo_checkpoint, tmp_path_factory):
    yield from app_services(demo_checkpoint, tmp_path_factory, READ_AHEAD="0")


def document_text(words: int = 40) -> str:
    marker = uuid.uuid4().hex[:8]
    return f"Lease {marker}. " + " ".join(f"The tenant pays rent number {i} on time." for i in range(words))


def upload(services, text: str):
    """Through the upload queue, as the Library page does."""
    job = services.library.submit(text.encode(), f"{uuid.uuid4().hex[:8]}.txt")
    result = services.library.queue.wait(job, WAIT_S).result
    assert result.status == "added", result.message
    return result.document


def document_keys(services, document_id: int) -> list[str]:
    analysis = services.analysis
    segments = [system_segment(analysis.tokenizer), analysis.document_segment(document_id)]
    return chain_keys(analysis.lm.fingerprint, segments)


def ask(services, document_ids: list[int], question: str, log: list | None = None):
    chat = services.sessions.create_session("Read ahead", document_ids)

    def start(progress, cancel):
        def heard(p):
            if log is not None:
                log.append(("answer", p.done))
            progress(p)

        return services.analysis.ask(chat.id, question, progress=heard, cancel=cancel)

    return services.jobs.start(f"ask:{chat.id}", start, label=question)


def test_an_added_document_is_read_ahead_and_the_first_question_prefills_only_itself(services):
    document = upload(services, document_text())
    read = services.reading.wait(document.id, WAIT_S)
    assert read.state == "done" and read.total > 0 and read.done == read.total and read.eta_s is None
    question = "When is the rent due?"
    job = ask(services, [document.id], question)
    assert job.wait(WAIT_S)
    snap = job.snapshot()
    assert snap.error is None and snap.message.status == "complete"
    analysis = services.analysis
    prompt = len(system_segment(analysis.tokenizer).ids) + len(analysis.document_segment(document.id).ids)
    assert snap.message.stats.prefill_tokens == len(question_segment(analysis.tokenizer, question).ids)
    assert snap.message.stats.cached_tokens == prompt


def test_an_answer_goes_before_a_running_read_which_resumes_where_it_stopped(chunked, monkeypatch):
    services = chunked
    small = services.library.add(b"A short note about the heating.", "note.txt").document
    services.reading.wait(small.id, WAIT_S)
    log: list[tuple[str, int]] = []
    reached, answer_waiting = threading.Event(), threading.Event()
    real_prefill = reading_module.prefill

    def gated_prefill(lm, state, ids, *, progress, **kwargs):
        def heard(p):
            log.append(("read", p.done))
            progress(p)
            if len(ids) > 4 * CHUNK and p.done >= 2 * CHUNK and not reached.is_set():
                reached.set()  # two chunks into the document: hold here until an answer waits
                assert answer_waiting.wait(WAIT_S)

        return real_prefill(lm, state, ids, progress=heard, **kwargs)

    monkeypatch.setattr(reading_module, "prefill", gated_prefill)
    document = upload(services, document_text(words=60))
    assert reached.wait(WAIT_S)
    job = ask(services, [small.id], "Who repairs the heating?", log)
    while services.analysis.queue.queued < 1:
        threading.Event().wait(0.01)
    assert job.snapshot().position == 1
    answer_waiting.set()
    assert job.wait(WAIT_S) and job.snapshot().error is None
    read = services.reading.wait(document.id, WAIT_S)
    assert read.state == "done" and read.yields == 1

    # The read stopped at the next chunk boundary, the answer ran, then the read went on from there.
    first_answer = log.index(next(e for e in log if e[0] == "answer"))
    before = [done for who, done in log[:first_answer] if who == "read"]
    after = [done for who, done in log[first_answer:] if who == "read"]
    assert before[-1] == 2 * CHUNK and after[0] == CHUNK  # the resumed call counts from where it stopped
    assert log[-1][0] == "read"

    # ...and the state it cached is bit for bit the state of one uninterrupted read.
    analysis = services.analysis
    cached = analysis.cache.get(document_keys(services, document.id)[-1])
    fresh = analysis.lm.new_state()
    prefill(analysis.lm, fresh, system_segment(analysis.tokenizer).ids, chunk_size=CHUNK)
    prefill(analysis.lm, fresh, analysis.document_segment(document.id).ids, chunk_size=CHUNK)
    expected = fresh.layer_tensors()
    assert cached.seen_tokens == fresh.seen_tokens
    for name, tensor in cached.layer_tensors().items():
        assert torch.equal(tensor, expected[name]), name


def test_a_read_stops_when_an_answer_has_read_its_document_meanwhile(chunked, monkeypatch):
    services = chunked
    log: list[tuple[str, int]] = []
    reached, answer_waiting = threading.Event(), threading.Event()
    real_prefill = reading_module.prefill

    def gated_prefill(lm, state, ids, *, progress, **kwargs):
        def heard(p):
            log.append(("read", p.done))
            progress(p)
            if len(ids) > 4 * CHUNK and p.done >= CHUNK and not reached.is_set():
                reached.set()
                assert answer_waiting.wait(WAIT_S)

        return real_prefill(lm, state, ids, progress=heard, **kwargs)

    monkeypatch.setattr(reading_module, "prefill", gated_prefill)
    document = upload(services, document_text(words=40))
    assert reached.wait(WAIT_S)
    job = ask(services, [document.id], "What is paid?", log)  # the same document: the answer reads it itself
    while services.analysis.queue.queued < 1:
        threading.Event().wait(0.01)
    answer_waiting.set()
    assert job.wait(WAIT_S) and job.snapshot().error is None
    read = services.reading.wait(document.id, WAIT_S)
    assert read.state == "done" and read.yields == 1 and read.done == read.total
    first_answer = log.index(next(e for e in log if e[0] == "answer"))
    assert not [e for e in log[first_answer:] if e[0] == "read"]  # nothing read twice


def test_a_waiting_answer_goes_before_a_waiting_read(chunked, monkeypatch):
    services = chunked
    small = services.library.add(b"Another short note, about the garden.", "garden.txt").document
    services.reading.wait(small.id, WAIT_S)
    log: list[tuple[str, int]] = []
    real_prefill = reading_module.prefill

    def logged_prefill(lm, state, ids, *, progress, **kwargs):
        return real_prefill(lm, state, ids, progress=lambda p: (log.append(("read", p.done)), progress(p)), **kwargs)

    monkeypatch.setattr(reading_module, "prefill", logged_prefill)
    queue = services.analysis.queue
    with queue.turn():  # the model is busy: both have to wait
        document = upload(services, document_text(words=10))
        while queue.queued < 1:
            threading.Event().wait(0.01)
        job = ask(services, [small.id], "Who looks after the garden?", log)
        while queue.queued < 2:
            threading.Event().wait(0.01)
        assert job.snapshot().position == 1
        assert services.reading.status(document.id).state == "queued"
    assert job.wait(WAIT_S) and job.snapshot().error is None
    read = services.reading.wait(document.id, WAIT_S)
    assert read.state == "done" and read.yields == 0
    who = [w for w, _ in log]
    assert "answer" in who and "read" in who
    assert who.index("read") > max(i for i, w in enumerate(who) if w == "answer")


def test_read_ahead_off_reads_nothing_until_asked(no_read_ahead):
    services = no_read_ahead
    assert services.reading is None
    document = upload(services, document_text(words=10))
    assert services.analysis.cache.get(document_keys(services, document.id)[-1]) is None
    job = ask(services, [document.id], "What is this?")
    assert job.wait(WAIT_S)
    stats = job.snapshot().message.stats
    analysis = services.analysis
    prompt = [system_segment(analysis.tokenizer), analysis.document_segment(document.id),
              question_segment(analysis.tokenizer, "What is this?")]
    assert stats.cached_tokens == 0 and stats.prefill_tokens == sum(len(s.ids) for s in prompt)


def test_a_document_removed_before_its_read_is_not_read(chunked):
    services = chunked
    queue = services.analysis.queue
    with queue.turn():
        document = upload(services, document_text(words=5))
        services.reading.cancel(document.id)
    status = services.reading.wait(document.id, WAIT_S)
    assert status.state == "cancelled"
    assert services.analysis.cache.get(document_keys(services, document.id)[-1]) is None
