"""The MTP block of Qwen3.5-shaped checkpoints (dense with tied embeddings, and MoE with fused
experts): its published tensor names, and speculative decoding that reproduces plain greedy
decoding exactly, as tests/test_mtp.py checks for Qwen3-Next."""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open

from model import Generation, GenerationSettings, load_model
from model.demo import write_demo_checkpoint
from model.layers import SparseMoE, SwiGLU
from model.mtp import mtp_block
from model.speculative import SpeculativeGeneration
from tests.conftest import NATIVE_KERNELS
from tests.test_mtp import ScriptedDrafter, assert_mtp_close, assert_states_close, exact_bf16_rows

NEW_TOKENS = 8
# Names (below `mtp.`) as the Qwen3.5 releases store the block; the experts are fused in the MoE ones.
COMMON = {"fc.weight", "pre_fc_norm_embedding.weight", "pre_fc_norm_hidden.weight", "norm.weight"} | {
    f"layers.0.{name}" for name in (
        "input_layernorm.weight", "post_attention_layernorm.weight", "self_attn.q_proj.weight",
        "self_attn.k_proj.weight", "self_attn.v_proj.weight", "self_attn.o_proj.weight", "self_attn.q_norm.weight",
        "self_attn.k_norm.weight")}
MLP = {
    "qwen3_5": {f"layers.0.mlp.{p}_proj.weight" for p in ("gate", "up", "down")},
    "qwen3_5_moe": {"layers.0.mlp.gate.weight", "layers.0.mlp.experts.gate_up_proj", "layers.0.mlp.experts.down_proj",
                    "layers.0.mlp.shared_expert_gate.weight"}
    | {f"layers.0.mlp.shared_expert.{p}_proj.weight" for p in ("gate", "up", "down")},
}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """As in tests/test_mtp.py: multi-token forwards stall in OpenMP when the other core is busy."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module", params=["qwen3_5", "qwen3_5_moe"])
def checkpoint(request, qwen35_demo_checkpoint, tmp_path_factory):
    if request.param == "qwen3_5":
        return request.param, qwen35_demo_checkpoint
    folder = tmp_path_factory.mktemp("demo-qwen35-moe") / "ckpt"
    return request.param, write_demo_checkpoint(folder, seed=1, family="qwen3_5_moe")


@pytest.fixture(scope="module", params=[torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def lm(checkpoint, request):
    if request.param == torch.bfloat16 and not exact_bf16_rows():
        pytest.skip(f"bf16 decode-exact verification needs {NATIVE_KERNELS}")
    return load_model(checkpoint[1], dtype=request.param)


@pytest.fixture(scope="module")
def prompt(lm) -> list[int]:
    tok = lm.tokenizer
    return tok.turn("user", "Summarise the contract terms, please.") + tok.generation_prompt()


@pytest.fixture(scope="module")
def plain(lm, prompt):
    state = lm.new_state()
    result = Generation(lm, state, prompt, GenerationSettings(max_new_tokens=NEW_TOKENS)).run()
    return result.token_ids, state


def test_checkpoint_holds_the_published_mtp_tensors(checkpoint, lm):
    family, folder = checkpoint
    with safe_open(str(folder / "model.safetensors"), framework="pt") as handle:
        names = {name.removeprefix("mtp.") for name in handle.keys() if name.startswith("mtp.")}
    assert names == COMMON | MLP[family]
    block = mtp_block(lm)
    assert isinstance(block.layers[0].mlp, SparseMoE if family == "qwen3_5_moe" else SwiGLU)
    assert block.layers[0].self_attn is not None and not lm.extra_tensors


@pytest.mark.parametrize("draft_tokens", [1, 3])
def test_greedy_with_mtp_equals_plain(lm, prompt, plain, draft_tokens):
    tokens, plain_state = plain
    state = lm.new_state()
    generation = SpeculativeGeneration(lm, state, prompt, GenerationSettings(max_new_tokens=NEW_TOKENS),
                                       draft_tokens=draft_tokens)
    result = generation.run()
    assert result.token_ids == tokens
    assert result.speculation.steps > 0 and result.speculation.draft_tokens == draft_tokens
    assert_states_close(state, plain_state)
    assert_mtp_close(lm, state, prompt + tokens[:-1])


@pytest.mark.parametrize("wrong_at", [None, 1])
def test_accepted_and_rejected_drafts_leave_the_plain_state(lm, prompt, plain, wrong_at):
    """Scripted drafts (all right, or wrong at the second) force acceptance and rollback."""
    tokens, plain_state = plain
    state = lm.new_state()
    drafter = ScriptedDrafter(prompt + tokens, wrong_at=wrong_at)
    result = SpeculativeGeneration(lm, state, prompt, GenerationSettings(max_new_tokens=NEW_TOKENS),
                                   draft_tokens=3, drafter=drafter).run()
    assert result.token_ids == tokens and result.speculation.accepted > 0
    assert_states_close(state, plain_state)
