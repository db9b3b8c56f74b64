"""Qwen3.5 / Qwen3.6 checkpoints in the same runtime, against transformers' Qwen3_5ForConditionalGeneration
and Qwen3_5MoeForConditionalGeneration on random weights saved in the published layout.

Bounds, as tests/test_model_parity.py states them for Qwen3-Next (the kernels are the same):
* fp32 within FP32_REL_TOL of the logit scale: both sides compute the same function, only the
  summation order differs;
* bf16 within BF16_REL_TOL of transformers run in bf16, and no further from the fp32 logits than
  twice transformers' own bf16 run is (or BF16_REL_TOL): bf16 keeps 8 mantissa bits (~4e-3 per
  rounding) and errors add up over layers; how far bf16 drifts from fp32 on random weights depends
  on the CPU's matmul rounding, so that bound is relative to the reference's own drift;
* one-shot, chunked and resumed forwards within CONSISTENCY_REL_TOL (tests/test_model_state.py).
"""

from __future__ import annotations

import copy
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from kernels.quant import INT4, INT8, QuantizedWeight, dequantize, quantize_int4, quantize_int8
from model import checkpoint_layout as layout
from model import load_model
from model.quantize import quantize_checkpoint
from tests.oracle_qwen35 import CONFIGS, reference_logits, reference_model, write_qwen35_checkpoint
from tests.test_model_quantized import to_fp8_blocks

FP32_REL_TOL = 1e-4
BF16_REL_TOL = 5e-2
CONSISTENCY_REL_TOL = 2e-5
PROJECTIONS = re.compile(r"(in_proj_qkv|in_proj_z|out_proj|[qkvo]_proj|gate_proj|up_proj|down_proj|gate_up_proj)$")


def relative_error(ours: torch.Tensor, reference: torch.Tensor) -> float:
    return float((ours.float() - reference.float()).abs().max() / reference.float().abs().max())


def tokens(lm, length: int, batch: int = 1, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, lm.config.vocab_size, (batch, length), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def oracle(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp(request.param)
    reference = write_qwen35_checkpoint(folder, request.param)
    return request.param, folder, reference


@pytest.fixture(scope="module")
def moe_oracle(tmp_path_factory):
    folder = tmp_path_factory.mktemp("moe-odd")
    return folder, write_qwen35_checkpoint(folder, "moe-odd", seed=3)


# Parity with transformers


@pytest.mark.parametrize("length", [1, 37, 130], ids=lambda t: f"T{t}")
def test_fp32_logits_match_transformers(oracle, length):
    name, folder, reference = oracle
    lm = load_model(folder, dtype=torch.float32)
    assert lm.config.family == ("qwen3_5_moe" if CONFIGS[name]["moe"] else "qwen3_5")
    assert lm.config.tie_word_embeddings is CONFIGS[name]["tie"]
    ids = tokens(lm, length, batch=2, seed=length)
    ours = lm.forward(ids, lm.new_state(batch_size=2))
    assert ours.shape == (2, length, lm.config.vocab_size)
    assert relative_error(ours, reference_logits(reference, ids)) < FP32_REL_TOL


def test_bf16_stays_close(oracle):
    name, folder, reference = oracle
    lm = load_model(folder, dtype=torch.bfloat16)
    ids = tokens(lm, 70, seed=7)
    ours = lm.forward(ids, lm.new_state(), last_only=True)[:, -1]
    assert ours.dtype == torch.bfloat16
    exact = reference_logits(reference, ids)[:, -1]
    reference_bf16 = reference_logits(copy.deepcopy(reference).to(torch.bfloat16), ids)[:, -1]
    drift = relative_error(reference_bf16, exact)
    # Two bf16 runs agree within BF16_REL_TOL unless bf16 itself drifts further from fp32 (on the
    # random MoE configs a near-tie in the router flips an expert: transformers' own bf16 run is 14%
    # off fp32 on moe-odd), where no closer agreement between two bf16 runs is owed.
    assert relative_error(ours, reference_bf16) < max(BF16_REL_TOL, drift)
    assert relative_error(ours, exact) <= max(BF16_REL_TOL, 2 * drift)


def test_grouping_the_projections_is_what_makes_parity(moe_oracle, monkeypatch):
    """The check above would catch a wrong head order: concatenating in_proj_qkv and in_proj_z as
    they are (no regrouping per key head) moves the logits far past the fp32 bound."""
    folder, reference = moe_oracle
    ids = tokens(load_model(folder, dtype=torch.float32), 20, seed=1)
    monkeypatch.setattr(layout, "grouped_qkvz_rows", lambda config: torch.arange(
        2 * config.linear_num_key_heads * config.linear_key_head_dim
        + 2 * config.linear_num_value_heads * config.linear_value_head_dim))
    wrong = load_model(folder, dtype=torch.float32)
    assert relative_error(wrong.forward(ids, wrong.new_state()), reference_logits(reference, ids)) > 100 * FP32_REL_TOL


def test_text_only_mrope_is_plain_rope():
    """Interleaved multimodal RoPE with the same position on the temporal, height and width axes (text
    alone) gives exactly plain RoPE's tables, at the published head size and sections."""
    from transformers import Qwen3_5TextConfig
    from transformers.models.qwen3_5.modeling_qwen3_5 import Qwen3_5TextRotaryEmbedding

    from model import ModelConfig
    from model.rope import RotaryEmbedding

    rope = {"rope_type": "default", "rope_theta": 1e7, "partial_rotary_factor": 0.25,
            "mrope_section": [11, 11, 10], "mrope_interleaved": True}
    text = dict(head_dim=256, hidden_size=1024, num_attention_heads=8, rope_parameters=rope)
    reference = Qwen3_5TextRotaryEmbedding(Qwen3_5TextConfig(**text))
    ours = RotaryEmbedding(ModelConfig.from_dict({"model_type": "qwen3_5_text", **text}))
    assert ours.inv_freq.shape == (32,)
    positions = torch.cat([torch.arange(300), torch.tensor([4095, 65_535, 262_143])])
    cos, sin = reference(torch.zeros(1, dtype=torch.float32), positions[None, None].expand(3, 1, -1))
    our_cos, our_sin = ours.cos_sin(positions, torch.float32)
    assert torch.equal(our_cos, cos[0]) and torch.equal(our_sin, sin[0])


# State: one shot, chunks, saved and resumed


RESUME = """
import sys, torch
sys.path.insert(0, sys.argv[1])
from model import load_model
lm = load_model(sys.argv[2], dtype=torch.float32)
state = lm.load_state(sys.argv[3])
torch.save(lm.forward(torch.load(sys.argv[4]), state), sys.argv[5])
"""


@pytest.mark.parametrize("chunk", [1, 5, 64], ids=lambda c: f"chunk{c}")
def test_chunked_forward_equals_one_shot(moe_oracle, chunk):
    lm = load_model(moe_oracle[0], dtype=torch.float32)
    ids = tokens(lm, 150, batch=2)
    one_shot = lm.forward(ids, lm.new_state(2))
    state = lm.new_state(2)
    pieces = [lm.forward(ids[:, s:s + chunk], state) for s in range(0, ids.shape[1], chunk)]
    assert state.seen_tokens == 150
    assert relative_error(torch.cat(pieces, dim=1), one_shot) < CONSISTENCY_REL_TOL


def test_saved_state_resumes_in_a_fresh_process(moe_oracle, tmp_path):
    folder = moe_oracle[0]
    lm = load_model(folder, dtype=torch.float32)
    ids = tokens(lm, 120, seed=4)
    uninterrupted = lm.forward(ids, lm.new_state())[:, 70:]
    state = lm.new_state()
    lm.forward(ids[:, :70], state)
    state.save(tmp_path / "state.safetensors")
    torch.save(ids[:, 70:], tmp_path / "rest.pt")
    project = str(Path(__file__).resolve().parents[1])
    subprocess.run([sys.executable, "-c", RESUME, project, str(folder), str(tmp_path / "state.safetensors"),
                    str(tmp_path / "rest.pt"), str(tmp_path / "out.pt")], check=True, cwd=tmp_path)
    assert relative_error(torch.load(tmp_path / "out.pt"), uninterrupted) < CONSISTENCY_REL_TOL


# Other published layouts


@pytest.mark.parametrize("moe", [False, True], ids=["dense", "moe"])
def test_text_only_causal_lm_checkpoint_loads(tmp_path, moe):
    """`Qwen3_5ForCausalLM` / `Qwen3_5MoeForCausalLM`: text config at the top, no vision tower."""
    from transformers import Qwen3_5ForCausalLM, Qwen3_5MoeForCausalLM, Qwen3_5MoeTextConfig, Qwen3_5TextConfig

    name = "moe-odd" if moe else "dense-tied-odd"
    text = dict(CONFIGS[name]["text"], tie_word_embeddings=CONFIGS[name]["tie"])
    config_class, model_class = ((Qwen3_5MoeTextConfig, Qwen3_5MoeForCausalLM) if moe
                                 else (Qwen3_5TextConfig, Qwen3_5ForCausalLM))
    torch.manual_seed(2)
    reference = model_class(config_class(**text)).eval()
    with torch.no_grad():
        for param in reference.parameters():
            param.add_(torch.randn_like(param) * max(float(param.std()), 0.05))
    reference.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["model_type"].endswith("_text")
    lm = load_model(tmp_path, dtype=torch.float32)
    ids = tokens(lm, 40, batch=2, seed=5)
    assert relative_error(lm.forward(ids, lm.new_state(2)), reference_logits(reference, ids)) < FP32_REL_TOL


def test_fused_experts_load_like_per_expert_tensors(moe_oracle, tmp_path):
    """The bf16 MoE releases store each layer's experts as two stacked tensors."""
    folder = moe_oracle[0]
    tensors = load_file(str(folder / "model.safetensors"))
    pattern = re.compile(r"^(.+\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")
    grouped: dict[str, dict[str, dict[int, torch.Tensor]]] = {}
    for name in [n for n in tensors if pattern.match(n)]:
        prefix, expert, projection = pattern.match(name).groups()
        grouped.setdefault(prefix, {}).setdefault(projection, {})[int(expert)] = tensors.pop(name)
    for prefix, parts in grouped.items():
        count = len(parts["down_proj"])
        tensors[f"{prefix}.gate_up_proj"] = torch.stack(
            [torch.cat([parts["gate_proj"][e], parts["up_proj"][e]]) for e in range(count)])
        tensors[f"{prefix}.down_proj"] = torch.stack([parts["down_proj"][e] for e in range(count)])
    fused = tmp_path / "fused"
    fused.mkdir()
    save_file(tensors, str(fused / "model.safetensors"))
    (fused / "config.json").write_text((folder / "config.json").read_text())
    a, b = load_model(folder, dtype=torch.float32), load_model(fused, dtype=torch.float32)
    ids = tokens(a, 30, seed=6)
    assert torch.equal(a.forward(ids, a.new_state()), b.forward(ids, b.new_state()))


def test_incomplete_projection_pair_is_refused(moe_oracle, tmp_path):
    from model import LoadError

    folder = moe_oracle[0]
    tensors = load_file(str(folder / "model.safetensors"))
    del tensors["model.language_model.layers.1.linear_attn.in_proj_z.weight"]
    (tmp_path / "config.json").write_text((folder / "config.json").read_text())
    save_file(tensors, str(tmp_path / "model.safetensors"))
    with pytest.raises(LoadError, match=r"layers\.1\.linear_attn\.in_proj_qkv"):
        load_model(tmp_path, dtype=torch.float32)


# Quantized weights


def quantized_on_load(name: str, param: torch.Tensor) -> bool:
    """Whether `load_model(..., weights=...)` quantizes this transformers parameter to the asked format
    (lm_head, quantized to int8 whatever is asked, is apart: see `on_load_exact`)."""
    return (param.dim() >= 2 and "visual" not in name and "shared_expert_gate" not in name
            and PROJECTIONS.search(name.removesuffix(".weight")) is not None)


def on_load_exact(name: str, param: torch.Tensor) -> torch.Tensor | None:
    """The exact values `load_model(..., weights="int4")` holds for a transformers parameter, or None
    where it keeps the parameter as it is."""
    if name == "lm_head.weight":
        return dequantize(quantize_int8(param))
    return dequantize(quantize_int4(param)) if quantized_on_load(name, param) else None


def test_int4_on_load_matches_transformers_on_the_dequantized_weights(moe_oracle):
    folder, reference = moe_oracle
    lm = load_model(folder, dtype=torch.float32, weights="int4")
    grouped = lm.module.model.layers[1].linear_attn.in_proj_qkvz.weight
    assert isinstance(grouped, QuantizedWeight) and grouped.format == INT4
    assert isinstance(lm.module.lm_head.weight, QuantizedWeight) and lm.module.lm_head.weight.format == INT8
    exact = copy.deepcopy(reference)
    assert not exact.config.tie_word_embeddings  # lm_head's values replaced below are its own
    with torch.no_grad():
        for name, param in exact.named_parameters():
            value = on_load_exact(name, param)
            if value is not None:
                param.copy_(value)
    ids = tokens(lm, 40, batch=2)
    assert relative_error(lm.forward(ids, lm.new_state(2)), reference_logits(exact, ids)) < FP32_REL_TOL


def test_int4_checkpoint_keeps_the_separate_projections_quantized(moe_oracle, tmp_path):
    """`python -m model.quantize` writes in_proj_qkv and in_proj_z as int4; loading gathers their
    rows without dequantizing, bit for bit the model quantized while loading. The vision tower,
    which this runtime does not run, is left as it was."""
    folder = moe_oracle[0]
    quantize_checkpoint(folder, tmp_path / "q", "int4")
    written = json.loads((tmp_path / "q" / "model.safetensors.index.json").read_text())["weight_map"]
    vision = [name for name in written if name.startswith("model.visual.")]
    assert any(name.endswith("proj.weight") for name in vision)  # the vision tower is copied as stored
    assert not any(name.endswith("weight_packed") for name in vision)
    saved = load_model(tmp_path / "q", dtype=torch.float32)
    on_load = load_model(folder, dtype=torch.float32, weights="int4")
    assert isinstance(saved.module.model.layers[1].linear_attn.in_proj_qkvz.weight, QuantizedWeight)
    assert saved.parameter_bytes() == on_load.parameter_bytes()
    ids = tokens(saved, 30)
    assert torch.equal(saved.forward(ids, saved.new_state()), on_load.forward(ids, on_load.new_state()))


def test_int4_checkpoint_of_fused_experts_holds_them_per_expert(tmp_path):
    """A MoE checkpoint with fused experts (the bf16 releases) quantizes expert by expert."""
    from kernels.quant import QuantizedRows
    from model.demo import write_demo_checkpoint

    folder = write_demo_checkpoint(tmp_path / "moe", seed=2, family="qwen3_5_moe", tokenizer=False)
    quantize_checkpoint(folder, tmp_path / "q", "int4")
    index = json.loads((tmp_path / "q" / "model.safetensors.index.json").read_text())["weight_map"]
    assert "model.language_model.layers.0.mlp.experts.7.up_proj.weight_packed" in index
    assert "mtp.layers.0.mlp.experts.0.gate_proj.weight_packed" in index  # the MTP block's experts too
    saved = load_model(tmp_path / "q", dtype=torch.float32)
    assert isinstance(saved.module.model.layers[0].mlp.experts.gate_up_proj, QuantizedRows)
    on_load = load_model(folder, dtype=torch.float32, weights="int4")
    ids = tokens(saved, 30)
    assert torch.equal(saved.forward(ids, saved.new_state()), on_load.forward(ids, on_load.new_state()))


def test_fp8_checkpoint_keeps_the_grouped_projection_in_fp8(tmp_path):
    """Official FP8 layout on the published head dims (128): the regrouped rows move whole 128-row
    blocks, so in_proj_qkvz stays FP8; logits equal transformers on the exact dequantized weights."""
    reference = reference_model("published-heads", seed=4)
    reference.save_pretrained(tmp_path / "source")
    tensors = load_file(str(tmp_path / "source" / "model.safetensors"))
    fp8 = {}
    with torch.no_grad():
        for name, param in reference.named_parameters():
            stored = name if name in tensors else None
            if stored and param.dim() == 2 and quantized_on_load(name, param):
                data, scale = to_fp8_blocks(param)
                fp8[stored], fp8[stored.removesuffix(".weight") + ".weight_scale_inv"] = data, scale
                expanded = scale.repeat_interleave(128, 0).repeat_interleave(128, 1)
                param.copy_(data.float() * expanded[: data.shape[0], : data.shape[1]])
    tensors.update(fp8)
    (tmp_path / "fp8").mkdir()
    save_file(tensors, str(tmp_path / "fp8" / "model.safetensors"))
    config = json.loads((tmp_path / "source" / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [128, 128]}
    (tmp_path / "fp8" / "config.json").write_text(json.dumps(config))
    lm = load_model(tmp_path / "fp8", dtype=torch.float32)
    grouped = lm.module.model.layers[0].linear_attn.in_proj_qkvz.weight
    assert isinstance(grouped, QuantizedWeight) and grouped.format == "fp8_block"
    ids = tokens(lm, 24, batch=2)
    assert relative_error(lm.forward(ids, lm.new_state(2)), reference_logits(reference, ids)) < FP32_REL_TOL


@pytest.mark.parametrize("fmt", ["int8", "int4", "fp8", "fp8-misaligned"])
def test_gathered_rows_equal_the_gathered_dequantized_rows(fmt):
    from kernels.quant import quantize_int8

    generator = torch.Generator().manual_seed(0)
    rows = 200 if fmt == "fp8-misaligned" else 256
    parts = [torch.randn(rows, 300, generator=generator), torch.randn(128, 300, generator=generator)]
    if fmt.startswith("fp8"):
        quantized = [QuantizedWeight("fp8_block", *to_fp8_blocks(p), tuple(p.shape)) for p in parts]
    else:
        quantized = [(quantize_int8 if fmt == "int8" else quantize_int4)(p) for p in parts]
    total = rows + 128
    order = torch.cat([torch.arange(rows, total), torch.arange(0, rows)])
    gathered = layout.gather_rows(quantized, order)
    expected = torch.cat([dequantize(q) for q in quantized])[order]
    if fmt == "fp8-misaligned":
        assert isinstance(gathered, torch.Tensor)  # blocks cannot move whole: exact fp32 values instead
    else:
        assert isinstance(gathered, QuantizedWeight) and gathered.format == quantized[0].format
        gathered = dequantize(gathered)
    assert torch.equal(gathered, expected)
