"""The runtime against transformers' Qwen3-Next on random weights, loaded through our loader."""

from __future__ import annotations

import contextlib

import pytest
import torch
import torch.nn.functional as F

from kernels.native import native_bf16_matmul
from kernels.widened import widened_linear
from model import load_model
from tests.oracle import CONFIGS, rewrite_config_old_spelling, write_oracle_checkpoint

# fp32: both sides compute the same function; differences are summation order only.
FP32_REL_TOL = 1e-4
# bf16 weights and activations: bf16 keeps 8 mantissa bits (~4e-3 per rounding) and errors add over
# layers; 5e-2 of the logit scale is the bound we hold to against the oracle run in bf16 too.
BF16_REL_TOL = 5e-2


def relative_error(ours: torch.Tensor, reference: torch.Tensor) -> float:
    return float((ours.float() - reference.float()).abs().max() / reference.float().abs().max())


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def oracle(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp(request.param)
    reference = write_oracle_checkpoint(folder, request.param)
    return request.param, folder, reference


def reference_logits(reference, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return reference(ids).logits


@pytest.mark.parametrize("length", [1, 37, 130], ids=lambda t: f"T{t}")
def test_fp32_logits_match_transformers(oracle, length):
    name, folder, reference = oracle
    lm = load_model(folder, dtype=torch.float32)
    vocab = lm.config.vocab_size
    ids = torch.randint(0, vocab, (2, length), generator=torch.Generator().manual_seed(length))
    ours = lm.forward(ids, lm.new_state(batch_size=2))
    assert ours.shape == (2, length, vocab)
    assert relative_error(ours, reference_logits(reference, ids)) < FP32_REL_TOL


@contextlib.contextmanager
def bf16_linear_layers_as_ours():
    """Within the block, bf16 linear layers multiply as this runtime's do on a CPU without bf16
    products (kernels.widened.widened_linear, whose own fp32 products pass through); elsewhere as they are."""
    if native_bf16_matmul():
        yield
        return
    plain = F.linear

    def widened(x, weight, bias=None):
        if x.dtype != torch.bfloat16:
            return plain(x, weight, bias)
        return widened_linear(x, weight.shape[0], lambda start, stop: weight[start:stop], bias)

    F.linear = widened
    try:
        yield
    finally:
        F.linear = plain


def test_bf16_stays_close(oracle):
    """Against transformers in bf16 within BF16_REL_TOL, and no further from its fp32 logits than its own
    bf16 run is (up to twice that, or BF16_REL_TOL): how far bf16 drifts from fp32 on random weights
    depends on the CPU's matmul rounding (on one machine transformers' own bf16 run is 0.17 away at
    70 tokens of the YaRN model), so the fp32 bound is taken relative to it. Where the CPU has no bf16
    products transformers' linear layers take this runtime's arithmetic: otherwise a one-ulp difference
    in a product can flip a near-tie of the router on one side only (0.17 at the last of the YaRN
    model's 70 tokens, with oneDNN's bf16 GEMM on AVX-512 without BF16 against fp32 products; either
    arithmetic shows such a spike at some position)."""
    import copy

    name, folder, reference = oracle
    lm = load_model(folder, dtype=torch.bfloat16)
    ids = torch.randint(0, lm.config.vocab_size, (1, 70), generator=torch.Generator().manual_seed(7))
    ours = lm.forward(ids, lm.new_state(), last_only=True)[:, -1]
    assert ours.dtype == torch.bfloat16
    exact = reference_logits(reference, ids)[:, -1]
    with bf16_linear_layers_as_ours():
        reference_bf16 = reference_logits(copy.deepcopy(reference).to(torch.bfloat16), ids)[:, -1]
    assert relative_error(ours, reference_bf16) < BF16_REL_TOL
    assert relative_error(ours, exact) <= max(BF16_REL_TOL, 2 * relative_error(reference_bf16, exact))


def test_old_config_spelling_loads_the_same_model(oracle, tmp_path):
    name, folder, reference = oracle
    import shutil

    copy = tmp_path / "old"
    shutil.copytree(folder, copy)
    rewrite_config_old_spelling(copy)
    new = load_model(folder, dtype=torch.float32)
    old = load_model(copy, dtype=torch.float32)
    assert old.config.rope == new.config.rope
    ids = torch.randint(0, new.config.vocab_size, (1, 19), generator=torch.Generator().manual_seed(3))
    assert torch.equal(old.forward(ids, old.new_state()), new.forward(ids, new.new_state()))
