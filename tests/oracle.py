"""Random-weight checkpoints written by transformers' Qwen3-Next, the numerical oracle."""

from __future__ import annotations

import json
from pathlib import Path

import torch

TINY = dict(
    vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
    num_key_value_heads=2, head_dim=32, linear_key_head_dim=16, linear_value_head_dim=16,
    linear_num_key_heads=2, linear_num_value_heads=4, num_experts=6, num_experts_per_tok=2,
    moe_intermediate_size=32, shared_expert_intermediate_size=48,
)

CONFIGS = {
    # The published 80B per-layer dimensions, with two layers and few experts.
    "published-dims": dict(
        vocab_size=512, hidden_size=2048, intermediate_size=512, num_hidden_layers=2,
        layer_types=["linear_attention", "full_attention"], num_attention_heads=16, num_key_value_heads=2,
        head_dim=256, linear_key_head_dim=128, linear_value_head_dim=128, linear_num_key_heads=16,
        linear_num_value_heads=32, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=64,
        shared_expert_intermediate_size=64, rope_parameters={"rope_type": "default", "rope_theta": 1e7,
                                                             "partial_rotary_factor": 0.25},
    ),
    # Value heads = 3 x key heads, dense layers, irregular layer order, sparse step 2.
    "odd-shapes": dict(
        TINY, num_hidden_layers=5, linear_num_key_heads=2, linear_num_value_heads=6,
        layer_types=["full_attention", "linear_attention", "linear_attention", "full_attention", "linear_attention"],
        mlp_only_layers=[2], decoder_sparse_step=2, num_attention_heads=6, num_key_value_heads=3, head_dim=24,
        norm_topk_prob=False,
    ),
    "yarn": dict(
        TINY, max_position_embeddings=4096,
        rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "partial_rotary_factor": 0.5,
                         "factor": 4.0, "original_max_position_embeddings": 1024},
    ),
}


def write_oracle_checkpoint(folder: Path, name: str, seed: int = 0):
    """Save a perturbed random transformers model; return it (eval mode) for reference logits.

    Every parameter is moved away from its init (norm weights away from 0 or 1, biases of
    the gates away from 1) so a formula that reads a weight the wrong way cannot pass.
    """
    from transformers import Qwen3NextConfig, Qwen3NextForCausalLM

    torch.manual_seed(seed)
    model = Qwen3NextForCausalLM(Qwen3NextConfig(**CONFIGS[name])).eval()
    with torch.no_grad():
        for param in model.parameters():
            spread = float(param.std()) if param.numel() > 1 else 0.0
            param.add_(torch.randn_like(param) * max(spread, 0.05))
    model.save_pretrained(folder)
    return model


def rewrite_config_old_spelling(folder: Path) -> None:
    """Turn `rope_parameters` into the older top-level `rope_theta`/`rope_scaling` spelling."""
    path = folder / "config.json"
    raw = json.loads(path.read_text())
    rope = raw.pop("rope_parameters")
    raw["rope_theta"] = rope.pop("rope_theta")
    raw["partial_rotary_factor"] = rope.pop("partial_rotary_factor")
    if rope.get("rope_type") != "default":
        raw["rope_scaling"] = {"type": rope.pop("rope_type"), **rope}
    path.write_text(json.dumps(raw))
