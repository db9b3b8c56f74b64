"""Cached document states: answers from restored checkpoints equal answers from scratch."""

from __future__ import annotations

import threading

import pytest
import torch

from app.services.analysis import AnalysisService, ContextTooLong
from app.services.prompting import chain_keys, question_segment, system_segment
from kernels.attention import native as attention_native
from kernels.linear import native as linear_native
from model import load_model
from storage.repository import Storage

PAGES = {
    "Supply agreement": ["The supplier delivers 500 units every month.", "Payment is due within 30 days of invoice."],
    "Annual report": ["Revenue grew by 12 percent in 2025.", "The board approved a dividend of 2 euros."],
}


class Extracted:
    """A minimal extracted document, as ingest returns it."""

    def __init__(self, title: str, pages: list[str]):
        self.title, self.kind = title, "pdf"
        self.units, self.text = _units(pages)
        self.sha256 = title.encode().hex().ljust(64, "0")[:64]
        self.size, self.metadata = len(self.text), {}


def _units(pages):
    from types import SimpleNamespace

    units, text, offset = [], "", 0
    for number, page in enumerate(pages, start=1):
        if text:
            text += "\n\n"
            offset += 2
        units.append(SimpleNamespace(number=number, label=f"page {number}", text=page, start=offset,
                                     end=offset + len(page)))
        text += page
        offset += len(page)
    return tuple(units), text


@pytest.fixture(scope="module", params=[torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def lm(request, demo_checkpoint):
    return load_model(demo_checkpoint, dtype=request.param)


@pytest.fixture()
def storage(tmp_path):
    store = Storage.open(tmp_path / "data")
    yield store
    store.close()


def service(lm, storage, cached: bool = True, **kwargs) -> AnalysisService:
    return AnalysisService(lm, storage.documents, storage.chats, storage.summaries,
                           storage.blobs if cached else None,
                           memory_budget_bytes=(1 << 30) if cached else 0, max_new_tokens=6, **kwargs)


def add_documents(storage) -> list[int]:
    ids = []
    for title, pages in PAGES.items():
        info, _ = storage.documents.add_document(Extracted(title, pages), f"{title}.pdf")
        ids.append(info.id)
    return ids


def ask(svc, storage, session_id, question):
    events = list(svc.ask(session_id, question))
    done = events[-1]
    assert done.kind == "done"
    return done.message


def new_session(storage, doc_ids):
    session = storage.chats.create_session("chat", doc_ids)
    return session.id


def test_follow_up_and_new_session_reuse_cache_with_identical_answers(lm, storage):
    doc_ids = add_documents(storage)
    cached, scratch = service(lm, storage), service(lm, storage, cached=False)

    session = new_session(storage, doc_ids)
    first = ask(cached, storage, session, "When is payment due?")
    follow = ask(cached, storage, session, "And the dividend?")
    assert first.stats.cached_tokens == 0
    # (a) the follow-up restores the state after the first turn: it prefills only its question.
    question_tokens = len(question_segment(lm.tokenizer, "And the dividend?").ids)
    assert follow.stats.prefill_tokens == question_tokens
    assert follow.stats.cached_tokens > 0

    reference = new_session(storage, doc_ids)
    assert ask(scratch, storage, reference, "When is payment due?").text == first.text
    assert ask(scratch, storage, reference, "And the dividend?").text == follow.text

    # (b) a new chat session on the same documents starts from the documents' checkpoint.
    other = new_session(storage, doc_ids)
    again = ask(cached, storage, other, "When is payment due?")
    assert again.text == first.text
    assert again.stats.prefill_tokens == len(question_segment(lm.tokenizer, "When is payment due?").ids)


def test_different_document_order_is_a_miss_not_a_wrong_hit(lm, storage):
    doc_ids = add_documents(storage)
    cached, scratch = service(lm, storage), service(lm, storage, cached=False)
    ask(cached, storage, new_session(storage, doc_ids), "Summarise.")
    reversed_ids = list(reversed(doc_ids))
    swapped = ask(cached, storage, new_session(storage, reversed_ids), "Summarise.")
    # Only the system prompt is shared with the earlier order.
    assert swapped.stats.cached_tokens == len(system_segment(lm.tokenizer).ids)
    assert ask(scratch, storage, new_session(storage, reversed_ids), "Summarise.").text == swapped.text


def test_disk_tier_survives_restart_and_corrupt_blobs_are_recomputed(lm, storage):
    doc_ids = add_documents(storage)
    first_service = service(lm, storage)
    session = new_session(storage, doc_ids)
    first = ask(first_service, storage, session, "What are the figures?")

    # (d) a new process: empty memory tier, same disk store.
    restarted = service(lm, storage)
    again = ask(restarted, storage, new_session(storage, doc_ids), "What are the figures?")
    assert again.stats.cached_tokens > 0 and again.text == first.text

    # (e) corrupt every blob: answers are recomputed, identical, and nothing crashes.
    for info in storage.blobs.list_checkpoints():
        data = bytearray(info.path.read_bytes())
        data[len(data) // 2] ^= 0xFF
        info.path.write_bytes(bytes(data))
    fresh = service(lm, storage)
    recomputed = ask(fresh, storage, new_session(storage, doc_ids), "What are the figures?")
    assert recomputed.stats.cached_tokens == 0
    assert recomputed.text == first.text


def test_context_limit_refuses_before_prefill(lm, storage):
    doc_ids = add_documents(storage)
    svc = service(lm, storage, context_limit=50)
    session = new_session(storage, doc_ids)
    with pytest.raises(ContextTooLong, match="tokens"):
        list(svc.ask(session, "Too long?"))
    assert storage.chats.list_messages(session) == []


def test_cancelled_answer_is_saved_with_its_status(lm, storage):
    doc_ids = add_documents(storage)
    svc = service(lm, storage)
    cancel = threading.Event()
    cancel.set()
    session = new_session(storage, doc_ids)
    events = list(svc.ask(session, "Stop now", cancel=cancel))
    assert events[-1].message.status == "cancelled"
    roles = [m.role for m in storage.chats.list_messages(session)]
    assert roles == ["user", "assistant"]


def test_summary_uses_document_checkpoints(lm, storage):
    doc_ids = add_documents(storage)
    svc = service(lm, storage)
    ask(svc, storage, new_session(storage, doc_ids), "Warm the cache")
    events = list(svc.summarize(doc_ids))
    summary = events[-1].summary
    assert summary is not None and [d.title for d in summary.documents] == list(PAGES)
    keys = chain_keys(lm.fingerprint, [system_segment(lm.tokenizer)])
    assert svc.cache.get(keys[0]) is not None


def test_reused_document_id_never_serves_the_old_text(lm, storage):
    svc = service(lm, storage)
    first, _ = storage.documents.add_document(Extracted("Short memo", ["Tiny."]), "memo.pdf")
    short = svc.selection_tokens([first.id])
    storage.documents.delete_document(first.id)
    second, _ = storage.documents.add_document(Extracted("Long memo", ["Much longer text. " * 50]), "long.pdf")
    assert svc.selection_tokens([second.id]) > short


def test_speculative_decoding_gives_the_same_answer(lm, storage):
    if lm.dtype == torch.bfloat16 and (linear_native.kernel() is None or attention_native.kernel() is None):
        pytest.skip("bf16 verification rounds like decode steps only with the native kernels")
    doc_ids = add_documents(storage)
    plain = ask(service(lm, storage, cached=False), storage, new_session(storage, doc_ids), "Any penalties?")
    fast = ask(service(lm, storage, cached=False, draft_tokens=2), storage, new_session(storage, doc_ids),
               "Any penalties?")
    assert fast.text == plain.text


def test_crash_mid_answer_keeps_the_session_and_earlier_answers(lm, storage, monkeypatch):
    doc_ids = add_documents(storage)
    svc = service(lm, storage)
    session = new_session(storage, doc_ids)
    earlier = ask(svc, storage, session, "First question")
    calls = {"n": 0}
    real_forward = lm.forward

    def failing_forward(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] > 3:
            raise RuntimeError("device lost")
        return real_forward(*args, **kwargs)

    monkeypatch.setattr(lm, "forward", failing_forward)
    with pytest.raises(RuntimeError, match="device lost"):
        list(svc.ask(session, "Second question"))
    monkeypatch.undo()
    messages = storage.chats.list_messages(session)
    assert [(m.role, m.status) for m in messages] == [
        ("user", "complete"), ("assistant", "complete"), ("user", "complete"), ("assistant", "error"),
    ]
    assert messages[1].text == earlier.text
    # The service still works afterwards, from its cache.
    assert ask(svc, storage, session, "Third question").status == "complete"


def test_concurrent_requests_do_not_share_state(lm, storage):
    doc_ids = add_documents(storage)
    svc = service(lm, storage)
    sessions = [new_session(storage, doc_ids) for _ in range(3)]
    questions = ["Who pays?", "When is delivery?", "What is the revenue?"]
    expected = [ask(service(lm, storage, cached=False), storage, new_session(storage, doc_ids), q).text
                for q in questions]
    results = [None] * 3

    def run(index):
        results[index] = ask(svc, storage, sessions[index], questions[index]).text

    threads = [threading.Thread(target=run, args=(i,)) for i in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert results == expected
