"""The state cache over both tiers: verified disk hits, crash-safe background writes, chained
turns that write only their own tokens, and a memory budget that counts shared K/V once."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from app.services import checkpoint_writer
from app.services.analysis import AnalysisService
from app.services.prompting import chain_keys, question_segment
from app.services.state_cache import StateCache, default_memory_budget
from app.settings import load_settings
from model import load_model
from model.checkpoint_file import save_checkpoint
from model.state import AttentionLayerState, LinearLayerState, ModelState, empty_kv
from storage.repository import Storage
from tests.test_analysis_service import add_documents, ask, new_session

ROOT = Path(__file__).resolve().parents[1]
FINGERPRINT = "f" * 64


@pytest.fixture(scope="module")
def lm(demo_checkpoint):
    return load_model(demo_checkpoint, dtype=torch.bfloat16)


@pytest.fixture()
def storage(tmp_path):
    store = Storage.open(tmp_path / "data")
    yield store
    store.close()


def service(lm, storage, cached=True, **kwargs) -> AnalysisService:
    return AnalysisService(lm, storage.documents, storage.chats, storage.summaries, storage.blobs if cached else None,
                           memory_budget_bytes=(1 << 30) if cached else 0, max_new_tokens=6, **kwargs)


def synthetic_state(tokens: int, seed: int = 0, layers: str = "LLAL", heads: int = 2, head_dim: int = 64,
                    context: int = 4096) -> ModelState:
    """A state of the model's layout with made-up contents (no weights needed)."""
    generator = torch.Generator().manual_seed(seed)
    built = []
    for kind in layers:
        if kind == "L":
            built.append(LinearLayerState(torch.randn(1, 96, 3, generator=generator).bfloat16(),
                                          torch.randn(1, 4, 16, 16, generator=generator)))
        else:
            built.append(empty_kv(1, heads, head_dim, torch.bfloat16, "cpu"))
    state = ModelState(built, FINGERPRINT)
    state.reserve(tokens, address_space=context)
    advance(state, tokens, seed)
    return state


def advance(state: ModelState, tokens: int, seed: int) -> None:
    """Write `tokens` made-up positions, as a forward pass would, and change the recurrent states."""
    generator = torch.Generator().manual_seed(seed + 1000)
    past = state.seen_tokens
    for layer in state.layers:
        if isinstance(layer, AttentionLayerState):
            layer.ensure_capacity(past + tokens)
            for tensor in (layer.key, layer.value):
                tensor[:, :, past:past + tokens] = torch.randn(tensor[:, :, past:past + tokens].shape,
                                                               generator=generator).bfloat16()
        else:
            layer.recurrent = layer.recurrent + 1
    state.seen_tokens = past + tokens


def same_state(a: ModelState, b: ModelState) -> bool:
    named_a, named_b = a.layer_tensors(), b.layer_tensors()
    return named_a.keys() == named_b.keys() and all(torch.equal(named_a[k], named_b[k]) for k in named_a)


def bare_cache(storage, budget=1 << 30) -> StateCache:
    return StateCache(SimpleNamespace(fingerprint=FINGERPRINT, device="cpu"), storage.blobs, budget)


def test_chained_turns_restore_exactly_and_write_only_their_own_tokens(storage):
    cache = bare_cache(storage)
    state = synthetic_state(1000)
    expected_doc = state.clone()
    cache.put("doc", state)
    advance(state, 70, seed=1)
    expected_turn1 = state.clone()
    cache.put("turn1", state)
    turn2 = cache.get("turn1")
    advance(turn2, 45, seed=2)
    expected_turn2 = turn2.clone()
    cache.put("turn2", turn2)
    assert cache.flush(60)
    infos = {c.key: c for c in storage.blobs.list_checkpoints()}
    assert [storage.blobs.open(k, FINGERPRINT).parent_key for k in ("doc", "turn1", "turn2")] == [None, "doc", "turn1"]
    per_token = 2 * 2 * 64 * 2  # one attention layer: K and V, 2 heads of 64 bf16
    linear = sum(t.numel() * t.element_size() for name, t in expected_turn2.layer_tensors().items()
                 if name.endswith(("conv", "recurrent")))
    slack = (4 * 2 + 2) * 4096  # a partial page at each end of its 4 regions; header and alignment
    assert infos["turn2"].size_bytes <= 45 * per_token + linear + slack
    assert infos["turn1"].size_bytes <= 70 * per_token + linear + slack
    assert infos["doc"].size_bytes >= 1000 * per_token + linear
    # A fresh cache (a restarted process) reads the chain from disk, verified.
    fresh = bare_cache(storage)
    for key, expected in (("turn2", expected_turn2), ("turn1", expected_turn1), ("doc", expected_doc)):
        restored = fresh.restore([key])
        assert restored.covered == 1 and restored.verified()
        assert same_state(restored.state, expected)


def test_memory_budget_counts_shared_kv_once_and_evicts_least_recent(storage):
    state = synthetic_state(512)
    doc = state.checkpoint()
    advance(state, 64, seed=3)
    turn = state.checkpoint()
    shared = sum(s.nbytes for s in doc.segments)
    own = turn.own_segment.nbytes
    budget = doc.linear_nbytes + turn.linear_nbytes + shared + own
    cache = StateCache(SimpleNamespace(fingerprint=FINGERPRINT, device="cpu"), None, budget)
    cache.put("doc", doc)
    cache.put("turn", turn)
    assert cache.stats().memory_bytes == budget and cache.stats().memory_entries == 2
    other = synthetic_state(64, seed=4).checkpoint()
    cache.put("other", other)
    stats = cache.stats()
    assert stats.memory_bytes <= budget
    assert cache.get("doc") is None and cache.get("other") is not None
    assert cache.get("big") is None
    # A checkpoint larger than the whole budget is not kept at all (nothing is evicted for it).
    cache.put("huge", synthetic_state(4000, seed=5).checkpoint())
    assert cache.get("huge") is None and cache.get("other") is not None


def test_default_memory_tier_follows_available_memory():
    budget = default_memory_budget()
    meminfo = Path("/proc/meminfo").read_text().splitlines()
    available = next(int(line.split()[1]) * 1024 for line in meminfo if line.startswith("MemAvailable"))
    assert 0 < budget <= available
    assert StateCache(SimpleNamespace(fingerprint=FINGERPRINT), None, None).budget > 0
    assert load_settings({"DOCANALYST_DATA_DIR": "/nonexistent"}).memory_cache_mb == -1
    assert StateCache(SimpleNamespace(fingerprint=FINGERPRINT), None, -1 << 20).budget > 0


def test_failed_background_write_leaves_nothing_usable(storage, monkeypatch):
    def half_then_fail(checkpoint, path, base_tokens=0):
        save_checkpoint(checkpoint, path, base_tokens)
        with open(path, "r+b") as handle:
            handle.truncate(os.path.getsize(path) // 2)
        raise RuntimeError("device lost mid-write")

    monkeypatch.setattr(checkpoint_writer, "save_checkpoint", half_then_fail)
    cache = bare_cache(storage)
    state = synthetic_state(300)
    expected = state.clone()
    cache.put("doc", state)
    assert same_state(cache.get("doc"), expected)  # the memory tier has it at once
    assert cache.flush(60)
    assert storage.blobs.stats().count == 0 and list(storage.blobs.folder.glob("*")) == []
    assert bare_cache(storage).get("doc") is None
    monkeypatch.undo()
    cache.put("doc", state)  # the writer keeps working after a failure
    assert cache.flush(60) and same_state(bare_cache(storage).get("doc"), expected)


KILLED_WRITER = """
import sys, time
sys.path.insert(0, sys.argv[1])
from pathlib import Path
from app.services import checkpoint_writer
from model.checkpoint_file import save_checkpoint
from storage.repository import Storage
from tests.test_state_cache import bare_cache, synthetic_state

def slow(checkpoint, path, base_tokens=0):
    save_checkpoint(checkpoint, path, base_tokens)
    with open(path, "r+b") as handle:
        handle.truncate(handle.seek(0, 2) // 2)
    Path(sys.argv[3]).touch()
    time.sleep(600)

checkpoint_writer.save_checkpoint = slow
storage = Storage.open(sys.argv[2])
cache = bare_cache(storage)
cache.put("doc", synthetic_state(300))
cache.flush()
"""


def test_process_killed_mid_write_leaves_no_checkpoint(tmp_path):
    data, marker = tmp_path / "data", tmp_path / "writing"
    child = subprocess.Popen([sys.executable, "-c", KILLED_WRITER, str(ROOT), str(data), str(marker)], cwd=ROOT)
    try:
        deadline = time.monotonic() + 120
        while not marker.exists() and child.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert marker.exists(), "the child never started writing"
        os.kill(child.pid, signal.SIGKILL)
    finally:
        child.wait(30)
    storage = Storage.open(data)
    try:
        leftovers = list(storage.blobs.folder.iterdir())
        assert leftovers and all(p.name.startswith(".writing-") for p in leftovers)
        assert storage.blobs.stats().count == 0 and bare_cache(storage).get("doc") is None
        assert storage.blobs.sweep(min_age_s=0) == len(leftovers)
    finally:
        storage.close()


def test_damaged_block_is_detected_and_the_answer_recomputed(lm, storage):
    storage.blobs.block_size = 4096
    doc_ids = add_documents(storage)
    first = ask(service(lm, storage), storage, new_session(storage, doc_ids), "What are the figures?")
    expected = ask(service(lm, storage, cached=False), storage, new_session(storage, doc_ids),
                   "What are the figures?")
    assert first.text == expected.text
    writer = checkpoint_writer.writer_for(storage.blobs)
    assert writer.flush(120)
    # Damage one K/V block (past the header and recurrent states) of every checkpoint file.
    for info in storage.blobs.list_checkpoints():
        data = bytearray(info.path.read_bytes())
        data[-100] ^= 0x40
        info.path.write_bytes(bytes(data))
    fresh = service(lm, storage)
    again = ask(fresh, storage, new_session(storage, doc_ids), "What are the figures?")
    assert again.text == expected.text
    assert again.stats.cached_tokens == 0
    question = len(question_segment(lm.tokenizer, "What are the figures?").ids)
    assert again.stats.prefill_tokens > question
    assert fresh.cache_stats().memory_entries > 0  # recomputed states replaced the bad ones


def test_follow_up_after_restart_reads_the_turn_chain_from_disk(lm, storage):
    doc_ids = add_documents(storage)
    session = new_session(storage, doc_ids)
    svc = service(lm, storage)
    ask(svc, storage, session, "When is payment due?")
    ask(svc, storage, session, "And the dividend?")
    assert svc.cache.flush(120)
    segments = svc._conversation_segments(session)[1]  # system, 2 documents, then 2 x (question, answer)
    keys = chain_keys(lm.fingerprint, segments)
    turn1, turn2 = storage.blobs.open(keys[4], lm.fingerprint), storage.blobs.open(keys[6], lm.fingerprint)
    assert (turn1.parent_key, turn2.parent_key) == (keys[2], keys[4])
    # The second turn's file holds its question and answer's K/V and the recurrent states only.
    cfg = lm.config
    state = lm.new_state()
    attention = sum(isinstance(layer, AttentionLayerState) for layer in state.layers)
    per_token = attention * 2 * cfg.num_key_value_heads * cfg.head_dim * 2
    linear = sum(t.numel() * t.element_size() for name, t in state.layer_tensors().items()
                 if name.endswith(("conv", "recurrent")))
    slack = (attention * 2 * cfg.num_key_value_heads * 2 + 2) * 4096
    turn_tokens = len(segments[5].ids) + len(segments[6].ids)
    assert turn2.size <= turn_tokens * per_token + linear + slack

    restarted = service(lm, storage)
    follow = ask(restarted, storage, session, "Which month?")
    assert follow.stats.prefill_tokens == len(question_segment(lm.tokenizer, "Which month?").ids)
    scratch_session = new_session(storage, doc_ids)
    scratch = service(lm, storage, cached=False)
    for question in ("When is payment due?", "And the dividend?"):
        ask(scratch, storage, scratch_session, question)
    assert follow.text == ask(scratch, storage, scratch_session, "Which month?").text
