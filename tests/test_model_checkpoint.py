"""Checkpoints fork states that compute exactly what a state computed from scratch computes.

Every comparison is exact: a fork must run the very same operations on the very same bits as a
state that read the same tokens in the same chunks.
"""

from __future__ import annotations

import pytest
import torch

from model import Generation, GenerationSettings, StateError, load_model, prefill
from model.checkpoint_file import open_checkpoint, save_checkpoint
from model.kv_memory import PAGE, mapping_supported

CHUNK = 16


@pytest.fixture(scope="module", params=[torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def lm(request, demo_checkpoint):
    return load_model(demo_checkpoint, dtype=request.param)


def ids(lm, length: int, seed: int) -> list[int]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, lm.config.vocab_size, (length,), generator=generator).tolist()


def read(lm, state, *pieces: list[int]) -> torch.Tensor:
    """Prefill each piece in turn (pieces are the prompt's segments); last logits `[vocab]`."""
    logits = None
    for piece in pieces:
        logits = prefill(lm, state, piece, chunk_size=CHUNK)
    return logits


def kv_bytes(checkpoint) -> list[torch.Tensor]:
    """Copies of a checkpoint's live K/V, to see that nothing ever writes into it."""
    used = checkpoint.seen_tokens
    return [t[:, :, :used].clone() for m in checkpoint.kv_layers() for t in (m.key, m.value)]


def test_fork_continues_exactly_like_a_state_read_from_scratch(lm):
    document, question = ids(lm, 70, 1), ids(lm, 13, 2)
    expected = read(lm, lm.new_state(), document, question)
    state = lm.new_state()
    read(lm, state, document)
    checkpoint = state.checkpoint()
    assert torch.equal(read(lm, checkpoint.fork(), question), expected)
    # The state the checkpoint was taken from continues on the checkpoint's pages, unchanged.
    assert torch.equal(read(lm, state, question), expected)


def test_answers_from_a_fork_are_token_identical(lm):
    tok = lm.tokenizer
    document = tok.turn("system", "You are helpful.") + tok.turn("user", "Payment is due within 30 days.")
    question = tok.turn("user", "When is payment due?")
    settings = GenerationSettings(max_new_tokens=12)
    scratch = lm.new_state()
    read(lm, scratch, document)
    expected = Generation(lm, scratch, question + tok.generation_prompt(), settings).run().token_ids
    state = lm.new_state()
    read(lm, state, document)
    fork = state.checkpoint().fork()
    assert Generation(lm, fork, question + tok.generation_prompt(), settings).run().token_ids == expected


def test_concurrent_forks_do_not_interfere(lm):
    document, first, second = ids(lm, 90, 3), ids(lm, 40, 4), ids(lm, 25, 5)
    state = lm.new_state()
    read(lm, state, document)
    checkpoint = state.checkpoint()
    before = kv_bytes(checkpoint)
    a, b = checkpoint.fork(), checkpoint.fork()
    # Interleave the two forks' writes, including into the page the checkpoint ends in.
    got_a1, got_b1 = read(lm, a, first[:5]), read(lm, b, second[:9])
    got_a2, got_b2 = read(lm, a, first[5:]), read(lm, b, second[9:])
    assert torch.equal(got_a2, read(lm, _scratch(lm, document, first[:5]), first[5:]))
    assert torch.equal(got_b2, read(lm, _scratch(lm, document, second[:9]), second[9:]))
    assert torch.equal(got_a1, read(lm, lm.new_state(), document, first[:5]))
    assert torch.equal(got_b1, read(lm, lm.new_state(), document, second[:9]))
    after = kv_bytes(checkpoint)
    assert all(torch.equal(x, y) for x, y in zip(before, after, strict=True))
    assert checkpoint.seen_tokens == 90 and a.seen_tokens == 130 and b.seen_tokens == 115


def _scratch(lm, *pieces):
    state = lm.new_state()
    read(lm, state, *pieces)
    return state


def test_chained_checkpoints_store_only_their_own_positions(lm, tmp_path):
    document, turn1, turn2, follow = ids(lm, 100, 6), ids(lm, 30, 7), ids(lm, 33, 8), ids(lm, 7, 9)
    expected = read(lm, lm.new_state(), document, turn1, turn2, follow)
    state = lm.new_state()
    read(lm, state, document)
    first = state.checkpoint()
    read(lm, state, turn1)
    second = state.checkpoint()
    third = _extend(lm, second, turn2)
    assert third.parent is second and second.parent is first
    assert len(third.segments) == 3 and third.own_segment.start == 130
    assert torch.equal(read(lm, third.fork(), follow), expected)

    sizes = [save_checkpoint(first, tmp_path / "1"),
             save_checkpoint(second, tmp_path / "2", base_tokens=first.seen_tokens),
             save_checkpoint(third, tmp_path / "3", base_tokens=second.seen_tokens)]
    row = third.geometry.row_bytes
    regions = 2 * third.attention_layers * third.geometry.head_count
    # A follow-up file: its own positions (from the page holding its first one) plus the recurrent states.
    own = regions * third.geometry.region_bytes(130, 163)
    assert own <= regions * (33 * row + 2 * PAGE)
    assert sizes[2] - own <= third.linear.span + 2 * PAGE
    opened = open_checkpoint(tmp_path / "1", lm.fingerprint)
    for name, parent_seen in (("2", 100), ("3", 130)):
        assert opened.seen_tokens == parent_seen
        opened = open_checkpoint(tmp_path / name, lm.fingerprint, parent=opened)
    assert torch.equal(read(lm, opened.fork(), follow), expected)
    # The whole chain also saves as one file.
    save_checkpoint(third, tmp_path / "flat")
    flat = open_checkpoint(tmp_path / "flat", lm.fingerprint)
    assert torch.equal(read(lm, flat.fork(), follow), expected)


def _extend(lm, checkpoint, piece):
    fork = checkpoint.fork()
    read(lm, fork, piece)
    return fork.checkpoint()


def test_state_moved_back_before_its_base_checkpoints_in_full(lm):
    document, tail, other = ids(lm, 60, 10), ids(lm, 20, 11), ids(lm, 15, 12)
    state = lm.new_state()
    read(lm, state, document, tail)
    base = state.checkpoint()
    fork = base.fork()
    # Roll the fork back into the checkpoint's positions (as a rejected draft does), then diverge.
    fork.seen_tokens = 60
    for index, layer in enumerate(_scratch(lm, document).layers):
        if not hasattr(layer, "key"):
            fork.layers[index] = layer
    read(lm, fork, other)
    checkpoint = fork.checkpoint()
    assert checkpoint.parent is None and len(checkpoint.segments) == 1
    probe = ids(lm, 5, 13)
    assert torch.equal(read(lm, checkpoint.fork(), probe), read(lm, lm.new_state(), document, other, probe))


@pytest.mark.skipif(not mapping_supported("cpu"), reason="mapped K/V need Linux")
def test_growing_a_mapped_state_never_moves_its_kv(lm):
    state = lm.new_state()
    read(lm, state, ids(lm, 50, 14))
    layer = next(layer for layer in state.layers if hasattr(layer, "key"))
    address, capacity = layer.key.data_ptr(), layer.key.shape[2]
    assert capacity >= lm.config.context_limit
    fork = state.checkpoint().fork()
    fork_layer = next(layer for layer in fork.layers if hasattr(layer, "key"))
    fork_address = fork_layer.key.data_ptr()
    read(lm, state, ids(lm, 100, 15))
    read(lm, fork, ids(lm, 90, 16))
    Generation(lm, fork, ids(lm, 3, 17), GenerationSettings(max_new_tokens=4)).run()
    assert layer.key.data_ptr() == address and fork_layer.key.data_ptr() == fork_address


def test_damaged_or_mismatched_checkpoint_files_are_refused(lm, tmp_path):
    state = lm.new_state()
    read(lm, state, ids(lm, 64, 18))
    first = state.checkpoint()
    read(lm, state, ids(lm, 10, 19))
    second = state.checkpoint()
    save_checkpoint(first, tmp_path / "first")
    save_checkpoint(second, tmp_path / "second", base_tokens=64)
    with pytest.raises(StateError, match="different model"):
        open_checkpoint(tmp_path / "first", "0" * 64)
    with pytest.raises(StateError, match="does not extend"):
        open_checkpoint(tmp_path / "second", lm.fingerprint)
    data = bytearray((tmp_path / "first").read_bytes())
    data[40] ^= 0x01
    (tmp_path / "header").write_bytes(bytes(data))
    with pytest.raises(StateError, match="damaged"):
        open_checkpoint(tmp_path / "header", lm.fingerprint)
    (tmp_path / "short").write_bytes((tmp_path / "first").read_bytes()[:-PAGE])
    with pytest.raises(StateError, match="truncated"):
        open_checkpoint(tmp_path / "short", lm.fingerprint)
    (tmp_path / "other").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(StateError):
        open_checkpoint(tmp_path / "other", lm.fingerprint)
