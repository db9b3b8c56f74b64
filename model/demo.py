"""Write a small checkpoint with random weights, for demos and tests: Qwen3-Next (the default) or
Qwen3.5-shaped (`--family qwen3_5` / `qwen3_5_moe`, in the published vision-language layout).

Its answers are meaningless: the weights are random. It exists so the app and the tests
have a real checkpoint folder (config, safetensors, tokenizer) to load without downloads.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

from .checkpoint_layout import published_tensors
from .config import COMPOSITE_MODEL_TYPES, QWEN3_5, QWEN3_5_MOE, QWEN3_NEXT, ModelConfig
from .loader import checkpoint_tensors
from .mtp import MtpCheckpointModule
from .qwen3_next import Qwen3NextForCausalLM
from .tokenizer import CONFIG_FILE, TEMPLATE_FILE
from .tokenizer_files import QWEN3, Vocabulary, write_tokenizer_files
from .tokenizer_files import QWEN3_5 as QWEN3_5_VOCABULARY

DEMO_MARKER = "demo_checkpoint.json"
DEMO_NOTICE = (
    "This is a demo checkpoint with RANDOM weights: it runs the real Qwen3-Next architecture and "
    "tokenizer, but its answers are meaningless. Point the app at a real Qwen3-Next checkpoint folder "
    "to get real answers."
)
QWEN3_5_DEMO_NOTICE = (
    "This is a demo checkpoint with RANDOM weights: it runs the real Qwen3.5 text decoder and its "
    "248K-token tokenizer (the vision tower is left out), but its answers are meaningless. Point the app "
    "at a real Qwen3.5 or Qwen3.6 checkpoint folder to get real answers."
)
FAMILIES = (QWEN3_NEXT, QWEN3_5, QWEN3_5_MOE)

DEMO_CONFIG = {
    "architectures": ["Qwen3NextForCausalLM"],
    "model_type": "qwen3_next",
    "vocab_size": 151936,
    "hidden_size": 128,
    "intermediate_size": 256,
    "num_hidden_layers": 4,
    "layer_types": ["linear_attention", "linear_attention", "linear_attention", "full_attention"],
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 64,
    "linear_num_key_heads": 2,
    "linear_num_value_heads": 4,
    "linear_key_head_dim": 32,
    "linear_value_head_dim": 32,
    "linear_conv_kernel_dim": 4,
    "num_experts": 8,
    "num_experts_per_tok": 2,
    "moe_intermediate_size": 64,
    "shared_expert_intermediate_size": 64,
    "decoder_sparse_step": 1,
    "mlp_only_layers": [],
    "norm_topk_prob": True,
    "rms_norm_eps": 1e-6,
    "max_position_embeddings": 262144,
    "rope_parameters": {"rope_type": "default", "rope_theta": 10000000.0, "partial_rotary_factor": 0.25},
    "tie_word_embeddings": False,
    "hidden_act": "silu",
    "attention_bias": False,
    "bos_token_id": 151643,
    "eos_token_id": 151645,
    "mtp_num_hidden_layers": 1,
    "torch_dtype": "bfloat16",
}


# Qwen3.5 as published (model_type qwen3_5: text decoder settings in text_config), small: tied
# embeddings like the 0.8B-4B checkpoints, dense SwiGLU in every layer, an MTP block.
QWEN3_5_TEXT_CONFIG = {
    "model_type": "qwen3_5_text",
    "vocab_size": 248320,
    "hidden_size": 128,
    "intermediate_size": 256,
    "num_hidden_layers": 4,
    "layer_types": ["linear_attention", "linear_attention", "linear_attention", "full_attention"],
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 64,
    "linear_num_key_heads": 2,
    "linear_num_value_heads": 4,
    "linear_key_head_dim": 32,
    "linear_value_head_dim": 32,
    "linear_conv_kernel_dim": 4,
    "rms_norm_eps": 1e-6,
    "max_position_embeddings": 262144,
    "rope_parameters": {"rope_type": "default", "rope_theta": 10000000.0, "partial_rotary_factor": 0.25,
                        "mrope_section": [3, 3, 2], "mrope_interleaved": True},
    "tie_word_embeddings": True,
    "hidden_act": "silu",
    "attention_bias": False,
    "attn_output_gate": True,
    "eos_token_id": 248044,
    "mtp_num_hidden_layers": 1,
    "dtype": "bfloat16",
}
QWEN3_5_DEMO_CONFIG = {
    "architectures": ["Qwen3_5ForConditionalGeneration"],
    "model_type": "qwen3_5",
    "text_config": QWEN3_5_TEXT_CONFIG,
    # Described as published, but its weights are not written: the runtime never reads them.
    "vision_config": {"model_type": "qwen3_5_vision", "depth": 1, "hidden_size": 32, "intermediate_size": 64,
                      "num_heads": 2, "out_hidden_size": 128, "patch_size": 16, "spatial_merge_size": 2,
                      "temporal_patch_size": 2, "num_position_embeddings": 16},
    "tie_word_embeddings": True,
    "eos_token_id": 248046,
    "image_token_id": 248056,
    "video_token_id": 248057,
    "vision_start_token_id": 248053,
    "vision_end_token_id": 248054,
}
QWEN3_5_MOE_DEMO_CONFIG = {
    **QWEN3_5_DEMO_CONFIG,
    "architectures": ["Qwen3_5MoeForConditionalGeneration"],
    "model_type": "qwen3_5_moe",
    "text_config": {**QWEN3_5_TEXT_CONFIG, "model_type": "qwen3_5_moe_text", "tie_word_embeddings": False,
                    "num_experts": 8, "num_experts_per_tok": 2, "moe_intermediate_size": 64,
                    "shared_expert_intermediate_size": 64},
    "tie_word_embeddings": False,
}
_FAMILY_CONFIGS = {QWEN3_NEXT: DEMO_CONFIG, QWEN3_5: QWEN3_5_DEMO_CONFIG, QWEN3_5_MOE: QWEN3_5_MOE_DEMO_CONFIG}


def random_weights(config: ModelConfig, seed: int) -> dict[str, torch.Tensor]:
    """Deterministic random weights with the init scales of the published architecture, runtime-named.

    The MTP block (when the config asks for one) is drawn after the main weights, so those do
    not depend on whether it is there. A tied output embedding is not a tensor of its own.
    """
    generator = torch.Generator().manual_seed(seed)
    module = Qwen3NextForCausalLM(config)
    _randomize(module, generator)
    tensors = checkpoint_tensors(module, config)
    if config.tie_word_embeddings:
        del tensors["lm_head.weight"]
        # With random layers the residual stream is mostly the input token's own embedding, which a
        # tied output embedding scores highest: every greedy answer would repeat one token. The
        # layers normalise their input, so only that share shrinks.
        tensors["model.embed_tokens.weight"] = tensors["model.embed_tokens.weight"] * 0.05
    if config.mtp_num_hidden_layers:
        mtp = MtpCheckpointModule(config, moe=config.num_experts > 0)
        _randomize(mtp, generator)
        tensors.update(checkpoint_tensors(mtp, config))
    return tensors


def _randomize(module: torch.nn.Module, generator: torch.Generator) -> None:
    with torch.no_grad():
        for name, param in sorted(module.named_parameters()):
            if name.endswith("A_log"):
                param.copy_(torch.empty(param.shape).uniform_(1.0, 16.0, generator=generator).log())
            elif name.endswith("dt_bias") or name.endswith("linear_attn.norm.weight"):
                param.copy_(1.0 + 0.1 * torch.randn(param.shape, generator=generator))
            elif "norm" in name:
                param.copy_(0.1 * torch.randn(param.shape, generator=generator))
            else:
                param.copy_(0.02 * torch.randn(param.shape, generator=generator))


def write_demo_checkpoint(folder: str | Path, seed: int = 0, dtype: torch.dtype = torch.bfloat16,
                          config_overrides: dict | None = None, family: str = QWEN3_NEXT,
                          tokenizer: bool = True) -> Path:
    """Write the demo checkpoint of `family`; `config_overrides` change the decoder's settings
    (`text_config` of the Qwen3.5 layouts). `tokenizer=False` leaves the tokenizer files out."""
    if family not in FAMILIES:
        raise ValueError(f"Unknown family {family!r}; choose one of {', '.join(FAMILIES)}.")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    raw = json.loads(json.dumps(_FAMILY_CONFIGS[family]))
    if raw["model_type"] in COMPOSITE_MODEL_TYPES:
        raw["text_config"].update(config_overrides or {})
    else:
        raw.update(config_overrides or {})
    config = ModelConfig.from_dict(raw)
    tensors = {name: t.to(dtype) for name, t in random_weights(config, seed).items()}
    if family != QWEN3_NEXT:
        tensors = published_tensors(tensors, config, fused_experts=True)
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps(raw, indent=2), encoding="utf-8")
    vocabulary = QWEN3 if family == QWEN3_NEXT else QWEN3_5_VOCABULARY
    if tokenizer:
        _write_tokenizer(folder, vocabulary)
    first_added = vocabulary.first_added_id
    sampling = ({"temperature": 0.7, "top_p": 0.8, "top_k": 20} if family == QWEN3_NEXT
                else {"temperature": 0.6, "top_p": 0.95, "top_k": 20})
    (folder / "generation_config.json").write_text(
        json.dumps({"eos_token_id": [first_added + 2, first_added], **sampling}, indent=2), encoding="utf-8")
    notice = DEMO_NOTICE if family == QWEN3_NEXT else QWEN3_5_DEMO_NOTICE
    (folder / DEMO_MARKER).write_text(json.dumps({"seed": seed, "family": family, "notice": notice}, indent=2),
                                      encoding="utf-8")
    return folder


def _write_tokenizer(folder: Path, vocabulary: Vocabulary) -> None:
    write_tokenizer_files(folder, vocabulary=vocabulary)
    if vocabulary is QWEN3:
        return
    # Newer exports keep the chat template in its own file, as the Qwen3.5 releases do.
    config = json.loads((folder / CONFIG_FILE).read_text(encoding="utf-8"))
    (folder / TEMPLATE_FILE).write_text(config.pop("chat_template"), encoding="utf-8")
    (folder / CONFIG_FILE).write_text(json.dumps(config, ensure_ascii=False), encoding="utf-8")


def is_demo_checkpoint(folder: str | Path) -> bool:
    return (Path(folder) / DEMO_MARKER).is_file()


def demo_notice(folder: str | Path) -> str:
    """What the demo checkpoint in `folder` says about itself ("" when it is not one)."""
    try:
        return str(json.loads((Path(folder) / DEMO_MARKER).read_text(encoding="utf-8"))["notice"])
    except (OSError, ValueError, KeyError, TypeError):
        return DEMO_NOTICE if is_demo_checkpoint(folder) else ""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Write a random-weight demo checkpoint.")
    parser.add_argument("folder", type=Path)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--family", choices=FAMILIES, default=QWEN3_NEXT,
                        help="qwen3_next (default), or Qwen3.5-shaped: qwen3_5 (dense) or qwen3_5_moe")
    args = parser.parse_args(argv)
    write_demo_checkpoint(args.folder, seed=args.seed, family=args.family)
    print(f"Wrote a {args.family} demo checkpoint to {args.folder}.", file=sys.stderr)
    print(demo_notice(args.folder), file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
