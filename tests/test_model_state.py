"""One-shot, chunked and token-by-token forwards agree; saved states resume exactly."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from model import ModelState, StateError, load_model, prefill
from tests.oracle import write_oracle_checkpoint

# Same weights and math, different chunking: only summation order differs.
CONSISTENCY_REL_TOL = 2e-5


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny")
    write_oracle_checkpoint(folder, "odd-shapes", seed=11)
    return folder


@pytest.fixture(scope="module")
def lm(tiny_folder):
    return load_model(tiny_folder, dtype=torch.float32)


def tokens(lm, length: int, seed: int = 0, batch: int = 1) -> torch.Tensor:
    return torch.randint(0, lm.config.vocab_size, (batch, length), generator=torch.Generator().manual_seed(seed))


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


@pytest.mark.parametrize("chunk", [1, 5, 64, 100], ids=lambda c: f"chunk{c}")
def test_chunked_forward_equals_one_shot(lm, chunk):
    ids = tokens(lm, 150, batch=2)
    one_shot = lm.forward(ids, lm.new_state(2))
    state = lm.new_state(2)
    pieces = [lm.forward(ids[:, s:s + chunk], state) for s in range(0, ids.shape[1], chunk)]
    assert state.seen_tokens == 150
    assert relative_error(torch.cat(pieces, dim=1), one_shot) < CONSISTENCY_REL_TOL


def test_prefill_returns_last_logits_and_reports_progress(lm):
    ids = tokens(lm, 90, seed=1)
    expected = lm.forward(ids, lm.new_state())[0, -1]
    seen = []
    state = lm.new_state()
    last = prefill(lm, state, ids[0].tolist(), chunk_size=32, progress=seen.append)
    assert [p.done for p in seen] == [32, 64, 90] and seen[-1].total == 90
    assert relative_error(last, expected) < CONSISTENCY_REL_TOL


def test_last_only_matches_full_logits(lm):
    ids = tokens(lm, 33, seed=2)
    full = lm.forward(ids, lm.new_state())
    last = lm.forward(ids, lm.new_state(), last_only=True)
    assert last.shape == (1, 1, lm.config.vocab_size)
    assert relative_error(last[:, 0], full[:, -1]) < CONSISTENCY_REL_TOL


def test_clone_is_independent(lm):
    ids = tokens(lm, 40, seed=3)
    state = lm.new_state()
    lm.forward(ids[:, :30], state)
    copy = state.clone()
    a = lm.forward(ids[:, 30:], state)
    b = lm.forward(ids[:, 30:], copy)
    assert torch.equal(a, b)
    assert copy.seen_tokens == state.seen_tokens == 40


def test_state_bytes_grow_only_with_attention_positions(lm):
    state = lm.new_state()
    lm.forward(tokens(lm, 10), state)
    small = state.nbytes()
    lm.forward(tokens(lm, 10, seed=5), state)
    cfg = lm.config
    attention_layers = sum(t == "full_attention" for t in cfg.layer_types)
    per_token = attention_layers * 2 * cfg.num_key_value_heads * cfg.head_dim * 4
    assert state.nbytes() - small == 10 * per_token


RESUME_SCRIPT = """
import sys, torch
sys.path.insert(0, sys.argv[1])
from model import load_model
lm = load_model(sys.argv[2], dtype=torch.float32)
state = lm.load_state(sys.argv[3])
ids = torch.load(sys.argv[4])
torch.save(lm.forward(ids, state), sys.argv[5])
"""


def test_saved_state_resumes_in_a_fresh_process(lm, tiny_folder, tmp_path):
    ids = tokens(lm, 120, seed=4)
    uninterrupted = lm.forward(ids, lm.new_state())[:, 70:]
    state = lm.new_state()
    lm.forward(ids[:, :70], state)
    state.save(tmp_path / "state.safetensors")
    torch.save(ids[:, 70:], tmp_path / "rest.pt")
    root = str(tiny_folder.parents[0])
    from pathlib import Path

    project = str(Path(__file__).resolve().parents[1])
    subprocess.run([sys.executable, "-c", RESUME_SCRIPT, project, str(tiny_folder), str(tmp_path / "state.safetensors"),
                    str(tmp_path / "rest.pt"), str(tmp_path / "out.pt")], check=True, cwd=root)
    resumed = torch.load(tmp_path / "out.pt")
    assert relative_error(resumed, uninterrupted) < CONSISTENCY_REL_TOL


def test_state_from_another_model_is_refused(lm, tmp_path, demo_checkpoint):
    state = lm.new_state()
    lm.forward(tokens(lm, 5), state)
    state.save(tmp_path / "s.safetensors")
    other = load_model(demo_checkpoint, dtype=torch.float32)
    with pytest.raises(StateError, match="different model"):
        other.load_state(tmp_path / "s.safetensors")
    with pytest.raises(StateError, match="different model"):
        ModelState.load(tmp_path / "s.safetensors", fingerprint="0" * 64)


def test_state_of_other_dtype_is_refused(tiny_folder, lm, tmp_path):
    state = lm.new_state()
    lm.forward(tokens(lm, 5), state)
    state.save(tmp_path / "s.safetensors")
    bf16 = load_model(tiny_folder, dtype=torch.bfloat16)
    with pytest.raises(StateError):
        bf16.load_state(tmp_path / "s.safetensors")


def test_damaged_state_file_gives_state_error(lm, tmp_path):
    path = tmp_path / "broken.safetensors"
    path.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(StateError):
        lm.load_state(path)


def test_checkpoint_forks_continue_exactly_for_odd_shapes_and_batches(lm, tmp_path):
    """Rows of 24 fp32 values (96 bytes) never line up with pages, and batch 2 has 6 heads per layer."""
    from model.checkpoint_file import open_checkpoint, save_checkpoint

    ids = tokens(lm, 140, seed=6, batch=2)
    reference = lm.new_state(2)
    lm.forward(ids[:, :50], reference)
    lm.forward(ids[:, 50:90], reference)
    expected = lm.forward(ids[:, 90:], reference)
    state = lm.new_state(2)
    lm.forward(ids[:, :50], state)
    first = state.checkpoint()
    lm.forward(ids[:, 50:90], state)
    second = state.checkpoint()
    assert second.parent is first and second.own_segment.start == 50
    save_checkpoint(first, tmp_path / "first")
    save_checkpoint(second, tmp_path / "second", base_tokens=50)
    opened = open_checkpoint(tmp_path / "second", lm.fingerprint,
                             parent=open_checkpoint(tmp_path / "first", lm.fingerprint))
    for source in (second, opened):
        fork = source.fork()
        assert fork.seen_tokens == 90 and fork.batch_size == 2
        assert torch.equal(lm.forward(ids[:, 90:], fork), expected)
    assert torch.equal(lm.forward(ids[:, 90:], state), expected)
