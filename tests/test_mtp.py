"""MTP block loading and speculative decoding: exact greedy output, rollback, sampling rule."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from kernels.attention import native as attention_native
from kernels.linear import native as linear_native
from kernels.quant import QuantizedWeight
from model import Generation, GenerationSettings, LoadError, ModelConfig, ModelState, SamplingParams, load_model
from model.demo import DEMO_CONFIG, random_weights
from model.mtp import MTP_STATE_LAYERS, MtpRunner, mtp_block, new_mtp_cache, state_mtp
from model.speculative import (
    Drafter,
    MtpDrafter,
    SpeculativeGeneration,
    accept_draft,
    residual_distribution,
    verify_sampled,
)
from tests.conftest import NATIVE_KERNELS

NEW_TOKENS = 8
# In fp32 the verification forward rounds differently from one-token steps (~1e-7 relative);
# states reached both ways agree to this. In bf16 on CPU the row-independent kernels make every
# verification row round exactly as a decode step, so the states must be bitwise equal.
STATE_ATOL = {torch.float32: 1e-4, torch.bfloat16: 0.0}
# The MTP cache is built from different row groupings (one pass at the end of plain decoding,
# step by step while drafting, chunk by chunk in prefill): in bf16 up to two bf16 steps at the
# cache's magnitudes (|x| < 8).
MTP_ATOL = {torch.float32: 1e-4, torch.bfloat16: 2 * 2.0**-5}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Multi-token forwards enter OpenMP regions that stall when the other core is busy; one
    thread keeps these tests fast on a shared machine (both sides of each comparison use it)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module", params=[torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def lm(demo_checkpoint, request):
    if request.param == torch.bfloat16 and not exact_bf16_rows():
        pytest.skip(f"bf16 decode-exact verification needs {NATIVE_KERNELS}")
    return load_model(demo_checkpoint, dtype=request.param)


@pytest.fixture(scope="module")
def prompt(lm) -> list[int]:
    tok = lm.tokenizer
    return tok.turn("user", "Summarise the contract terms, please.") + tok.generation_prompt()


@pytest.fixture(scope="module")
def plain(lm, prompt):
    """Plain greedy decoding: (answer tokens, final state)."""
    state = lm.new_state()
    result = Generation(lm, state, prompt, GenerationSettings(max_new_tokens=NEW_TOKENS)).run()
    return result.token_ids, state


class ScriptedDrafter(Drafter):
    """Proposes the tokens of a known sequence (indexed by absolute position), wrong at `wrong_at`."""

    def __init__(self, sequence: list[int], wrong_at: int | None = None):
        self.sequence, self.wrong_at = sequence, wrong_at

    def draft(self, hidden, tokens, position, count, pick):
        first = position + len(tokens) + 1
        drafts = []
        for index, at in enumerate(range(first, min(first + count, len(self.sequence)))):
            token = self.sequence[at]
            drafts.append((token + 1) % 151936 if index == self.wrong_at else token)
        return drafts, None


def exact_bf16_rows() -> bool:
    return linear_native.kernel() is not None and attention_native.kernel() is not None


def assert_states_close(a: ModelState, b: ModelState) -> None:
    """The model's layers agree to STATE_ATOL; an MTP cache after them (both carry one or neither)
    to MTP_ATOL, with the same positions."""
    assert a.seen_tokens == b.seen_tokens
    assert len(a.layers) == len(b.layers)
    ours, theirs = a.layer_tensors(), b.layer_tensors()
    # Recurrent states are fp32 in every model; conv tails and K/V carry the model's dtype.
    model_dtype = torch.bfloat16 if any(t.dtype == torch.bfloat16 for t in theirs.values()) else torch.float32
    mtp_layers = {f"layers.{len(b.layers) - i}." for i in range(1, MTP_STATE_LAYERS + 1)}
    for name, tensor in theirs.items():
        in_mtp = any(name.startswith(prefix) for prefix in mtp_layers) and has_mtp_cache(b)
        atol = (MTP_ATOL if in_mtp else STATE_ATOL)[model_dtype]
        torch.testing.assert_close(ours[name], tensor, atol=atol, rtol=0)


def has_mtp_cache(state: ModelState) -> bool:
    """Whether the state ends with an MTP cache (its pending hidden is `[B, H]`, unlike a conv tail)."""
    last = state.layers[-1]
    return hasattr(last, "conv") and last.conv.dim() == 2


def mtp_reference(lm, sequence: list[int]):
    """The MTP cache of one pass over `sequence`: (cache, final-normed hidden `[1, T, H]`)."""
    ids = torch.tensor([sequence])
    normed = lm.module.model.norm(lm.hidden_states(ids, lm.new_state()))
    reference = new_mtp_cache(lm)
    MtpRunner(lm, mtp_block(lm)).extend(reference, normed[:, :-1], ids[:, 1:], 0)
    return reference, normed


def assert_mtp_close(lm, state: ModelState, sequence: list[int]) -> None:
    """`state`'s MTP cache covers every pair of `sequence` (what the state consumed) and keeps its
    last hidden, as one MTP pass over it would."""
    assert state.seen_tokens == len(sequence)
    cache = state_mtp(lm, state)
    assert cache is not None and cache.in_step(state.seen_tokens)
    assert (cache.first_position, cache.length) == (0, state.seen_tokens - 1)
    reference, normed = mtp_reference(lm, sequence)
    atol = MTP_ATOL[lm.dtype]
    for ours, theirs in zip(cache.entries(), reference.entries(), strict=True):
        torch.testing.assert_close(ours, theirs, atol=atol, rtol=0)
    torch.testing.assert_close(cache.hidden, normed[:, -1], atol=atol, rtol=0)


def speculative(lm, state, prompt, **kwargs):
    generation = SpeculativeGeneration(lm, state, prompt, GenerationSettings(max_new_tokens=NEW_TOKENS), **kwargs)
    deltas = list(generation)
    assert "".join(d.text for d in deltas if d.channel == "answer") == generation.result.text
    return generation.result


# Loading


def expected_mtp_shapes(config) -> dict[str, tuple[int, ...]]:
    hidden, head, inter, shared = (config.hidden_size, config.head_dim, config.moe_intermediate_size,
                                   config.shared_expert_intermediate_size)
    layer = "mtp.layers.0."
    shapes = {
        "mtp.fc.weight": (hidden, 2 * hidden),
        "mtp.pre_fc_norm_embedding.weight": (hidden,),
        "mtp.pre_fc_norm_hidden.weight": (hidden,),
        "mtp.norm.weight": (hidden,),
        layer + "input_layernorm.weight": (hidden,),
        layer + "post_attention_layernorm.weight": (hidden,),
        layer + "self_attn.q_proj.weight": (2 * config.num_attention_heads * head, hidden),
        layer + "self_attn.k_proj.weight": (config.num_key_value_heads * head, hidden),
        layer + "self_attn.v_proj.weight": (config.num_key_value_heads * head, hidden),
        layer + "self_attn.o_proj.weight": (hidden, config.num_attention_heads * head),
        layer + "self_attn.q_norm.weight": (head,),
        layer + "self_attn.k_norm.weight": (head,),
        layer + "mlp.gate.weight": (config.num_experts, hidden),
        layer + "mlp.shared_expert.gate_proj.weight": (shared, hidden),
        layer + "mlp.shared_expert.up_proj.weight": (shared, hidden),
        layer + "mlp.shared_expert.down_proj.weight": (hidden, shared),
        layer + "mlp.shared_expert_gate.weight": (1, hidden),
    }
    for expert in range(config.num_experts):
        shapes[f"{layer}mlp.experts.{expert}.gate_proj.weight"] = (inter, hidden)
        shapes[f"{layer}mlp.experts.{expert}.up_proj.weight"] = (inter, hidden)
        shapes[f"{layer}mlp.experts.{expert}.down_proj.weight"] = (hidden, inter)
    return shapes


def test_demo_checkpoint_has_the_published_mtp_tensors(demo_checkpoint, lm):
    with safe_open(str(demo_checkpoint / "model.safetensors"), framework="pt") as handle:
        shapes = {name: tuple(handle.get_slice(name).get_shape()) for name in handle.keys()}
    mtp = {name: shape for name, shape in shapes.items() if name.startswith("mtp.")}
    assert mtp == expected_mtp_shapes(lm.config)
    assert lm.config.mtp_num_hidden_layers == 1
    # Same names and shapes as a main-model attention layer.
    attention = next(i for i, kind in enumerate(lm.config.layer_types) if kind == "full_attention")
    main = {n.removeprefix(f"model.layers.{attention}."): s for n, s in shapes.items()
            if n.startswith(f"model.layers.{attention}.")}
    assert {n.removeprefix("mtp.layers.0."): s for n, s in mtp.items() if n.startswith("mtp.layers.0.")} == main


def test_block_is_filled_from_the_checkpoint_tensors(demo_checkpoint):
    lm = load_model(demo_checkpoint, dtype=torch.float32)
    raw = {name: t.clone() for name, t in lm.extra_tensors.items()}
    block = mtp_block(lm)
    assert block is mtp_block(lm)
    assert not lm.extra_tensors  # handed over to the block, not kept twice
    width = lm.config.moe_intermediate_size
    experts = block.layers[0].mlp.experts
    for expert in (0, lm.config.num_experts - 1):
        prefix = f"mtp.layers.0.mlp.experts.{expert}."
        assert torch.equal(experts.gate_up_proj[expert, :width], raw[prefix + "gate_proj.weight"])
        assert torch.equal(experts.gate_up_proj[expert, width:], raw[prefix + "up_proj.weight"])
        assert torch.equal(experts.down_proj[expert], raw[prefix + "down_proj.weight"])
    assert torch.equal(block.fc.weight, raw["mtp.fc.weight"])
    assert torch.equal(block.layers[0].self_attn.q_proj.weight, raw["mtp.layers.0.self_attn.q_proj.weight"])


def test_fc_reads_the_embedding_first(lm):
    """Zeroing the embedding half of `fc` must make the output ignore the token."""
    block = mtp_block(lm)
    runner = MtpRunner(lm, block)
    hidden = torch.randn(1, 1, lm.config.hidden_size, generator=torch.Generator().manual_seed(0))
    saved = block.fc.weight.detach().clone()
    try:
        with torch.no_grad():
            block.fc.weight[:, : lm.config.hidden_size] = 0
        a = runner.extend(new_mtp_cache(lm), hidden, torch.tensor([[11]]), 5)
        b = runner.extend(new_mtp_cache(lm), hidden, torch.tensor([[999]]), 5)
    finally:
        with torch.no_grad():
            block.fc.weight.copy_(saved)
    assert torch.equal(a, b)


def copy_checkpoint(source, folder, tensors: dict[str, torch.Tensor], config_changes: dict | None = None):
    folder.mkdir()
    for item in source.iterdir():
        if item.name not in ("model.safetensors", "config.json"):
            (folder / item.name).write_bytes(item.read_bytes())
    raw = json.loads((source / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**raw, **(config_changes or {})}))
    save_file(tensors, str(folder / "model.safetensors"))
    return folder


def test_incomplete_mtp_block_is_refused(demo_checkpoint, tmp_path):
    tensors = load_file(demo_checkpoint / "model.safetensors")
    del tensors["mtp.norm.weight"]
    lm = load_model(copy_checkpoint(demo_checkpoint, tmp_path / "ckpt", tensors), dtype=torch.float32)
    with pytest.raises(LoadError, match="mtp.norm.weight"):
        mtp_block(lm)


def test_checkpoint_without_mtp_disables_speculation(demo_checkpoint, tmp_path):
    tensors = {n: t for n, t in load_file(demo_checkpoint / "model.safetensors").items() if not n.startswith("mtp.")}
    folder = copy_checkpoint(demo_checkpoint, tmp_path / "plain", tensors, {"mtp_num_hidden_layers": 0})
    lm = load_model(folder, dtype=torch.float32)
    assert not lm.extra_tensors and mtp_block(lm) is None
    ids = lm.tokenizer.encode("No drafts here")
    settings = GenerationSettings(max_new_tokens=4)
    generation = SpeculativeGeneration(lm, lm.new_state(), ids, settings)
    result = generation.run()
    assert generation.drafter is None and result.speculation is None
    assert result.token_ids == Generation(lm, lm.new_state(), ids, settings).run().token_ids


def test_demo_writer_leaves_out_mtp_when_asked():
    config = ModelConfig.from_dict({**DEMO_CONFIG, "mtp_num_hidden_layers": 0, "vocab_size": 64,
                                    "bos_token_id": 1, "eos_token_id": 2})
    with_mtp = random_weights(dataclasses.replace(config, mtp_num_hidden_layers=1), seed=3)
    without = random_weights(config, seed=3)
    assert not any(n.startswith("mtp.") for n in without)
    # The main weights do not depend on whether an MTP block is drawn after them.
    assert all(torch.equal(without[n], with_mtp[n]) for n in without)
    assert set(with_mtp) - set(without) == set(expected_mtp_shapes(config))


# Greedy: identical to plain decoding


@pytest.mark.parametrize("draft_tokens", [1, 3])
def test_greedy_with_mtp_equals_plain(lm, prompt, plain, draft_tokens):
    tokens, plain_state = plain
    state = lm.new_state()
    result = speculative(lm, state, prompt, draft_tokens=draft_tokens)
    assert result.token_ids == tokens
    assert result.text == lm.tokenizer.decode(tokens)
    assert result.finish_reason == "length"
    stats = result.speculation
    assert stats.steps > 0 and stats.proposed == sum(stats.proposed_at) and stats.draft_tokens == draft_tokens
    assert_states_close(state, plain_state)
    # The MTP cache covers every pair of the sequence and keeps the last hidden for the next turn.
    assert_mtp_close(lm, state, prompt + tokens[:-1])


@pytest.mark.parametrize("weights", ["int8", "int4"])
def test_the_block_holds_its_weights_as_the_layers_do(demo_checkpoint, weights):
    """Quantizing while loading takes the MTP block's projections and experts too (as the layers'),
    the rest dense; drafting from it keeps greedy answers those of plain decoding."""
    lm = load_model(demo_checkpoint, dtype=torch.bfloat16 if exact_bf16_rows() else torch.float32, weights=weights)
    block = mtp_block(lm)
    layer, main = block.layers[0], lm.module.model.layers[lm.config.layer_types.index("full_attention")]
    assert layer.self_attn.q_proj.weight.format == main.self_attn.q_proj.weight.format == weights
    experts = [layer.mlp.experts.gate_up_proj, layer.mlp.experts.down_proj]
    assert [type(e) for e in experts] == [type(e) for e in (main.mlp.experts.gate_up_proj, main.mlp.experts.down_proj)]
    assert experts[1].format == weights
    assert isinstance(block.fc.weight, torch.Tensor) and block.fc.weight.dtype == lm.dtype
    prompt = lm.tokenizer.turn("user", "Summarise the contract terms, please.") + lm.tokenizer.generation_prompt()
    expected = Generation(lm, lm.new_state(), prompt, GenerationSettings(max_new_tokens=NEW_TOKENS)).run().token_ids
    result = speculative(lm, lm.new_state(), prompt, draft_tokens=2)
    assert result.token_ids == expected and result.speculation.proposed > 0


def test_a_written_int4_checkpoint_holds_the_block_as_quantizing_on_load(demo_checkpoint, tmp_path):
    from model.quantize import quantize_checkpoint

    quantize_checkpoint(demo_checkpoint, tmp_path / "q", "int4")
    saved = load_model(tmp_path / "q", dtype=torch.float32).extra_tensors
    on_load = load_model(demo_checkpoint, dtype=torch.float32, weights="int4").extra_tensors
    assert saved.keys() == on_load.keys()
    assert any(isinstance(value, QuantizedWeight) for value in saved.values())
    for name, value in saved.items():
        expected = on_load[name]
        assert type(value) is type(expected), name
        pairs = [(value.data, expected.data), (value.scale, expected.scale)] if isinstance(value, QuantizedWeight) \
            else [(value, expected)]
        assert all(torch.equal(ours, theirs) for ours, theirs in pairs), name


def test_a_damaged_draft_head_only_costs_time(demo_checkpoint, lm, prompt, plain):
    """NaN in the MTP block's weights makes every draft's scores NaN: greedy drafting still proposes
    (whatever token), verification rejects it, and the answer is plain decoding's."""
    damaged = load_model(demo_checkpoint, dtype=lm.dtype)
    with torch.no_grad():
        mtp_block(damaged).norm.weight.fill_(float("nan"))
    result = speculative(damaged, damaged.new_state(), prompt, draft_tokens=2)
    assert result.token_ids == plain[0]
    assert result.speculation.proposed > 0 and result.speculation.accepted == 0


def test_mtp_cache_equals_one_pass_over_the_sequence(lm, prompt, plain):
    """The K/V built step by step, through rollbacks, equal one MTP pass over the final sequence;
    so do those plain decoding builds in one pass at the end of the answer."""
    tokens, plain_state = plain
    state = lm.new_state()
    speculative(lm, state, prompt, draft_tokens=2)
    assert_mtp_close(lm, state, prompt + tokens[:-1])
    assert_mtp_close(lm, plain_state, prompt + tokens[:-1])


@pytest.mark.parametrize("pairs", [1, 5, 40], ids=lambda n: f"{n}-pairs")
def test_recording_pairs_writes_the_bits_running_them_writes(lm, pairs):
    """Pairs whose outputs nobody reads (a prompt's) go through MtpRunner.record, which skips the
    layer's attention and experts: the K/V it writes are those the whole block writes, bit for bit."""
    ids = torch.randint(0, lm.config.vocab_size, (1, pairs + 1), generator=torch.Generator().manual_seed(pairs))
    normed = lm.module.model.norm(lm.hidden_states(ids, lm.new_state()))
    runner, caches = MtpRunner(lm, mtp_block(lm)), (new_mtp_cache(lm), new_mtp_cache(lm))
    runner.extend(caches[0], normed[:, :-1], ids[:, 1:], 0)
    assert runner.record(caches[1], normed[:, :-1], ids[:, 1:], 0) is None
    assert caches[0].next_position == caches[1].next_position == pairs
    for ran, recorded in zip(caches[0].entries(), caches[1].entries(), strict=True):
        assert torch.equal(ran, recorded)


def test_a_draft_needs_only_the_last_pairs_output(lm, prompt):
    """MtpDrafter records a step's earlier pairs and runs the block on the last one only: the first
    draft's logits and the cache are those of running the block on every pair (bitwise in bf16,
    where a row's bits do not depend on the rows beside it)."""
    ids = torch.tensor([prompt[:6]])
    normed = lm.module.model.norm(lm.hidden_states(ids, lm.new_state()))
    runner = MtpRunner(lm, mtp_block(lm))
    whole = new_mtp_cache(lm)
    expected = runner.logits(runner.extend(whole, normed[:, :-1], ids[:, 1:], 0)[:, -1:])
    drafter = MtpDrafter(lm, mtp_block(lm))
    drafter.cache = new_mtp_cache(lm)
    picked = []
    drafter.draft(normed[0, :-1], ids[0, 1:].tolist(), 0, 1, lambda logits, drafts: picked.append(logits) or (0, None))
    atol = STATE_ATOL[lm.dtype]
    torch.testing.assert_close(picked[0], expected[0, -1], atol=atol, rtol=0)
    for ours, theirs in zip(drafter.cache.entries(), whole.entries(), strict=True):
        torch.testing.assert_close(ours[:, :, :5], theirs[:, :, :5], atol=atol, rtol=0)


def test_greedy_from_restored_state_equals_plain(lm, prompt, plain, tmp_path):
    tokens, first_state = plain
    path = tmp_path / "turn1.safetensors"
    first_state.save(path)
    follow_up = lm.tokenizer.turn("user", "And the penalties?") + lm.tokenizer.generation_prompt()
    settings = GenerationSettings(max_new_tokens=NEW_TOKENS)
    expected_state = lm.load_state(path)
    expected = Generation(lm, expected_state, follow_up, settings).run().token_ids
    restored = lm.load_state(path)
    result = SpeculativeGeneration(lm, restored, follow_up, settings).run()
    assert result.token_ids == expected
    assert_states_close(restored, expected_state)


def test_saved_and_forked_states_carry_the_mtp_cache(lm, prompt, plain, tmp_path):
    tokens, _ = plain
    state = lm.new_state()
    speculative(lm, state, prompt)
    path = tmp_path / "turn1.safetensors"
    state.save(path)
    cache = state_mtp(lm, state)
    for source in (lm.load_state(path), state.clone(), state.checkpoint().fork()):
        copy = state_mtp(lm, source)
        assert (copy.first_position, copy.next_position, copy.hidden_position) == (
            cache.first_position, cache.next_position, cache.hidden_position)
        for ours, theirs in zip(copy.entries(), cache.entries(), strict=True):
            assert torch.equal(ours, theirs)
        assert torch.equal(copy.hidden, cache.hidden)
    follow_up = lm.tokenizer.turn("user", "And the penalties?") + lm.tokenizer.generation_prompt()
    settings = GenerationSettings(max_new_tokens=NEW_TOKENS)
    expected = Generation(lm, lm.load_state(path), follow_up, settings).run().token_ids
    loaded = lm.load_state(path)
    answer = SpeculativeGeneration(lm, loaded, follow_up, settings).run().token_ids
    assert answer == expected
    assert_mtp_close(lm, loaded, prompt + tokens[:-1] + follow_up + answer[:-1])


# Rollback, forced by scripted drafts


def test_steps_without_drafts_are_plain_decode_steps(lm, prompt, plain):
    """A drafter that proposes nothing makes every step a one-token forward: bit-identical to plain."""
    tokens, plain_state = plain
    state = lm.new_state()
    result = speculative(lm, state, prompt, draft_tokens=2, drafter=Drafter())
    assert result.token_ids == tokens and result.speculation.steps == 0
    assert state.seen_tokens == plain_state.seen_tokens
    for name, tensor in plain_state.layer_tensors().items():
        assert torch.equal(state.layer_tensors()[name], tensor), name



@pytest.mark.parametrize("max_verify_tokens", [None, 4], ids=["deferred", "eager"])
def test_perfect_drafts_are_all_accepted(lm, prompt, plain, max_verify_tokens):
    tokens, plain_state = plain
    state = lm.new_state()
    drafter = ScriptedDrafter(prompt + tokens)
    result = speculative(lm, state, prompt, draft_tokens=3, drafter=drafter, max_verify_tokens=max_verify_tokens)
    assert result.token_ids == tokens
    stats = result.speculation
    assert stats.accepted == stats.proposed > 0
    assert stats.acceptance_rate_at == [1.0, 1.0, 1.0]
    # 7 tokens after the first one: two steps of 3 drafts + 1 model token.
    assert stats.steps == 2
    assert_states_close(state, plain_state)


@pytest.mark.parametrize("max_verify_tokens", [None, 4], ids=["deferred", "eager"])
@pytest.mark.parametrize("wrong_at", [0, 1, 2])
def test_rejection_at_each_position_rolls_back_exactly(lm, prompt, plain, wrong_at, max_verify_tokens):
    tokens, plain_state = plain
    state = lm.new_state()
    drafter = ScriptedDrafter(prompt + tokens, wrong_at=wrong_at)
    result = speculative(lm, state, prompt, draft_tokens=3, drafter=drafter, max_verify_tokens=max_verify_tokens)
    assert result.token_ids == tokens
    stats = result.speculation
    assert stats.accepted_at[wrong_at:] == [0] * (3 - wrong_at)
    assert all(rate == 1.0 for rate in stats.acceptance_rate_at[:wrong_at])
    assert stats.mean_tokens_per_step == pytest.approx(1 + wrong_at, abs=0.5)
    assert_states_close(state, plain_state)


PENALTIES = "What are the penalties for late delivery?"
LEASE = "When does the lease end and what notice is needed?"


@pytest.mark.parametrize(
    "question, draft_tokens, wrong_at",
    [(PENALTIES, 2, None), (LEASE, 3, 1), (PENALTIES, 5, 3)],
    ids=["penalties-k2", "lease-k3-wrong1", "penalties-k5-wrong3"],
)
def test_long_answer_with_mtp_equals_plain(lm, question, draft_tokens, wrong_at):
    """48 tokens. In bf16 with PyTorch's GEMM, attention and elementwise paths instead of the
    row-independent ones, these answers diverge from plain decoding (at tokens 44 and 9)."""
    tok = lm.tokenizer
    prompt = tok.turn("user", question) + tok.generation_prompt()
    settings = GenerationSettings(max_new_tokens=48)
    plain_state = lm.new_state()
    tokens = Generation(lm, plain_state, prompt, settings).run().token_ids
    state = lm.new_state()
    drafter = ScriptedDrafter(prompt + tokens, wrong_at=wrong_at)
    result = SpeculativeGeneration(lm, state, prompt, settings, draft_tokens=draft_tokens, drafter=drafter).run()
    assert result.token_ids == tokens
    assert result.speculation.accepted > 0
    assert_states_close(state, plain_state)


@pytest.mark.parametrize("max_new_tokens", [2, 3, 4, 5])
def test_answer_ending_inside_a_step_leaves_the_plain_state(lm, prompt, plain, max_new_tokens):
    """With 3 perfect drafts a step emits 4 tokens; the length limit cuts it after each of them."""
    tokens, _ = plain
    settings = GenerationSettings(max_new_tokens=max_new_tokens)
    state = lm.new_state()
    result = SpeculativeGeneration(lm, state, prompt, settings, draft_tokens=3,
                                   drafter=ScriptedDrafter(prompt + tokens)).run()
    expected_state = lm.new_state()
    expected = Generation(lm, expected_state, prompt, settings).run()
    assert result.token_ids == expected.token_ids == tokens[:max_new_tokens]
    assert state.seen_tokens == len(prompt) + max_new_tokens - 1
    assert_states_close(state, expected_state)


# Sampling: the acceptance rule keeps the target distribution


def test_acceptance_rule_reproduces_the_target_distribution():
    """Monte Carlo on a 5-token vocabulary: draw x ~ q, accept or resample; the output follows p.

    With 20,000 draws each frequency has a standard error below 0.0036; the tolerance is 0.015.
    """
    generator = torch.Generator().manual_seed(1234)
    p = torch.tensor([0.5, 0.2, 0.15, 0.1, 0.05])
    q = torch.tensor([0.1, 0.4, 0.0, 0.3, 0.2])
    draws = 20_000
    counts = torch.zeros(5)
    drafts = torch.multinomial(q, draws, replacement=True, generator=generator).tolist()
    for token in drafts:
        if accept_draft(p, q, token, generator):
            counts[token] += 1
        else:
            counts[int(torch.multinomial(residual_distribution(p, q, token), 1, generator=generator))] += 1
    assert (counts / draws - p).abs().max() < 0.015


def test_chain_of_two_drafts_keeps_each_position_distribution():
    """verify_sampled over two drafts: first emitted token ~ p0; given draft 1 accepted, second ~ p1."""
    generator = torch.Generator().manual_seed(99)
    p = torch.tensor([[0.6, 0.3, 0.1, 0.0], [0.1, 0.1, 0.2, 0.6], [0.25, 0.25, 0.25, 0.25]])
    q = torch.tensor([[0.2, 0.5, 0.2, 0.1], [0.4, 0.3, 0.2, 0.1]])
    first, second = torch.zeros(4), torch.zeros(4)
    draws = 10_000
    for _ in range(draws):
        drafts = [int(torch.multinomial(q[i], 1, generator=generator)) for i in range(2)]
        accepted, token = verify_sampled(drafts, lambda i: p[i], q, generator)
        emitted = drafts[:accepted] + [token]
        first[emitted[0]] += 1
        if accepted >= 1:
            second[emitted[1]] += 1
    # Standard errors: below 0.005 for the first token, below 0.007 for the ~6,000 second ones.
    assert (first / draws - p[0]).abs().max() < 0.02
    assert (second / second.sum() - p[1]).abs().max() < 0.03
    assert second.sum() > 5_000


def test_deterministic_drafts_under_sampling():
    """One-hot q (a drafter that does not sample): accept with probability p(x), else resample p without x."""
    generator = torch.Generator().manual_seed(7)
    p = torch.tensor([0.5, 0.3, 0.2])
    counts = torch.zeros(3)
    draws = 20_000
    for _ in range(draws):
        accepted, token = verify_sampled([1], lambda i: p, None, generator)
        counts[1 if accepted else token] += 1
    assert (counts / draws - p).abs().max() < 0.015


def test_seeded_speculative_sampling_reproduces(lm, prompt):
    sampling = SamplingParams(temperature=0.9, top_k=50, repetition_penalty=1.1, seed=5)
    settings = GenerationSettings(sampling=sampling, max_new_tokens=6)
    runs = []
    for _ in range(2):
        state = lm.new_state()
        result = SpeculativeGeneration(lm, state, prompt, settings, draft_tokens=2).run()
        assert state.seen_tokens == len(prompt) + len(result.token_ids) - 1
        runs.append(result)
    assert runs[0].token_ids == runs[1].token_ids
    assert runs[0].speculation.proposed > 0
