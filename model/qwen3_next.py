"""The Qwen3-Next decoder and the `LanguageModel` runtime object around it."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from kernels.native import flush_denormals, keep_freed_memory
from kernels.quant import QuantizedWeight

from .config import ModelConfig
from .few_tokens import FewTokenForward
from .layers import DecoderLayer, Linear, ZeroCenteredRMSNorm
from .quantization import quantized_weights, weight_formats
from .rope import RotaryEmbedding
from .state import LinearLayerState, ModelState, empty_kv


class Qwen3NextBackbone(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = ZeroCenteredRMSNorm(config.hidden_size, config.rms_norm_eps)


class Qwen3NextForCausalLM(nn.Module):
    """Module tree whose parameter names match the checkpoint (`model.layers.N...`, `lm_head`)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.model = Qwen3NextBackbone(config)
        self.lm_head = Linear(config.hidden_size, config.vocab_size, bias=False)


class LanguageModel:
    """A loaded model: forward over token ids and a state, nothing about scheduling or sampling."""

    def __init__(self, config: ModelConfig, module: Qwen3NextForCausalLM, fingerprint: str,
                 path: Path | None = None, extra_tensors: dict[str, torch.Tensor | QuantizedWeight] | None = None):
        self.config = config
        self.module = module.eval()
        self.fingerprint = fingerprint
        self.path = path
        self.extra_tensors = extra_tensors or {}
        # The embedding is never quantized, so it tells the compute dtype.
        weight = module.model.embed_tokens.weight
        self.device, self.dtype = weight.device, weight.dtype
        self.rotary = RotaryEmbedding(config, self.device)
        if self.device.type == "cpu":
            flush_denormals()
            keep_freed_memory()
        # Decode steps and draft verification through native calls where they all run (same bits).
        self.few_tokens = FewTokenForward.build(self.module, config)
        self._tokenizer = None

    @property
    def tokenizer(self):
        """The checkpoint folder's tokenizer, loaded on first use."""
        if self._tokenizer is None:
            if self.path is None:
                raise ValueError("This model was not loaded from a folder, so it has no tokenizer.")
            from .tokenizer import Tokenizer

            self._tokenizer = Tokenizer.from_folder(self.path)
        return self._tokenizer

    def parameter_bytes(self) -> int:
        """Resident bytes of every weight, quantized ones counted as stored (values plus scales)."""
        dense = sum(p.numel() * p.element_size() for p in self.module.parameters())
        quantized = {id(v): v.nbytes for v in quantized_weights(self.module)}
        return dense + sum(quantized.values())

    @property
    def weight_formats(self) -> tuple[str, ...]:
        """How the weights are held, e.g. ("bfloat16",) or ("bfloat16", "int4")."""
        return weight_formats(self.module)

    def new_state(self, batch_size: int = 1, *, mtp: bool = True) -> ModelState:
        """An empty state; with `mtp` (and an MTP block in the checkpoint) it carries the block's
        cache, which every prefill then extends (one more layer's work a prompt token)."""
        cfg = self.config
        layers = []
        for layer_type in cfg.layer_types:
            if layer_type == "linear_attention":
                conv = torch.zeros(batch_size, cfg.linear_conv_dim, cfg.linear_conv_kernel_dim - 1,
                                   dtype=self.dtype, device=self.device)
                recurrent = torch.zeros(batch_size, cfg.linear_num_value_heads, cfg.linear_key_head_dim,
                                        cfg.linear_value_head_dim, dtype=torch.float32, device=self.device)
                layers.append(LinearLayerState(conv, recurrent))
            else:
                layers.append(empty_kv(batch_size, cfg.num_key_value_heads, cfg.head_dim, self.dtype, self.device))
        state = ModelState(layers, self.fingerprint)
        if not mtp:
            return state
        from .mtp import with_mtp  # imports this module

        # The MTP block's K/V and pending hidden follow every prefill, so drafts see the whole context.
        return with_mtp(self, state)

    def load_state(self, path: str | Path) -> ModelState:
        return ModelState.load(path, self.fingerprint, self.device)

    @torch.inference_mode()
    def hidden_states(self, input_ids: torch.Tensor, state: ModelState) -> torch.Tensor:
        """Hidden states before the final norm `[B, T, hidden]`; advances `state` by T tokens."""
        if state.fingerprint != self.fingerprint:
            raise ValueError("This state belongs to a different model.")
        input_ids = input_ids.to(self.device)
        batch, length = input_ids.shape
        if batch != state.batch_size:
            raise ValueError(f"input batch {batch} does not match the state's batch {state.batch_size}.")
        past = state.seen_tokens
        # States of a model with an MTP block carry its cache after the model's layers.
        layer_states = state.layers[:len(self.module.model.layers)]
        positions = torch.arange(past, past + length, device=self.device)
        rope = self.rotary.cos_sin(positions, self.dtype)
        if self.few_tokens is not None and self.few_tokens.takes(input_ids):
            x = self.few_tokens.hidden_states(input_ids, rope, layer_states, past)
        else:
            x = self.module.model.embed_tokens(input_ids)
            for layer, layer_state in zip(self.module.model.layers, layer_states, strict=True):
                x = layer(x, rope, layer_state, past)
        state.seen_tokens = past + length
        return x

    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, state: ModelState, last_only: bool = False,
                with_normed: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """input_ids `[B, T]` -> logits `[B, T, vocab]` (or `[B, 1, vocab]` with `last_only`);
        `with_normed` also returns the final-normed hidden states `[B, T, hidden]` of every
        position (what the MTP block reads)."""
        hidden = self.hidden_states(input_ids, state)
        logits = self.module.lm_head(self.module.model.norm(hidden[:, -1:] if last_only else hidden))
        return (logits, self.module.model.norm(hidden)) if with_normed else logits

    __call__ = forward
