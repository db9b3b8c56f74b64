"""Model configuration parsed from a Hugging Face `config.json`: Qwen3-Next, and the Qwen3.5 /
Qwen3.6 families built on it (dense `qwen3_5`, MoE `qwen3_5_moe`).

Qwen3.5 checkpoints are published as vision-language models whose `config.json` nests the text
decoder's settings in `text_config` (the vision tower is not run here); text-only exports carry
them at the top level (`qwen3_5_text`, `qwen3_5_moe_text`). Their family differences are facts
of the config (dense MLP in every layer, or MoE in every layer with normalised top-k weights) and
of the weight layout (model/checkpoint_layout.py); the decoder is the same module tree.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

LINEAR_ATTENTION = "linear_attention"
FULL_ATTENTION = "full_attention"

QWEN3_NEXT = "qwen3_next"
QWEN3_5 = "qwen3_5"
QWEN3_5_MOE = "qwen3_5_moe"
# model_type -> family. The vision-language types nest the decoder's config in `text_config`.
FAMILY_OF_MODEL_TYPE = {
    "qwen3_next": QWEN3_NEXT,
    "qwen3_5": QWEN3_5, "qwen3_5_text": QWEN3_5,
    "qwen3_5_moe": QWEN3_5_MOE, "qwen3_5_moe_text": QWEN3_5_MOE,
}
COMPOSITE_MODEL_TYPES = ("qwen3_5", "qwen3_5_moe")
SUPPORTED_MODEL_TYPES = tuple(FAMILY_OF_MODEL_TYPE)
FAMILY_NAMES = {QWEN3_NEXT: "Qwen3-Next", QWEN3_5: "Qwen3.5 / Qwen3.6 (dense)", QWEN3_5_MOE: "Qwen3.5 / Qwen3.6 (MoE)"}
# Defaults of transformers' Qwen3_5TextConfig / Qwen3_5MoeTextConfig where they differ from
# Qwen3-Next's, for keys a config leaves out.
_FAMILY_DEFAULTS: dict[str, dict[str, Any]] = {
    QWEN3_5: dict(vocab_size=248320, hidden_size=4096, intermediate_size=12288, num_hidden_layers=32,
                  num_key_value_heads=4, max_position_embeddings=32768),
    QWEN3_5_MOE: dict(vocab_size=248320, hidden_size=2048, num_hidden_layers=40, num_key_value_heads=2,
                      max_position_embeddings=32768, num_experts_per_tok=8, num_experts=256),
}


class ConfigError(ValueError):
    """A config.json that does not describe a model this runtime can run."""


@dataclass(frozen=True)
class RopeSettings:
    theta: float = 10_000_000.0
    partial_rotary_factor: float = 0.25
    rope_type: str = "default"
    factor: float = 1.0
    original_max_position_embeddings: int | None = None
    attention_factor: float | None = None
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float | None = None
    mscale_all_dim: float | None = None
    truncate: bool = True
    # Multimodal RoPE (Qwen3.5): frequency slots taken from the temporal/height/width position axes.
    # Text alone has the same position on all three axes, so the tables equal plain RoPE's.
    mrope_section: tuple[int, ...] = ()
    mrope_interleaved: bool = False


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int = 151936
    hidden_size: int = 2048
    intermediate_size: int = 5632
    num_hidden_layers: int = 48
    num_attention_heads: int = 16
    num_key_value_heads: int = 2
    head_dim: int = 256
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 262144
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    hidden_act: str = "silu"
    linear_conv_kernel_dim: int = 4
    linear_key_head_dim: int = 128
    linear_value_head_dim: int = 128
    linear_num_key_heads: int = 16
    linear_num_value_heads: int = 32
    decoder_sparse_step: int = 1
    moe_intermediate_size: int = 512
    shared_expert_intermediate_size: int = 512
    num_experts_per_tok: int = 10
    num_experts: int = 512
    norm_topk_prob: bool = True
    mlp_only_layers: tuple[int, ...] = ()
    layer_types: tuple[str, ...] = ()
    mtp_num_hidden_layers: int = 0
    bos_token_id: int | None = None
    eos_token_id: tuple[int, ...] = ()
    rope: RopeSettings = field(default_factory=RopeSettings)
    family: str = QWEN3_NEXT

    @property
    def family_name(self) -> str:
        return FAMILY_NAMES[self.family]

    @property
    def rotary_dim(self) -> int:
        return int(self.head_dim * self.rope.partial_rotary_factor)

    @property
    def context_limit(self) -> int:
        """Longest prompt + answer the model is meant to handle (YaRN raises it)."""
        if self.rope.rope_type == "yarn" and self.rope.original_max_position_embeddings:
            scaled = int(self.rope.original_max_position_embeddings * self.rope.factor)
            return max(scaled, self.max_position_embeddings)
        return self.max_position_embeddings

    @property
    def linear_conv_dim(self) -> int:
        key_dim = self.linear_key_head_dim * self.linear_num_key_heads
        return 2 * key_dim + self.linear_value_head_dim * self.linear_num_value_heads

    def is_moe_layer(self, index: int) -> bool:
        return (
            index not in self.mlp_only_layers
            and self.num_experts > 0
            and (index + 1) % self.decoder_sparse_step == 0
        )

    def fingerprint_source(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    def digest(self) -> str:
        return hashlib.sha256(self.fingerprint_source().encode()).hexdigest()

    @classmethod
    def from_file(cls, path: str | Path) -> ModelConfig:
        try:
            raw = json.loads(Path(path).read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ConfigError(f"Cannot read the model config {path}: {exc}") from exc
        if not isinstance(raw, dict):
            raise ConfigError(f"The model config {path} is not a JSON object.")
        return cls.from_dict(raw)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> ModelConfig:
        model_type = raw.get("model_type")
        family = FAMILY_OF_MODEL_TYPE.get(model_type)
        if family is None:
            raise ConfigError(
                f"This runtime runs Qwen3-Next and Qwen3.5 / Qwen3.6 checkpoints (model_type "
                f"{', '.join(repr(t) for t in SUPPORTED_MODEL_TYPES)}); the config says model_type {model_type!r}."
            )
        raw = _text_section(raw, model_type)
        defaults = cls()
        values: dict[str, Any] = dict(_FAMILY_DEFAULTS.get(family, {}))
        for name in (
            "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "num_key_value_heads", "rms_norm_eps", "max_position_embeddings", "tie_word_embeddings",
            "attention_bias", "hidden_act", "linear_conv_kernel_dim", "linear_key_head_dim",
            "linear_value_head_dim", "linear_num_key_heads", "linear_num_value_heads", "decoder_sparse_step",
            "moe_intermediate_size", "shared_expert_intermediate_size", "num_experts_per_tok", "num_experts",
            "norm_topk_prob", "mtp_num_hidden_layers", "bos_token_id",
        ):
            if raw.get(name) is not None:
                values[name] = raw[name]
        hidden = values.get("hidden_size", defaults.hidden_size)
        heads = values.get("num_attention_heads", defaults.num_attention_heads)
        values["head_dim"] = raw.get("head_dim") or hidden // heads
        values["mlp_only_layers"] = tuple(raw.get("mlp_only_layers") or ())
        values["eos_token_id"] = _token_ids(raw.get("eos_token_id"))
        layers = values.get("num_hidden_layers", defaults.num_hidden_layers)
        values["layer_types"] = _layer_types(raw, layers)
        values["rope"] = _rope_settings(raw, values.get("max_position_embeddings", 262144))
        values["family"] = family
        if family == QWEN3_5:
            # Every layer has the dense SwiGLU MLP; the config's MoE keys (if any) mean nothing.
            values.update(num_experts=0, decoder_sparse_step=1, mlp_only_layers=())
        elif family == QWEN3_5_MOE:
            # Every layer is sparse, and the router always renormalises its top-k weights.
            values.update(decoder_sparse_step=1, mlp_only_layers=(), norm_topk_prob=True)
        config = cls(**values)
        _validate(config)
        return config


def _token_ids(value: Any) -> tuple[int, ...]:
    if isinstance(value, list):
        return tuple(value)
    return (value,) if value is not None else ()


def _text_section(raw: dict[str, Any], model_type: str) -> dict[str, Any]:
    """The decoder's settings: `text_config` of a vision-language config, with what the outer
    config decides (tying the output embedding, as transformers reads it there, and end tokens)."""
    if model_type not in COMPOSITE_MODEL_TYPES:
        return raw
    text = raw.get("text_config")
    if not isinstance(text, dict):
        raise ConfigError(f"A {model_type} config must hold the text decoder's settings in text_config.")
    text = dict(text)
    if raw.get("tie_word_embeddings") is not None:
        text["tie_word_embeddings"] = raw["tie_word_embeddings"]
    eos = _token_ids(text.get("eos_token_id")) + _token_ids(raw.get("eos_token_id"))
    text["eos_token_id"] = list(dict.fromkeys(eos))
    return text


def _layer_types(raw: dict[str, Any], num_layers: int) -> tuple[str, ...]:
    types = raw.get("layer_types")
    if types is None:
        interval = int(raw.get("full_attention_interval") or 4)
        types = [FULL_ATTENTION if (i + 1) % interval == 0 else LINEAR_ATTENTION for i in range(num_layers)]
    types = tuple(types)
    if len(types) != num_layers:
        raise ConfigError(f"layer_types lists {len(types)} layers but num_hidden_layers is {num_layers}.")
    unknown = sorted(set(types) - {LINEAR_ATTENTION, FULL_ATTENTION})
    if unknown:
        raise ConfigError(f"Unknown layer types in config: {', '.join(unknown)}.")
    return types


def _rope_settings(raw: dict[str, Any], max_positions: int) -> RopeSettings:
    """Merge the newer `rope_parameters` dict with the older top-level spellings."""
    params: dict[str, Any] = {}
    if isinstance(raw.get("rope_scaling"), dict):
        params.update(raw["rope_scaling"])
    if isinstance(raw.get("rope_parameters"), dict):
        params.update(raw["rope_parameters"])
    theta = params.get("rope_theta", raw.get("rope_theta", 10_000_000.0))
    partial = params.get("partial_rotary_factor", raw.get("partial_rotary_factor", 0.25))
    rope_type = params.get("rope_type") or params.get("type") or "default"
    if rope_type not in ("default", "yarn"):
        raise ConfigError(f"RoPE type {rope_type!r} is not supported (only default and yarn).")
    mrope = {"mrope_section": tuple(params.get("mrope_section") or ()),
             "mrope_interleaved": bool(params.get("mrope_interleaved", False))}
    settings = RopeSettings(theta=float(theta), partial_rotary_factor=float(partial), rope_type=rope_type, **mrope)
    if rope_type != "yarn":
        return settings
    original = params.get("original_max_position_embeddings", raw.get("original_max_position_embeddings"))
    original = int(original or max_positions)
    factor = params.get("factor")
    factor = float(factor) if factor is not None else max_positions / original
    return RopeSettings(
        theta=float(theta),
        partial_rotary_factor=float(partial),
        rope_type="yarn",
        factor=factor,
        original_max_position_embeddings=original,
        attention_factor=params.get("attention_factor"),
        beta_fast=float(params.get("beta_fast") or 32.0),
        beta_slow=float(params.get("beta_slow") or 1.0),
        mscale=params.get("mscale"),
        mscale_all_dim=params.get("mscale_all_dim"),
        truncate=bool(params.get("truncate", True)),
        **mrope,
    )


def _validate(config: ModelConfig) -> None:
    if config.num_attention_heads % config.num_key_value_heads:
        raise ConfigError("num_attention_heads must be a multiple of num_key_value_heads.")
    if config.linear_num_value_heads % config.linear_num_key_heads:
        raise ConfigError("linear_num_value_heads must be a multiple of linear_num_key_heads.")
    if config.rotary_dim % 2:
        raise ConfigError("The rotary slice of each head (head_dim * partial_rotary_factor) must be even.")
    if 2 * sum(config.rope.mrope_section) > config.rotary_dim:
        raise ConfigError("mrope_section assigns more frequencies than the rotary slice of a head has.")
    if config.hidden_act != "silu":
        raise ConfigError(f"Activation {config.hidden_act!r} is not supported (Qwen3-Next uses silu).")
    if config.num_experts and not 0 < config.num_experts_per_tok <= config.num_experts:
        raise ConfigError("num_experts_per_tok must be between 1 and num_experts.")


def yarn_attention_factor(rope: RopeSettings) -> float:
    if rope.attention_factor is not None:
        return float(rope.attention_factor)

    def mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    if rope.mscale and rope.mscale_all_dim:
        return mscale(rope.factor, rope.mscale) / mscale(rope.factor, rope.mscale_all_dim)
    return mscale(rope.factor)
