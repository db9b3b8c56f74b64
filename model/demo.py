"""Write a small Qwen3-Next checkpoint with random weights, for demos and tests.

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

from .config import ModelConfig
from .loader import checkpoint_tensors
from .mtp import MtpCheckpointModule
from .qwen3_next import Qwen3NextForCausalLM
from .tokenizer_files import write_tokenizer_files

DEMO_MARKER = "demo_checkpoint.json"
DEMO_NOTICE = (
    "This is a demo checkpoint with RANDOM weights: it runs the real Qwen3-Next architecture and "
    "tokenizer, but its answers are meaningless. Point the app at a real Qwen3-Next checkpoint folder "
    "to get real answers."
)

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


def random_weights(config: ModelConfig, seed: int) -> dict[str, torch.Tensor]:
    """Deterministic random weights with the init scales of the published architecture.

    The MTP block (when the config asks for one) is drawn after the main weights, so those do
    not depend on whether it is there.
    """
    generator = torch.Generator().manual_seed(seed)
    module = Qwen3NextForCausalLM(config)
    _randomize(module, generator)
    tensors = checkpoint_tensors(module, config)
    if config.mtp_num_hidden_layers:
        mtp = MtpCheckpointModule(config)
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
                          config_overrides: dict | None = None) -> Path:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    raw = {**DEMO_CONFIG, **(config_overrides or {})}
    config = ModelConfig.from_dict(raw)
    tensors = {name: t.to(dtype) for name, t in random_weights(config, seed).items()}
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps(raw, indent=2), encoding="utf-8")
    write_tokenizer_files(folder)
    (folder / "generation_config.json").write_text(
        json.dumps({"eos_token_id": [151645, 151643], "temperature": 0.7, "top_p": 0.8, "top_k": 20}, indent=2),
        encoding="utf-8",
    )
    (folder / DEMO_MARKER).write_text(json.dumps({"seed": seed, "notice": DEMO_NOTICE}, indent=2), encoding="utf-8")
    return folder


def is_demo_checkpoint(folder: str | Path) -> bool:
    return (Path(folder) / DEMO_MARKER).is_file()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Write a random-weight Qwen3-Next demo checkpoint.")
    parser.add_argument("folder", type=Path)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    write_demo_checkpoint(args.folder, seed=args.seed)
    print(f"Wrote a demo checkpoint to {args.folder}.", file=sys.stderr)
    print(DEMO_NOTICE, file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
