"""The MTP block's K/V follow the state: every prefill extends them, checkpoints and saved states
carry them, and drafts after a restore see the whole context."""

from __future__ import annotations

import pytest
import torch

from model import Generation, GenerationSettings, load_model, prefill
from model.mtp import mtp_block, state_mtp
from model.speculative import MtpDrafter, SpeculativeGeneration
from tests.conftest import NATIVE_KERNELS
from tests.test_mtp import (
    NEW_TOKENS,
    assert_mtp_close,
    assert_states_close,
    exact_bf16_rows,
    one_thread,  # noqa: F401  (autouse here too)
)


@pytest.fixture(scope="module", params=[torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def lm(demo_checkpoint, request):
    if request.param == torch.bfloat16 and not exact_bf16_rows():
        pytest.skip(f"bf16 decode-exact verification needs {NATIVE_KERNELS}")
    return load_model(demo_checkpoint, dtype=request.param)


@pytest.fixture(scope="module")
def document(lm) -> list[int]:
    tok = lm.tokenizer
    text = "The supplier delivers 500 units every month. Payment is due within 30 days of invoice."
    return tok.turn("system", "Answer from the document.") + tok.turn("user", text)


@pytest.fixture(scope="module")
def question(lm) -> list[int]:
    return lm.tokenizer.turn("user", "When is payment due?") + lm.tokenizer.generation_prompt()


def test_state_of_a_model_with_mtp_carries_the_cache(lm):
    state = lm.new_state()
    assert len(state.layers) == lm.config.num_hidden_layers + 2
    assert state_mtp(lm, state).length == 0


def test_state_without_the_mtp_cache_prefills_the_same_trunk(lm, document):
    """`new_state(mtp=False)` (what a comparison with a runtime that runs no MTP block uses) leaves
    the block out and the model's own layers as they were."""
    plain, carrying = lm.new_state(mtp=False), lm.new_state()
    assert len(plain.layers) == lm.config.num_hidden_layers and state_mtp(lm, plain) is None
    assert torch.equal(prefill(lm, plain, document), prefill(lm, carrying, document))
    trunk = carrying.layer_tensors()
    for name, tensor in plain.layer_tensors().items():
        assert torch.equal(tensor, trunk[name]), name


@pytest.mark.parametrize("how", ["one-shot", "chunks-of-5", "token-by-token", "checkpoint-fork", "saved-file"])
def test_prefill_builds_the_same_mtp_cache_however_the_prompt_is_fed(lm, document, how, tmp_path):
    state = lm.new_state()
    split = len(document) // 2 + 1
    if how == "one-shot":
        prefill(lm, state, document)
    elif how in ("chunks-of-5", "token-by-token"):
        prefill(lm, state, document, chunk_size=5 if how == "chunks-of-5" else 1)
    else:
        prefill(lm, state, document[:split], chunk_size=7)
        if how == "checkpoint-fork":
            state = state.checkpoint().fork()
        else:
            state.save(tmp_path / "half.safetensors")
            state = lm.load_state(tmp_path / "half.safetensors")
        prefill(lm, state, document[split:], chunk_size=7)
    assert_mtp_close(lm, state, document)


def test_decode_steps_without_the_block_restart_the_cache_where_prefill_resumes(lm, document):
    """A state advanced by plain forwards has no MTP entries for those tokens; the next prefill
    starts the entries afresh rather than mixing positions."""
    state = lm.new_state()
    prefill(lm, state, document[:10])
    lm.forward(torch.tensor([document[10:14]]), state)
    prefill(lm, state, document[14:])
    cache = state_mtp(lm, state)
    assert cache.in_step(len(document)) and (cache.first_position, cache.length) == (14, len(document) - 15)


class ScriptedMtpDrafter(MtpDrafter):
    """Runs the MTP block as the real drafter does, but proposes the tokens of a known sequence
    (perfect drafts), and records where the cache stood at each call."""

    def __init__(self, lm, sequence: list[int]):
        super().__init__(lm, mtp_block(lm))
        self.sequence, self.calls = sequence, []

    def draft(self, hidden, tokens, position, count, pick):
        self.calls.append((position, self.cache.first_position, self.cache.next_position))
        proposed, _ = super().draft(hidden, tokens, position, count, pick)
        first = position + len(tokens) + 1
        drafts = self.sequence[first:first + len(proposed)]
        return drafts, None


def test_mtp_drafts_after_a_restored_state_are_all_accepted(lm, document, question):
    settings = GenerationSettings(max_new_tokens=NEW_TOKENS)
    checkpoint_state = lm.new_state()
    prefill(lm, checkpoint_state, document)
    checkpoint = checkpoint_state.checkpoint()
    plain_state = checkpoint.fork()
    answer = Generation(lm, plain_state, question, settings).run().token_ids
    state = checkpoint.fork()
    drafter = ScriptedMtpDrafter(lm, document + question + answer)
    result = SpeculativeGeneration(lm, state, question, settings, draft_tokens=3, drafter=drafter).run()
    assert result.token_ids == answer
    stats = result.speculation
    assert stats.accepted == stats.proposed > 0
    # The first drafts already attend to the document: the cache restored with the state starts at 0.
    prompt_end = len(document) + len(question)
    assert drafter.calls[0] == (prompt_end - 1, 0, prompt_end - 1)
    assert_states_close(state, plain_state)
    assert_mtp_close(lm, state, document + question + answer[:-1])
