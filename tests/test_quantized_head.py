"""The output layer (lm_head) in int8 when the body is quantized on load
(model.quantization.OUTPUT_LAYER_FORMAT): which loads give it, the logits it gives, tied embeddings,
and speculative decoding over it.

A quantized lm_head's prefill rows take the tiled path, whose bits are those of the bf16 layer on
the exact weights rounded to bf16. Its decode and verification rows take the small-row quantized
kernel, which multiplies the exact fp32 weights (int8 scales the finished sum): each row has the
bits of a one-row call, but they differ from the bf16 copy's by about one bf16 rounding, so
against that copy decode steps are held to the same tokens and to DECODE_REL_RMS.
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from kernels.native import FEW_TOKENS
from kernels.quant import INT4, INT8, QuantizedWeight, quantize_int8
from model import Generation, GenerationSettings, load_model
from model.quantization import OUTPUT_LAYER_FORMAT
from model.speculative import SpeculativeGeneration
from tests.conftest import NATIVE_KERNELS
from tests.test_kernels_quant_prefill import bits, exact_bf16_copy
from tests.test_mtp import NEW_TOKENS, ScriptedDrafter, assert_states_close, exact_bf16_rows

# Decode steps against the bf16 copy: the weights' bf16 rounding (2^-9 relative) and the outputs'
# own rounding, through the layers and the state they leave; measured 2.5e-3 to 2.6e-3 (both builds).
DECODE_REL_RMS = 1e-2
DECODE_STEPS = 6


def relative_rms(ours: torch.Tensor, reference: torch.Tensor) -> float:
    return float((ours.float() - reference.float()).norm() / reference.float().norm())


def assert_int8_head(lm) -> QuantizedWeight:
    head = lm.module.lm_head.weight
    assert isinstance(head, QuantizedWeight) and head.format == OUTPUT_LAYER_FORMAT == INT8
    assert head.shape == (lm.config.vocab_size, lm.config.hidden_size)
    assert "lm_head.weight" not in dict(lm.module.named_parameters())
    return head


@pytest.fixture(scope="module")
def int4_lm(demo_checkpoint):
    return load_model(demo_checkpoint, dtype=torch.bfloat16, weights=INT4)


@pytest.mark.parametrize("weights", [INT8, INT4])
def test_quantizing_on_load_holds_lm_head_in_int8(demo_checkpoint, weights):
    lm = load_model(demo_checkpoint, dtype=torch.bfloat16, weights=weights)
    head = assert_int8_head(lm)
    assert set(lm.weight_formats) == {"bfloat16", INT8, weights}
    expected = quantize_int8(load_file(str(demo_checkpoint / "model.safetensors"))["lm_head.weight"])
    assert torch.equal(head.data, expected.data) and torch.equal(head.scale, expected.scale)
    assert lm.module.model.embed_tokens.weight.dtype == torch.bfloat16


@pytest.mark.parametrize("weights", [None, "bf16"])
def test_other_formats_keep_lm_head_dense(demo_checkpoint, weights):
    lm = load_model(demo_checkpoint, dtype=torch.bfloat16, weights=weights)
    assert lm.weight_formats == ("bfloat16",)
    assert isinstance(lm.module.lm_head.weight, torch.nn.Parameter)


def test_an_fp8_checkpoint_keeps_its_bf16_lm_head(demo_checkpoint, tmp_path):
    """The official FP8 layout stores lm_head in bf16: without a conversion asked for, it stays so."""
    from bench.fp8_checkpoint import write_fp8_checkpoint

    lm = load_model(write_fp8_checkpoint(demo_checkpoint, tmp_path / "fp8"), dtype=torch.bfloat16)
    assert "fp8_block" in lm.weight_formats and INT8 not in lm.weight_formats
    head = lm.module.lm_head.weight
    assert isinstance(head, torch.nn.Parameter) and head.dtype == torch.bfloat16


@pytest.mark.parametrize("weights", [INT8, INT4])
def test_logits_are_the_bf16_model_on_the_exact_weights(native_isa, demo_checkpoint, weights):
    """A 40-token prefill chunk bit for bit, lm_head included; then decode steps, greedy, pick the
    same tokens with logits within DECODE_REL_RMS (see the module docstring)."""
    quantized = load_model(demo_checkpoint, dtype=torch.bfloat16, weights=weights)
    copy = load_model(demo_checkpoint, dtype=torch.bfloat16, weights=weights)
    assert_int8_head(quantized)
    exact_bf16_copy(copy)
    assert isinstance(copy.module.lm_head.weight, torch.Tensor) and copy.module.lm_head.weight.dtype == torch.bfloat16
    ids = torch.randint(0, quantized.config.vocab_size, (1, 40), generator=torch.Generator().manual_seed(0))
    ours_state, copy_state = quantized.new_state(), copy.new_state()
    ours, theirs = quantized.forward(ids, ours_state), copy.forward(ids, copy_state)
    assert torch.equal(bits(ours), bits(theirs))
    for _ in range(DECODE_STEPS):
        token = int(theirs[0, -1].argmax())
        assert int(ours[0, -1].argmax()) == token
        step = torch.tensor([[token]])
        ours, theirs = quantized.forward(step, ours_state), copy.forward(step, copy_state)
        assert ours.shape == (1, 1, quantized.config.vocab_size)
        assert relative_rms(ours, theirs) < DECODE_REL_RMS


def test_each_row_of_a_quantized_head_has_the_bits_of_a_one_row_call(native_isa, int4_lm):
    """What verifying drafts in one call relies on (model.decoding `_row_logits`)."""
    head = int4_lm.module.lm_head
    rows = torch.randn(FEW_TOKENS, int4_lm.config.hidden_size, generator=torch.Generator().manual_seed(1))
    rows = rows.to(torch.bfloat16)
    together = head(rows)
    for index in range(FEW_TOKENS):
        assert torch.equal(together[index : index + 1], head(rows[index : index + 1])), index


def generate(lm, prompt: list[int], new_tokens: int = NEW_TOKENS) -> tuple[list[int], object]:
    state = lm.new_state()
    result = Generation(lm, state, prompt, GenerationSettings(max_new_tokens=new_tokens)).run()
    return result.token_ids, state


@pytest.mark.parametrize("wrong_at", [None, 0, 2], ids=["perfect", "wrong-first", "wrong-third"])
def test_speculative_decoding_over_an_int4_model_is_plain_decoding(int4_lm, wrong_at):
    """Drafts verified in one call through the int8 head give plain greedy decoding's tokens and
    state, bit for bit, whether they are accepted or rolled back."""
    if not exact_bf16_rows():
        pytest.skip(f"decode-exact verification needs {NATIVE_KERNELS}")
    tok = int4_lm.tokenizer
    prompt = tok.turn("user", "Summarise the contract terms, please.") + tok.generation_prompt()
    tokens, plain_state = generate(int4_lm, prompt)
    state = int4_lm.new_state()
    generation = SpeculativeGeneration(int4_lm, state, prompt, GenerationSettings(max_new_tokens=NEW_TOKENS),
                                       draft_tokens=3, drafter=ScriptedDrafter(prompt + tokens, wrong_at=wrong_at))
    result = generation.run()
    assert result.token_ids == tokens
    assert result.speculation.proposed > 0 and (result.speculation.accepted > 0) == (wrong_at != 0)
    assert_states_close(state, plain_state)


def test_a_tied_head_gets_its_own_int8_copy_and_the_embedding_stays_dense(qwen35_demo_checkpoint):
    dense = load_model(qwen35_demo_checkpoint, dtype=torch.bfloat16)
    assert dense.config.tie_word_embeddings
    embedding = dense.module.model.embed_tokens.weight
    assert dense.module.lm_head.weight.data_ptr() == embedding.data_ptr()  # tied as stored without a conversion
    lm = load_model(qwen35_demo_checkpoint, dtype=torch.bfloat16, weights=INT4)
    ours = lm.module.model.embed_tokens.weight
    assert isinstance(ours, torch.nn.Parameter) and ours.dtype == torch.bfloat16 and torch.equal(ours, embedding)
    head = assert_int8_head(lm)
    expected = quantize_int8(embedding)
    assert torch.equal(head.data, expected.data) and torch.equal(head.scale, expected.scale)
    copy = load_model(qwen35_demo_checkpoint, dtype=torch.bfloat16, weights=INT4)
    exact_bf16_copy(copy)
    prompt = lm.tokenizer.turn("user", "What does the lease say?") + lm.tokenizer.generation_prompt()
    tokens = generate(lm, prompt)[0]
    assert len(tokens) == NEW_TOKENS and tokens == generate(copy, prompt)[0]
