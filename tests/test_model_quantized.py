"""Quantized checkpoints and quantize-on-load against transformers on the same (dequantized) weights.

* Official FP8 layout: our fp32 logits equal transformers run on the exactly dequantized weights
  within FP32_REL_TOL, the bound of the unquantized parity tests (only summation order differs).
* int8 / int4 on load: the same against transformers on dequantize(quantize(w)), within FP32_REL_TOL.
* Against the unquantized fp32 model (relative RMS of the logits): round-to-nearest moves each
  weight by at most half a step, 1/254 of its row's largest weight for int8 (about bf16's 2^-9
  relative rounding), so int8 logits stay as close to fp32 as the bf16 model's are (bound:
  INT8_VS_BF16 times the bf16 model's distance; measured 0.98x-0.93x). An int4 step is max/7 of a
  128-column group, 15-18 times an int8 step on these weights, and the logits move about as much
  more (bound: INT4_VS_INT8 times the int8 distance; measured 16x and 6x). These random models are
  far more sensitive than trained ones (their int4 top-1 agreement is only 30-60 %), which is why
  the bounds are relative to bf16, not absolute.
"""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from model import LoadError, load_model
from model.quantize import quantize_checkpoint
from tests.oracle import CONFIGS, write_oracle_checkpoint

FP32_REL_TOL = 1e-4
CONSISTENCY_REL_TOL = 2e-5
INT8_VS_BF16 = 1.5
INT4_VS_INT8 = 25.0
FP8_MAX = 448.0
# Weights the official FP8 checkpoints keep in bf16 (besides everything that is not a 2-D weight).
FP8_KEPT = ("lm_head", "embed_tokens", "in_proj_ba", "mlp.gate.", "shared_expert_gate", "norm", "conv1d")

# Widths past one 128-block with partial last blocks (hidden 160, expert width 72 ...).
FP8_CONFIG = dict(
    CONFIGS["odd-shapes"], hidden_size=160, moe_intermediate_size=72, shared_expert_intermediate_size=136,
    intermediate_size=200, head_dim=40, num_attention_heads=4, num_key_value_heads=2,
)


def relative_error(ours: torch.Tensor, reference: torch.Tensor) -> float:
    return float((ours.float() - reference.float()).abs().max() / reference.float().abs().max())


def relative_rms(ours: torch.Tensor, reference: torch.Tensor) -> float:
    return float((ours.float() - reference.float()).norm() / reference.float().norm())


def fp8_converted(name: str, tensor: torch.Tensor) -> bool:
    return tensor.dim() == 2 and name.endswith(".weight") and not any(k in name for k in FP8_KEPT)


def to_fp8_blocks(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Official block quantization: scale_inv = max |block| / 448 per 128 x 128 block."""
    rows, columns = weight.shape
    blocks = (-(-rows // 128), -(-columns // 128))
    padded = torch.nn.functional.pad(weight.float(), (0, blocks[1] * 128 - columns, 0, blocks[0] * 128 - rows))
    tiles = padded.view(blocks[0], 128, blocks[1], 128)
    scale = (tiles.abs().amax(dim=(1, 3)) / FP8_MAX).clamp(min=1e-12)
    expanded = scale.repeat_interleave(128, 0).repeat_interleave(128, 1)[:rows, :columns]
    return (weight.float() / expanded).to(torch.float8_e4m3fn), scale


def write_fp8_checkpoint(source: Path, target: Path, dequantized: Path) -> None:
    """``target``: the official FP8 layout of ``source``; ``dequantized``: its exact fp32 values."""
    tensors = load_file(str(source / "model.safetensors"))
    fp8, exact = {}, {}
    for name, tensor in tensors.items():
        if fp8_converted(name, tensor):
            data, scale = to_fp8_blocks(tensor)
            fp8[name], fp8[name.removesuffix(".weight") + ".weight_scale_inv"] = data, scale
            expanded = scale.repeat_interleave(128, 0).repeat_interleave(128, 1)
            exact[name] = data.float() * expanded[: data.shape[0], : data.shape[1]]
        else:
            fp8[name] = exact[name] = tensor
    for folder, weights in ((target, fp8), (dequantized, exact)):
        folder.mkdir()
        save_file(weights, str(folder / "model.safetensors"), metadata={"format": "pt"})
        config = json.loads((source / "config.json").read_text())
        if folder == target:
            config["quantization_config"] = {
                "quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                "weight_block_size": [128, 128], "modules_to_not_convert": list(FP8_KEPT),
            }
        (folder / "config.json").write_text(json.dumps(config))


def transformers_logits(folder: Path, ids: torch.Tensor) -> torch.Tensor:
    from transformers import Qwen3NextForCausalLM

    model = Qwen3NextForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(ids).logits


def ids_for(lm, length=40, batch=2, seed=0):
    return torch.randint(0, lm.config.vocab_size, (batch, length), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def fp8_folders(tmp_path_factory):
    from transformers import Qwen3NextConfig
    from transformers import Qwen3NextForCausalLM as Reference

    root = tmp_path_factory.mktemp("fp8")
    torch.manual_seed(5)
    reference = Reference(Qwen3NextConfig(**FP8_CONFIG)).eval()
    with torch.no_grad():
        for param in reference.parameters():
            param.add_(torch.randn_like(param) * 0.05)
    reference.save_pretrained(root / "source")
    write_fp8_checkpoint(root / "source", root / "fp8", root / "dequantized")
    return root


def test_fp8_checkpoint_stays_fp8_and_matches_transformers_on_its_exact_values(fp8_folders):
    lm = load_model(fp8_folders / "fp8", dtype=torch.float32)
    assert "fp8_block" in lm.weight_formats
    ids = ids_for(lm)
    ours = lm.forward(ids, lm.new_state(2))
    assert relative_error(ours, transformers_logits(fp8_folders / "dequantized", ids)) < FP32_REL_TOL


@pytest.mark.parametrize("weights", ["int8", "int4"])
def test_fp8_checkpoint_requantized_on_load(fp8_folders, weights):
    lm = load_model(fp8_folders / "fp8", dtype=torch.float32, weights=weights)
    assert weights in lm.weight_formats and "fp8_block" not in lm.weight_formats


@pytest.fixture(scope="module")
def oracle_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("oracle")
    write_oracle_checkpoint(folder, "odd-shapes", seed=3)
    return folder


def dequantized_copy(lm, source: Path, target: Path) -> None:
    """``source`` with every weight the model holds quantized replaced by its exact dequantization."""
    from kernels.quant import QuantizedRows, QuantizedWeight, dequantize
    from model.loader import checkpoint_tensors

    tensors = load_file(str(source / "model.safetensors"))
    exact = {}
    for module_name, module in lm.module.named_modules():
        for leaf, value in vars(module).items():
            if isinstance(value, QuantizedRows):
                exact[f"{module_name}.{leaf}"] = torch.cat([dequantize(p) for p in value.parts], dim=-2)
            elif isinstance(value, QuantizedWeight):
                exact[f"{module_name}.{leaf}"] = dequantize(value)
    fake = torch.nn.Module()
    for name, value in exact.items():
        owner = fake
        for part in name.split(".")[:-1]:
            if not hasattr(owner, part):
                owner.add_module(part, torch.nn.Module())
            owner = getattr(owner, part)
        owner.register_parameter(name.split(".")[-1], torch.nn.Parameter(value, requires_grad=False))
    tensors.update(checkpoint_tensors(fake, lm.config))
    target.mkdir()
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(target / "model.safetensors"))
    (target / "config.json").write_text((source / "config.json").read_text())


@pytest.mark.parametrize("weights", ["int8", "int4"])
def test_quantized_on_load_matches_transformers_on_the_same_values(oracle_folder, tmp_path, weights):
    lm = load_model(oracle_folder, dtype=torch.float32, weights=weights)
    assert weights in lm.weight_formats
    ids = ids_for(lm)
    ours = lm.forward(ids, lm.new_state(2))
    dequantized_copy(lm, oracle_folder, tmp_path / "exact")
    assert relative_error(ours, transformers_logits(tmp_path / "exact", ids)) < FP32_REL_TOL


def test_quantized_logits_stay_within_the_stated_distance_of_the_unquantized_model(oracle_folder):
    ids = ids_for(load_model(oracle_folder, dtype=torch.float32))

    def logits(**options):
        lm = load_model(oracle_folder, **options)
        return lm.forward(ids, lm.new_state(2)).float()

    exact = logits(dtype=torch.float32)
    bf16 = relative_rms(logits(dtype=torch.bfloat16), exact)
    int8 = relative_rms(logits(dtype=torch.float32, weights="int8"), exact)
    int4 = relative_rms(logits(dtype=torch.float32, weights="int4"), exact)
    assert 0 < int8 <= INT8_VS_BF16 * bf16
    assert int8 < int4 <= INT4_VS_INT8 * int8


@pytest.mark.parametrize("weights", ["fp8", "int8", "int4"])
def test_chunked_and_resumed_forwards_agree_in_every_format(fp8_folders, oracle_folder, tmp_path, weights):
    lm = (load_model(fp8_folders / "fp8", dtype=torch.float32) if weights == "fp8"
          else load_model(oracle_folder, dtype=torch.float32, weights=weights))
    ids = ids_for(lm, length=70)
    one_shot = lm.forward(ids, lm.new_state(2))
    state = lm.new_state(2)
    pieces = [lm.forward(ids[:, s : s + 9], state) for s in range(0, 54, 9)]
    state.save(tmp_path / "state.safetensors")
    rest = lm.forward(ids[:, 54:], lm.load_state(tmp_path / "state.safetensors"))
    assert relative_error(torch.cat([*pieces, rest], dim=1), one_shot) < CONSISTENCY_REL_TOL


@pytest.mark.parametrize("weights", ["int8", "int4"])
def test_saved_quantized_checkpoint_loads_bit_for_bit_like_quantizing_on_load(oracle_folder, tmp_path, weights):
    quantize_checkpoint(oracle_folder, tmp_path / "q", weights, shard_bytes=64 * 1024)
    assert len(list((tmp_path / "q").glob("model-*.safetensors"))) > 1
    saved = load_model(tmp_path / "q", dtype=torch.float32)
    on_load = load_model(oracle_folder, dtype=torch.float32, weights=weights)
    assert saved.parameter_bytes() == on_load.parameter_bytes()
    ids = ids_for(saved)
    assert torch.equal(saved.forward(ids, saved.new_state(2)), on_load.forward(ids, on_load.new_state(2)))


def test_a_compressed_tensors_checkpoint_declares_what_the_ecosystem_reads(oracle_folder, tmp_path):
    quantize_checkpoint(oracle_folder, tmp_path / "q", "int4")
    config = json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]
    assert (config["quant_method"], config["format"]) == ("compressed-tensors", "pack-quantized")
    assert config["config_groups"]["group_0"]["weights"] == {
        "num_bits": 4, "type": "int", "symmetric": True, "strategy": "group", "group_size": 128}
    tensors = {}
    for shard in (tmp_path / "q").glob("model-*.safetensors"):
        tensors.update(load_file(str(shard)))
    name = "model.layers.1.linear_attn.out_proj"
    assert tensors[f"{name}.weight_packed"].dtype == torch.int32
    source = load_file(str(oracle_folder / "model.safetensors"))
    assert tensors[f"{name}.weight_shape"].tolist() == list(source[f"{name}.weight"].shape)
    # lm_head in 8 bits per channel: a group of its own, whose name target wins over "Linear".
    assert config["config_groups"]["group_1"] == {
        "targets": ["re:.*lm_head$"], "input_activations": None, "format": "pack-quantized",
        "weights": {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "channel", "group_size": None}}
    assert not any(re.match(pattern.removeprefix("re:"), "lm_head") for pattern in config["ignore"])
    assert "lm_head.weight" not in tensors
    rows, columns = source["lm_head.weight"].shape
    assert tensors["lm_head.weight_packed"].shape == (rows, -(-columns // 4))
    assert tensors["lm_head.weight_scale"].shape == (rows, 1)


def written_checkpoint(source: Path, target: Path, weights: str = "int4") -> dict[str, torch.Tensor]:
    """Every tensor ``model.quantize`` writes for ``source``, read back from its shards."""
    quantize_checkpoint(source, target, weights)
    tensors = {}
    for shard in target.glob("model-*.safetensors"):
        tensors.update(load_file(str(shard)))
    return tensors


def test_a_written_int4_checkpoint_reloads_the_weights_it_holds(oracle_folder, tmp_path):
    """Reloaded as stored, every quantized weight (lm_head in int8 among them) is the one quantizing
    on load gives, byte for byte: the written bytes are read back unchanged."""
    from model.quantization import quantized_weights

    tensors = written_checkpoint(oracle_folder, tmp_path / "q")
    saved = load_model(tmp_path / "q", dtype=torch.float32)
    on_load = load_model(oracle_folder, dtype=torch.float32, weights="int4")
    head = saved.module.lm_head.weight
    assert head.format == "int8" and saved.weight_formats == ("float32", "int4", "int8")
    assert torch.equal(head.scale, tensors["lm_head.weight_scale"])
    assert torch.equal(head.data.view(torch.uint8) ^ 0x80, tensors["lm_head.weight_packed"].view(torch.uint8)[
        :, : head.shape[1]])
    pairs = list(zip(quantized_weights(saved.module), quantized_weights(on_load.module), strict=True))
    assert len(pairs) > 1
    for ours, theirs in pairs:
        ours_parts = ours.parts if hasattr(ours, "parts") else (ours,)
        theirs_parts = theirs.parts if hasattr(theirs, "parts") else (theirs,)
        for a, b in zip(ours_parts, theirs_parts, strict=True):
            assert (a.format, a.shape) == (b.format, b.shape)
            assert torch.equal(a.data, b.data) and torch.equal(a.scale, b.scale)


def rewritten(tensors: dict[str, torch.Tensor], config: dict, target: Path) -> Path:
    target.mkdir()
    save_file(tensors, str(target / "model.safetensors"))
    (target / "config.json").write_text(json.dumps(config))
    return target


@pytest.fixture(scope="module")
def int4_written(oracle_folder, tmp_path_factory):
    """(tensors, config.json) of the oracle's int4 checkpoint as ``model.quantize`` writes it."""
    folder = tmp_path_factory.mktemp("int4") / "q"
    tensors = written_checkpoint(oracle_folder, folder)
    return tensors, json.loads((folder / "config.json").read_text())


def test_a_single_group_checkpoint_with_lm_head_ignored_keeps_it_dense(oracle_folder, int4_written, tmp_path):
    """As third-party w4a16 checkpoints are written: one "Linear" group, lm_head ignored and dense."""
    tensors, config = copy.deepcopy(int4_written)
    for suffix in ("weight_packed", "weight_scale", "weight_shape"):
        del tensors[f"lm_head.{suffix}"]
    tensors["lm_head.weight"] = load_file(str(oracle_folder / "model.safetensors"))["lm_head.weight"]
    quant = config["quantization_config"]
    del quant["config_groups"]["group_1"]
    quant["ignore"].append("lm_head")
    lm = load_model(rewritten(tensors, config, tmp_path / "w4a16"), dtype=torch.float32)
    assert lm.weight_formats == ("float32", "int4")
    assert torch.equal(lm.module.lm_head.weight, tensors["lm_head.weight"].float())


def retarget(group_1_targets):
    def change(quant):
        quant["config_groups"]["group_1"]["targets"] = group_1_targets
    return change


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (retarget(["Embedding"]), "targets the module class 'Embedding'"),
        (retarget(["re:(lm_head"]), "invalid pattern 're:\\(lm_head'"),
        (retarget(["Linear"]), "More than one compressed-tensors config group targets 'Linear'"),
        (lambda quant: quant["config_groups"].pop("group_1"), r"lm_head.weight_packed has shape .* 4-bit weight"),
        (lambda quant: quant["config_groups"]["group_0"].update(targets=["re:.*_proj$"]),
         "no compressed-tensors config group targets it"),
        (lambda quant: quant["config_groups"]["group_1"].update(input_activations={"num_bits": 8}),
         "weight-only"),
    ],
    ids=["unknown-class-target", "bad-pattern", "two-linear-groups", "head-read-as-int4", "untargeted", "activations"],
)
def test_compressed_tensors_groups_this_runtime_cannot_read_are_refused(int4_written, tmp_path, change, message):
    tensors, config = copy.deepcopy(int4_written)
    change(config["quantization_config"])
    with pytest.raises(LoadError, match=message):
        load_model(rewritten(tensors, config, tmp_path / "broken"), dtype=torch.float32)


def edit_checkpoint(source: Path, target: Path, change) -> Path:
    target.mkdir()
    tensors = load_file(str(source / "model.safetensors"))
    config = json.loads((source / "config.json").read_text())
    change(tensors, config)
    save_file(tensors, str(target / "model.safetensors"))
    (target / "config.json").write_text(json.dumps(config))
    return target


def first_scale(tensors) -> str:
    return next(name for name in sorted(tensors) if name.endswith("weight_scale_inv"))


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda t, c: c["quantization_config"].update(quant_method="gptq"), "quantized with 'gptq'"),
        (lambda t, c: c["quantization_config"].update(weight_block_size=[64, 64]), "block size"),
        (lambda t, c: t.pop(first_scale(t)), "lack their scales"),
        (lambda t, c: t.update({first_scale(t): t[first_scale(t)][:1, :1].clone()}), "scale of shape"),
        (lambda t, c: c.pop("quantization_config"), "no quantization_config"),
    ],
    ids=["unknown-method", "other-block-size", "missing-scale", "mis-shaped-scale", "undeclared"],
)
def test_broken_quantized_checkpoints_are_refused_clearly(fp8_folders, tmp_path, change, message):
    folder = edit_checkpoint(fp8_folders / "fp8", tmp_path / "broken", change)
    with pytest.raises(LoadError, match=message):
        load_model(folder, dtype=torch.float32)


def test_unknown_weight_format_is_refused(oracle_folder):
    with pytest.raises(LoadError, match="Unknown weight format 'int3'"):
        load_model(oracle_folder, weights="int3")


# A checkpoint of a few hundred MB whose weights are mostly experts, as in the published model.
MEMORY_CONFIG = dict(
    json.loads(json.dumps(__import__("model.demo", fromlist=["DEMO_CONFIG"]).DEMO_CONFIG)),
    vocab_size=512, hidden_size=1024, num_experts=24, moe_intermediate_size=512, shared_expert_intermediate_size=512,
    num_attention_heads=8, num_key_value_heads=2, head_dim=128, linear_num_key_heads=4, linear_num_value_heads=8,
    linear_key_head_dim=128, linear_value_head_dim=128, mtp_num_hidden_layers=0,
)
RESIDENT_AFTER_LOAD = """
import sys, torch
sys.path.insert(0, {root!r})
from model import load_model
from model.loader import read_config
from model.qwen3_next import Qwen3NextForCausalLM
def anon():
    for line in open("/proc/self/status"):
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) * 1024
# Building the module skeleton once first: torch's one-time set-up (~75 MB) is not the weights.
with torch.device("meta"):
    Qwen3NextForCausalLM(read_config(__import__("pathlib").Path({folder!r}))[0])
before = anon()
lm = load_model({folder!r}, dtype=torch.bfloat16, weights={weights!r})
print(anon() - before, lm.parameter_bytes())
"""


def resident_after_load(folder: Path, weights: str | None) -> tuple[int, int]:
    import subprocess
    import sys

    root = str(Path(__file__).resolve().parents[1])
    script = RESIDENT_AFTER_LOAD.format(root=root, folder=str(folder), weights=weights)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600, check=True)
    resident, weights_bytes = (int(v) for v in done.stdout.split())
    return resident, weights_bytes


@pytest.fixture(scope="module")
def large_folders(tmp_path_factory):
    from model.config import ModelConfig
    from model.demo import random_weights

    root = tmp_path_factory.mktemp("large")
    tensors = {k: v.to(torch.bfloat16) for k, v in random_weights(ModelConfig.from_dict(MEMORY_CONFIG), 0).items()}
    for name, checkpoint in (("bf16", tensors), ("fp8", None)):
        folder = root / name
        folder.mkdir()
        config = dict(MEMORY_CONFIG)
        if checkpoint is None:
            checkpoint = {}
            for key, value in tensors.items():
                if fp8_converted(key, value) or (".experts." in key and value.dim() == 2):
                    data, scale = to_fp8_blocks(value)
                    checkpoint[key], checkpoint[key.removesuffix(".weight") + ".weight_scale_inv"] = data, scale
                else:
                    checkpoint[key] = value
            config["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [128, 128]}
        save_file(checkpoint, str(folder / "model.safetensors"))
        (folder / "config.json").write_text(json.dumps(config))
    return root


@pytest.mark.host_process
def test_resident_memory_of_fp8_and_int4_weights(large_folders):
    bf16_bytes = (large_folders / "bf16" / "model.safetensors").stat().st_size
    fp8_bytes = (large_folders / "fp8" / "model.safetensors").stat().st_size
    assert bf16_bytes > 250 * 1024**2
    fp8_resident, fp8_weights = resident_after_load(large_folders / "fp8", None)
    assert fp8_weights <= fp8_bytes * 1.01
    assert fp8_resident <= 1.1 * fp8_bytes, (fp8_resident, fp8_bytes)
    int4_resident, int4_weights = resident_after_load(large_folders / "bf16", "int4")
    assert int4_weights <= 0.3 * bf16_bytes
    assert int4_resident <= 0.3 * bf16_bytes, (int4_resident, bf16_bytes)
