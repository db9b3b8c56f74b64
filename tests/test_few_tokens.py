"""The few-token forward (decode steps, draft verification) against the module path it replaces.

Both run the same kernels in the same order on the same values, so logits and every state tensor
must be equal bit for bit, through K/V growth, multi-token calls and dense MLP layers alike.
"""

from __future__ import annotations

import threading

import pytest
import torch

from model import load_model, prefill
from model.demo import write_demo_checkpoint
from model.few_tokens import MAX_TOKENS, FewTokenForward
from tests.conftest import NATIVE_KERNELS
from tests.oracle import write_oracle_checkpoint

CHECKPOINTS = {
    "demo": lambda folder: write_demo_checkpoint(folder, seed=3),
    "dense-layer": lambda folder: write_demo_checkpoint(folder, seed=4, config_overrides={"mlp_only_layers": [1]}),
    "yarn-oracle": lambda folder: write_oracle_checkpoint(folder, "yarn", seed=5) and folder,
    # Qwen3.5 layouts: separate projections regrouped on load, tied embeddings / fused experts.
    "qwen3_5": lambda folder: write_demo_checkpoint(folder, seed=6, family="qwen3_5", tokenizer=False),
    "qwen3_5-moe": lambda folder: write_demo_checkpoint(folder, seed=7, family="qwen3_5_moe", tokenizer=False),
}


@pytest.fixture(scope="module", params=sorted(CHECKPOINTS))
def lm(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp(request.param)
    CHECKPOINTS[request.param](folder)
    model = load_model(folder, dtype=torch.bfloat16)
    if model.few_tokens is None:
        pytest.skip(f"the few-token forward needs {NATIVE_KERNELS}")
    return model


def run(lm, fast: bool, state, calls: list[torch.Tensor]) -> list[torch.Tensor]:
    path = lm.few_tokens
    lm.few_tokens = path if fast else None
    try:
        return [lm.forward(ids, state) for ids in calls]
    finally:
        lm.few_tokens = path


def assert_same_bits(lm, base, calls):
    fast_state, module_state = base.clone(), base.clone()
    fast, module = run(lm, True, fast_state, calls), run(lm, False, module_state, calls)
    for ours, expected in zip(fast, module, strict=True):
        assert torch.equal(ours, expected)
    assert fast_state.seen_tokens == module_state.seen_tokens
    ours, expected = fast_state.layer_tensors(), module_state.layer_tensors()
    assert ours.keys() == expected.keys()
    for name in expected:
        assert torch.equal(ours[name], expected[name]), name


def ids(lm, *lengths: int, seed: int = 0) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(0, lm.config.vocab_size, (1, n), generator=generator) for n in lengths]


def test_decode_steps_and_verification_chunks_equal_the_module_path(lm):
    base = lm.new_state()
    prefill(lm, base, ids(lm, 45, seed=1)[0][0])
    assert_same_bits(lm, base, ids(lm, 1, 1, 1, 7, 1, MAX_TOKENS, 2, seed=2))


def test_cache_growth_from_an_empty_state(lm):
    """Sixteen-token calls from a fresh state pass the initial K/V capacity and grow it."""
    base = lm.new_state()
    assert_same_bits(lm, base, ids(lm, *([MAX_TOKENS] * 17), 3, seed=3))


def test_other_calls_take_the_module_path(lm):
    with torch.inference_mode():
        assert lm.few_tokens.takes(torch.zeros(1, MAX_TOKENS, dtype=torch.long))
        assert not lm.few_tokens.takes(torch.zeros(1, MAX_TOKENS + 1, dtype=torch.long))
        assert not lm.few_tokens.takes(torch.zeros(2, 1, dtype=torch.long))
    assert not lm.few_tokens.takes(torch.zeros(1, 1, dtype=torch.long)), "autograd wants the module path"
    state = lm.new_state(batch_size=2)
    logits = lm.forward(torch.zeros(2, 3, dtype=torch.long), state)
    assert logits.shape == (2, 3, lm.config.vocab_size) and torch.isfinite(logits).all()


def test_models_the_kernels_cannot_take_have_no_fast_path(tmp_path):
    write_oracle_checkpoint(tmp_path, "odd-shapes", seed=6)  # head dim 24: not a multiple of 16
    model = load_model(tmp_path, dtype=torch.bfloat16)
    assert model.few_tokens is None
    assert FewTokenForward.build(load_model(tmp_path, dtype=torch.float32).module, model.config) is None


def test_threads_sharing_the_model_get_the_results_they_would_alone(lm):
    """The fast path's buffers are shared by every caller of the model: concurrent calls must not mix."""
    bases = []
    for seed in (7, 8):
        state = lm.new_state()
        prefill(lm, state, ids(lm, 30, seed=seed)[0][0])
        bases.append(state)
    calls = [ids(lm, *([1] * 12), 5, seed=seed) for seed in (9, 10)]
    alone = [run(lm, True, base.clone(), call) for base, call in zip(bases, calls, strict=True)]
    together: list = [None, None]

    def decode(i: int) -> None:
        together[i] = [lm.forward(x, state) for state in [bases[i].clone()] for x in calls[i]]

    threads = [threading.Thread(target=decode, args=(i,)) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for ours, expected in zip(together, alone, strict=True):
        assert all(torch.equal(a, b) for a, b in zip(ours, expected, strict=True))
