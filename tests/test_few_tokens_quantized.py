"""The few-token forward with weights held quantized (official FP8 blocks, int8, int4) against the
module path on the same weights, under each kernel build this CPU runs.

Both take the same kernels on the same values (the quantized small-row kernel for every quantized
projection, the quantized MoE block kernel for every MoE layer), so logits and every state tensor
must be equal bit for bit. A token's bits must also not depend on how many tokens share its call or
on the thread count: speculative decoding verifies drafts in one call and keeps what a decode step
would have produced.
"""

from __future__ import annotations

import pytest
import torch

from bench.fp8_checkpoint import write_fp8_checkpoint
from kernels.quant import QuantizedRows, QuantizedWeight, quantize_int4
from kernels.quant import moe_native as quant_moe
from kernels.quant import native as quant_native
from model import load_model, prefill
from model.demo import write_demo_checkpoint
from model.few_tokens import MAX_TOKENS, FewTokenForward
from model.layers import SparseMoE
from tests.conftest import NATIVE_KERNELS
from tests.test_few_tokens import assert_same_bits, ids, run

# Expert widths 72 and 136: partial 128-row fp8 blocks and int4 groups, odd kernel tails.
ODD_WIDTHS = {"moe_intermediate_size": 72, "shared_expert_intermediate_size": 136}
CHECKPOINTS = {
    "demo": lambda folder: write_demo_checkpoint(folder, seed=3),
    "odd-widths": lambda folder: write_demo_checkpoint(folder, seed=4, config_overrides=ODD_WIDTHS),
    "qwen3_5-moe": lambda folder: write_demo_checkpoint(folder, seed=7, family="qwen3_5_moe", tokenizer=False),
}
CASES = [(name, weights) for name in CHECKPOINTS for weights in ("fp8", "int8", "int4")]
FORMAT_NAMES = {"fp8": "fp8_block", "int8": "int8", "int4": "int4"}


@pytest.fixture(scope="module", params=CASES, ids=[f"{name}-{weights}" for name, weights in CASES])
def lm(request, tmp_path_factory):
    name, weights = request.param
    folder = tmp_path_factory.mktemp(name)
    CHECKPOINTS[name](folder)
    if weights == "fp8":
        model = load_model(write_fp8_checkpoint(folder, tmp_path_factory.mktemp(f"{name}-fp8")), dtype=torch.bfloat16)
    else:
        model = load_model(folder, dtype=torch.bfloat16, weights=weights)
    assert FORMAT_NAMES[weights] in model.weight_formats
    if model.few_tokens is None:
        pytest.skip(f"the few-token forward needs {NATIVE_KERNELS}")
    return model


def test_quantized_weights_take_the_quantized_kernels(lm):
    """No quantized weight falls back: every quantized projection and every MoE block is a native call
    over the module's own weights (a projection the loader had to dequantize, as FP8 in_proj_qkvz
    regrouped per key head, stays bf16)."""
    bound = 0
    for layer, module_layer in zip(lm.few_tokens.layers, lm.module.model.layers, strict=True):
        mixer = module_layer.linear_attn if layer.is_linear else module_layer.self_attn
        names = ("in_proj_qkvz", "out_proj") if layer.is_linear else ("q_proj", "k_proj", "v_proj", "o_proj")
        calls = (layer.mixer.qkvz, layer.mixer.out) if layer.is_linear else (
            layer.mixer.q, layer.mixer.k, layer.mixer.v, layer.mixer.o)
        for name, call in zip(names, calls, strict=True):
            weight = getattr(mixer, name).weight
            if isinstance(weight, QuantizedWeight):
                assert isinstance(call, quant_native.BoundWeight) and call.weight is weight, name
                bound += 1
        if isinstance(module_layer.mlp, SparseMoE):
            assert isinstance(layer.moe, quant_moe.QuantizedMoE)
            assert layer.moe is module_layer.mlp.quantized_block(), "the module path runs the same block"
    assert bound >= len(lm.few_tokens.layers)


def test_decode_steps_and_verification_chunks_equal_the_module_path(lm, native_isa):
    base = lm.new_state()
    prefill(lm, base, ids(lm, 45, seed=1)[0][0])
    assert_same_bits(lm, base, ids(lm, 1, 1, 7, 1, MAX_TOKENS, 2, seed=2))


def test_cache_growth_from_an_empty_state(lm, native_isa):
    assert_same_bits(lm, lm.new_state(), ids(lm, *([MAX_TOKENS] * 3), 3, seed=3))


def test_a_tokens_bits_do_not_depend_on_the_call_or_the_threads(lm, native_isa):
    """A chunk of drafts verified in one call gives each token the logits its own decode step gives,
    over one thread or two."""
    base = lm.new_state()
    prefill(lm, base, ids(lm, 30, seed=4)[0][0])
    drafts = ids(lm, 9, seed=5)[0]
    verified = run(lm, True, base.clone(), [drafts])[0]
    threads = torch.get_num_threads()
    for count in (1, 2):
        torch.set_num_threads(count)
        try:
            stepped = run(lm, True, base.clone(), [drafts[:, i : i + 1] for i in range(drafts.shape[1])])
        finally:
            torch.set_num_threads(threads)
        assert torch.equal(torch.cat(stepped, dim=1), verified), f"{count} thread(s)"


def test_a_weight_the_kernels_cannot_read_leaves_the_model_on_the_module_path(tmp_path):
    """A projection held as QuantizedRows (the loader makes those for experts only) or int4 groups
    that would straddle a kernel step: no fast path, rather than a wrong one."""
    write_demo_checkpoint(tmp_path, seed=3)
    model = load_model(tmp_path, dtype=torch.bfloat16, weights="int8")
    if model.few_tokens is None:
        pytest.skip(f"the few-token forward needs {NATIVE_KERNELS}")
    projection = model.module.model.layers[0].linear_attn.out_proj
    weight, half = projection.weight, projection.weight.shape[0] // 2
    projection.weight = QuantizedRows(tuple(
        QuantizedWeight(weight.format, weight.data[rows], weight.scale[rows], (half, weight.shape[1]))
        for rows in (slice(0, half), slice(half, None))))
    assert FewTokenForward.build(model.module, model.config) is None
    projection.weight = quantize_int4(torch.randn(weight.shape), group_size=48)
    assert FewTokenForward.build(model.module, model.config) is None
    projection.weight = weight
    assert FewTokenForward.build(model.module, model.config) is not None
