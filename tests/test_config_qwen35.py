"""Qwen3.5 / Qwen3.6 configs as published: the decoder's settings nested in text_config, and the
family facts transformers' Qwen3_5(Moe)TextConfig and layers imply."""

from __future__ import annotations

import pytest

from model import ConfigError, ModelConfig
from model.demo import QWEN3_5_DEMO_CONFIG, QWEN3_5_MOE_DEMO_CONFIG


def composite(**text) -> dict:
    raw = {**QWEN3_5_DEMO_CONFIG, "text_config": {**QWEN3_5_DEMO_CONFIG["text_config"], **text}}
    return raw


def test_vision_language_config_reads_text_config():
    config = ModelConfig.from_dict(QWEN3_5_DEMO_CONFIG)
    assert config.family == "qwen3_5" and config.family_name == "Qwen3.5 / Qwen3.6 (dense)"
    assert (config.hidden_size, config.vocab_size, config.num_hidden_layers) == (128, 248320, 4)
    assert config.num_experts == 0 and not any(config.is_moe_layer(i) for i in range(4))
    assert config.tie_word_embeddings
    assert config.eos_token_id == (248044, 248046)  # the decoder's and the outer config's
    assert config.rope.mrope_section == (3, 3, 2) and config.rope.mrope_interleaved
    assert config.rotary_dim == 16 and config.mtp_num_hidden_layers == 1


def test_outer_config_decides_tying_as_transformers_reads_it():
    raw = composite(tie_word_embeddings=True)
    raw["tie_word_embeddings"] = False
    assert not ModelConfig.from_dict(raw).tie_word_embeddings
    del raw["tie_word_embeddings"]
    assert ModelConfig.from_dict(raw).tie_word_embeddings


def test_dense_family_ignores_moe_keys_and_moe_family_always_normalises():
    dense = ModelConfig.from_dict(composite(num_experts=8, mlp_only_layers=[1], decoder_sparse_step=2))
    assert dense.num_experts == 0 and dense.mlp_only_layers == ()
    moe = ModelConfig.from_dict({**QWEN3_5_MOE_DEMO_CONFIG, "text_config": {
        **QWEN3_5_MOE_DEMO_CONFIG["text_config"], "norm_topk_prob": False, "mlp_only_layers": [0]}})
    assert moe.family == "qwen3_5_moe" and moe.norm_topk_prob
    assert all(moe.is_moe_layer(i) for i in range(moe.num_hidden_layers))


def test_text_only_config_and_family_defaults():
    config = ModelConfig.from_dict({"model_type": "qwen3_5_moe_text"})
    assert (config.vocab_size, config.hidden_size, config.num_hidden_layers) == (248320, 2048, 40)
    assert (config.num_experts, config.num_experts_per_tok, config.num_key_value_heads) == (256, 8, 2)
    assert config.layer_types[:4] == ("linear_attention",) * 3 + ("full_attention",)


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"model_type": "qwen3_5"}, "text_config"),
        (composite(rope_parameters={"rope_type": "default", "partial_rotary_factor": 0.25,
                                    "mrope_section": [5, 4, 4]}), "mrope_section"),
        ({"model_type": "qwen3_vl"}, "qwen3_5.*qwen3_vl"),
    ],
    ids=["no-text-config", "mrope-too-wide", "other-family"],
)
def test_unusable_configs_are_refused_clearly(raw, message):
    with pytest.raises(ConfigError, match=message):
        ModelConfig.from_dict(raw)
