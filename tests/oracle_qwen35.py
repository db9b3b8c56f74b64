"""Random-weight Qwen3.5 checkpoints written by transformers' Qwen3_5(Moe)ForConditionalGeneration
in the published layout (text decoder under `model.language_model.`, a tiny vision tower under
`model.visual.`, separate Gated DeltaNet projections): the numerical oracle for that family."""

from __future__ import annotations

from pathlib import Path

import torch

# Text alone puts the same position on all three mRoPE axes; the sections still differ from the
# published [11, 11, 10] only because these heads rotate fewer frequencies.
MROPE = {"rope_type": "default", "rope_theta": 1e7, "partial_rotary_factor": 0.25, "mrope_interleaved": True}

TINY_TEXT = dict(
    vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
    num_key_value_heads=2, head_dim=32, linear_key_head_dim=16, linear_value_head_dim=16,
    linear_num_key_heads=2, linear_num_value_heads=4, rope_parameters={**MROPE, "mrope_section": [2, 1, 1]},
)
MOE = dict(num_experts=6, num_experts_per_tok=2, moe_intermediate_size=32, shared_expert_intermediate_size=48)
IRREGULAR = ["full_attention", "linear_attention", "linear_attention", "full_attention", "linear_attention"]

CONFIGS = {
    "dense": dict(moe=False, tie=False, text=TINY_TEXT),
    # Tied embeddings (as the 0.8B-4B checkpoints), value heads = 3 x key heads, 6 query heads on
    # 3 K/V heads, irregular layer order.
    "dense-tied-odd": dict(moe=False, tie=True, text=dict(
        TINY_TEXT, num_hidden_layers=5, layer_types=IRREGULAR, linear_num_value_heads=6, num_attention_heads=6,
        num_key_value_heads=3, head_dim=24, rope_parameters={**MROPE, "mrope_section": [1, 1, 1]})),
    "moe": dict(moe=True, tie=False, text=dict(TINY_TEXT, **MOE)),
    "moe-odd": dict(moe=True, tie=False, text=dict(
        TINY_TEXT, **MOE, num_hidden_layers=5, layer_types=IRREGULAR, linear_num_value_heads=6)),
    # The published per-layer head counts and dims (16 key / 32 value heads of 128, 16 query heads
    # on 4 K/V heads of 256), small hidden width, two layers.
    "published-heads": dict(moe=False, tie=False, text=dict(
        TINY_TEXT, vocab_size=512, hidden_size=256, intermediate_size=256, num_hidden_layers=2,
        layer_types=["linear_attention", "full_attention"], num_attention_heads=16, num_key_value_heads=4,
        head_dim=256, linear_key_head_dim=128, linear_value_head_dim=128, linear_num_key_heads=16,
        linear_num_value_heads=32, rope_parameters={**MROPE, "mrope_section": [11, 11, 10]})),
}
TINY_VISION = dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2, patch_size=4,
                   num_position_embeddings=16)


def reference_model(name: str, seed: int = 0):
    """The transformers model of config `name`, perturbed away from its init like tests/oracle.py."""
    from transformers import (
        Qwen3_5Config,
        Qwen3_5ForConditionalGeneration,
        Qwen3_5MoeConfig,
        Qwen3_5MoeForConditionalGeneration,
    )

    spec = CONFIGS[name]
    config_class, model_class = ((Qwen3_5MoeConfig, Qwen3_5MoeForConditionalGeneration) if spec["moe"]
                                 else (Qwen3_5Config, Qwen3_5ForConditionalGeneration))
    text = dict(spec["text"], tie_word_embeddings=spec["tie"])
    vision = dict(TINY_VISION, out_hidden_size=text["hidden_size"])
    config = config_class(text_config=text, vision_config=vision, tie_word_embeddings=spec["tie"])
    torch.manual_seed(seed)
    model = model_class(config).eval()
    with torch.no_grad():
        for param in model.parameters():
            spread = float(param.std()) if param.numel() > 1 else 0.0
            param.add_(torch.randn_like(param) * max(spread, 0.05))
    return model


def write_qwen35_checkpoint(folder: Path, name: str, seed: int = 0):
    """Save the reference model of config `name` with `save_pretrained`; return it (eval mode)."""
    model = reference_model(name, seed)
    model.save_pretrained(folder)
    return model


def reference_logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits
