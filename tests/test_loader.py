"""Loader: sharded checkpoints, and a clear message for each kind of bad folder."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from model import LoadError, load_model


def copy_demo(demo_checkpoint, tmp_path):
    folder = tmp_path / "ckpt"
    shutil.copytree(demo_checkpoint, folder)
    return folder


def test_sharded_checkpoint_loads_like_single_file(demo_checkpoint, tmp_path):
    folder = copy_demo(demo_checkpoint, tmp_path)
    tensors = load_file(folder / "model.safetensors")
    (folder / "model.safetensors").unlink()
    names = sorted(tensors)
    halves = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    weight_map = {}
    for shard, shard_names in halves.items():
        save_file({n: tensors[n] for n in shard_names}, str(folder / shard))
        weight_map.update({n: shard for n in shard_names})
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    sharded = load_model(folder, dtype=torch.float32)
    single = load_model(demo_checkpoint, dtype=torch.float32)
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    assert torch.equal(sharded.forward(ids, sharded.new_state()), single.forward(ids, single.new_state()))


def test_mtp_tensors_are_kept_aside(demo_checkpoint, tmp_path):
    folder = copy_demo(demo_checkpoint, tmp_path)
    tensors = load_file(folder / "model.safetensors")
    tensors["mtp.fc.weight"] = torch.zeros(128, 256, dtype=torch.bfloat16)
    save_file(tensors, str(folder / "model.safetensors"))
    lm = load_model(folder, dtype=torch.float32)
    assert set(lm.extra_tensors) == {name for name in tensors if name.startswith("mtp.")}
    assert torch.equal(lm.extra_tensors["mtp.fc.weight"], torch.zeros(128, 256))


def test_missing_folder(tmp_path):
    with pytest.raises(LoadError, match="does not exist"):
        load_model(tmp_path / "nowhere")


def test_folder_without_config(tmp_path):
    with pytest.raises(LoadError, match="No config.json"):
        load_model(tmp_path)


def test_other_model_type(demo_checkpoint, tmp_path):
    folder = copy_demo(demo_checkpoint, tmp_path)
    raw = json.loads((folder / "config.json").read_text())
    raw["model_type"] = "llama"
    (folder / "config.json").write_text(json.dumps(raw))
    with pytest.raises(LoadError, match="qwen3_next.*llama"):
        load_model(folder)


def test_missing_weights_file(demo_checkpoint, tmp_path):
    folder = copy_demo(demo_checkpoint, tmp_path)
    (folder / "model.safetensors").unlink()
    with pytest.raises(LoadError, match="No weights"):
        load_model(folder)


def test_missing_tensor(demo_checkpoint, tmp_path):
    folder = copy_demo(demo_checkpoint, tmp_path)
    tensors = load_file(folder / "model.safetensors")
    del tensors["model.layers.1.linear_attn.A_log"]
    save_file(tensors, str(folder / "model.safetensors"))
    with pytest.raises(LoadError, match="missing tensors: model.layers.1.linear_attn.A_log"):
        load_model(folder)


def test_missing_expert_slice(demo_checkpoint, tmp_path):
    folder = copy_demo(demo_checkpoint, tmp_path)
    tensors = load_file(folder / "model.safetensors")
    del tensors["model.layers.0.mlp.experts.3.up_proj.weight"]
    save_file(tensors, str(folder / "model.safetensors"))
    with pytest.raises(LoadError, match="missing tensors: model.layers.0.mlp.experts.gate_up_proj"):
        load_model(folder)


def test_misshaped_tensor(demo_checkpoint, tmp_path):
    folder = copy_demo(demo_checkpoint, tmp_path)
    tensors = load_file(folder / "model.safetensors")
    tensors["model.norm.weight"] = torch.zeros(7, dtype=torch.bfloat16)
    save_file(tensors, str(folder / "model.safetensors"))
    with pytest.raises(LoadError, match=r"model.norm.weight has shape \[7\] but the config implies \[128\]"):
        load_model(folder)


def test_truncated_weights(demo_checkpoint, tmp_path):
    folder = copy_demo(demo_checkpoint, tmp_path)
    path = folder / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(LoadError, match="damaged or truncated"):
        load_model(folder)


def test_unexpected_tensor(demo_checkpoint, tmp_path):
    folder = copy_demo(demo_checkpoint, tmp_path)
    tensors = load_file(folder / "model.safetensors")
    # (A name with a quantization suffix gets its own message: see test_model_quantized.py.)
    tensors["model.layers.0.linear_attn.in_proj_extra.weight"] = torch.zeros(2, 2)
    save_file(tensors, str(folder / "model.safetensors"))
    with pytest.raises(LoadError, match="does not expect"):
        load_model(folder)


def test_default_dtype_and_fingerprint(demo_checkpoint):
    a = load_model(demo_checkpoint, dtype=torch.float32)
    b = load_model(demo_checkpoint, dtype=torch.bfloat16)
    assert a.fingerprint != b.fingerprint
    assert a.fingerprint == load_model(demo_checkpoint, dtype=torch.float32).fingerprint


def test_fingerprint_follows_the_kernels_arithmetic(demo_checkpoint, monkeypatch):
    """States computed by other kernels (another build, another CPU's path) must not pass for this one's."""
    from kernels import native as native_kernels

    before = load_model(demo_checkpoint, dtype=torch.bfloat16).fingerprint
    assert len(native_kernels.numerics_identity()) == 16
    monkeypatch.setattr(native_kernels, "numerics_identity", lambda: "another build")
    assert load_model(demo_checkpoint, dtype=torch.bfloat16).fingerprint != before


def test_cpu_models_default_to_bf16_where_the_kernels_run(monkeypatch):
    """A CPU without native bf16 products still defaults to bf16 when the kernels' AVX2 builds run
    (they read bf16 weights); without any kernel it computes in fp32."""
    from kernels import native
    from model.loader import default_dtype

    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    expected = torch.bfloat16 if native.kernels_run() else torch.float32
    assert default_dtype("cpu") == expected
    monkeypatch.setenv("DOCANALYST_NATIVE", "0")
    assert default_dtype("cpu") == torch.float32
