"""Answers from cached document states draft with MTP K/V that cover the documents."""

from __future__ import annotations

import pytest
import torch

import app.services.analysis as analysis
from model import load_model
from model.mtp import state_mtp
from model.speculative import SpeculativeGeneration
from storage.repository import Storage
from tests.test_analysis_service import add_documents, ask, new_session, service


@pytest.fixture(scope="module")
def lm(demo_checkpoint):
    return load_model(demo_checkpoint, dtype=torch.float32)


@pytest.fixture()
def storage(tmp_path):
    store = Storage.open(tmp_path / "data")
    yield store
    store.close()


@pytest.fixture()
def mtp_at_answer(monkeypatch):
    """Records, for each answer, the MTP cache of the state handed to the generation:
    (first entry, entries, the state's seen tokens, whether the cache is in step)."""
    seen = []

    class Recording(SpeculativeGeneration):
        def __init__(self, model, state, *args, **kwargs):
            cache = state_mtp(model, state)
            seen.append((cache.first_position, cache.length, state.seen_tokens, cache.in_step(state.seen_tokens)))
            super().__init__(model, state, *args, **kwargs)

    monkeypatch.setattr(analysis, "SpeculativeGeneration", Recording)
    return seen


def test_follow_up_from_a_cached_state_drafts_over_the_documents(lm, storage, mtp_at_answer):
    doc_ids = add_documents(storage)
    cached = service(lm, storage, draft_tokens=2)
    session = new_session(storage, doc_ids)
    ask(cached, storage, session, "When is payment due?")
    follow = ask(cached, storage, session, "And the dividend?")
    assert follow.stats.cached_tokens > 0
    first, length, seen, in_step = mtp_at_answer[-1]
    # Every pair since the first token is in, the last position's hidden is pending.
    assert in_step and first == 0 and length == seen - 1
    assert seen > follow.stats.cached_tokens
