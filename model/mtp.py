"""The multi-token prediction (MTP) block of Qwen3-Next checkpoints, and the K/V state it keeps.

The published checkpoints carry one extra decoder layer under `mtp.*`. Given the main model's
final-normed hidden state `h_t` at position t and the token `x_{t+1}` that followed it, the block
predicts `x_{t+2}`:

    u = fc(concat(pre_fc_norm_embedding(embed(x_{t+1})), pre_fc_norm_hidden(h_t)))   # embedding first
    u = layers.0(u)                          # a full-attention decoder layer with MoE, own K/V cache
    logits = lm_head(norm(u))                # the main model's embedding and lm_head are shared

As in the serving engines, the pair (h_t, x_{t+1}) is placed at position t for the rotary
embedding, and a second draft feeds the block's own normed output back in place of `h_t`, one
position further on.
"""

from __future__ import annotations

import dataclasses
import threading
import weakref
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from .config import FULL_ATTENTION, ModelConfig
from .layers import DecoderLayer, Linear, ZeroCenteredRMSNorm
from .loader import LoadError, fill_module
from .qwen3_next import LanguageModel
from .state import AttentionLayerState, LayerState, ModelState, StateError, empty_kv

MTP_PREFIX = "mtp."


def mtp_layer_config(config: ModelConfig, moe: bool = True) -> ModelConfig:
    """A config whose layer 0 is the MTP layer: full attention, MoE unless `moe` is False."""
    return dataclasses.replace(
        config, num_hidden_layers=1, layer_types=(FULL_ATTENTION,), decoder_sparse_step=1,
        mlp_only_layers=() if moe else (0,),
    )


class MtpBlock(nn.Module):
    """Parameter names (below `mtp.`) and shapes are those of the published checkpoints."""

    def __init__(self, config: ModelConfig, moe: bool = True):
        super().__init__()
        hidden, eps = config.hidden_size, config.rms_norm_eps
        self.pre_fc_norm_embedding = ZeroCenteredRMSNorm(hidden, eps)
        self.pre_fc_norm_hidden = ZeroCenteredRMSNorm(hidden, eps)
        self.fc = Linear(2 * hidden, hidden, bias=False)
        self.layers = nn.ModuleList([DecoderLayer(mtp_layer_config(config, moe), 0)])
        self.norm = ZeroCenteredRMSNorm(hidden, eps)

    def forward(self, embeds: torch.Tensor, hidden: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor],
                kv: AttentionLayerState, past: int) -> torch.Tensor:
        """embeds, hidden `[B, T, H]` -> normed output `[B, T, H]`; writes K/V at `past:past + T`."""
        x = self.fc(torch.cat([self.pre_fc_norm_embedding(embeds), self.pre_fc_norm_hidden(hidden)], dim=-1))
        x = self.layers[0](x, rope, kv, past)
        return self.norm(x)


class MtpCheckpointModule(nn.Module):
    """Holds the block as `mtp`, so parameter names are the checkpoint's `mtp.*` names."""

    def __init__(self, config: ModelConfig, moe: bool = True):
        super().__init__()
        self.mtp = MtpBlock(config, moe)


def mtp_tensor_names(tensors: dict[str, torch.Tensor]) -> list[str]:
    return sorted(name for name in tensors if name.startswith(MTP_PREFIX))


def build_mtp_block(config: ModelConfig, tensors: dict[str, torch.Tensor], device: torch.device | str,
                    dtype: torch.dtype) -> MtpBlock:
    """An `MtpBlock` filled from checkpoint tensors named `mtp.*` (per-expert names, as on the hub)."""
    layers = sorted({name.split(".")[2] for name in tensors if name.startswith("mtp.layers.")})
    if layers != ["0"]:
        raise LoadError(f"Expected exactly one MTP layer (mtp.layers.0), found layers {layers or 'none'}.")
    moe = "mtp.layers.0.mlp.gate.weight" in tensors
    # The block is built on the meta device and filled by the loader's own name mapping and checks.
    load_config = dataclasses.replace(config, tie_word_embeddings=False)
    with torch.device("meta"):
        module = MtpCheckpointModule(load_config, moe)
    fill_module(module, load_config, {name: tensors[name] for name in mtp_tensor_names(tensors)}, dtype, device)
    return module.mtp.eval()


_BLOCKS: weakref.WeakKeyDictionary[LanguageModel, MtpBlock | None] = weakref.WeakKeyDictionary()
_BLOCKS_LOCK = threading.Lock()


def mtp_block(lm: LanguageModel) -> MtpBlock | None:
    """The model's MTP block, or None when its checkpoint has no `mtp.*` tensors.

    Built once per model. The raw `mtp.*` tensors are then dropped from `lm.extra_tensors`, so
    the block's weights (about 3 GB in bf16 for the 80B checkpoint) are not held twice.
    """
    with _BLOCKS_LOCK:
        if lm in _BLOCKS:
            return _BLOCKS[lm]
        names = mtp_tensor_names(lm.extra_tensors)
        block = None
        if names:
            block = build_mtp_block(lm.config, lm.extra_tensors, lm.device, lm.dtype)
            for name in names:
                del lm.extra_tensors[name]
        _BLOCKS[lm] = block
        return block


@dataclass
class MtpCache:
    """The MTP layer's K/V plus the main model's hidden state still waiting for its next token.

    kv: K/V `[B, KVH, capacity, D]` with `length` entries used, for the consecutive positions
    `next_position - length .. next_position - 1`. A cache started on a restored plain state has
    no entries for the positions before it, which only costs the drafts some context.
    hidden: `[B, H]` final-normed main hidden state at `hidden_position` (or None): the pair
    (hidden, next token) is the first input of the block once that token is known.
    """

    kv: AttentionLayerState
    length: int = 0
    next_position: int = 0
    hidden: torch.Tensor | None = None
    hidden_position: int = -1

    @property
    def first_position(self) -> int:
        """Position of the oldest entry: entries always cover `first_position..next_position-1`."""
        return self.next_position - self.length

    def truncate_from(self, position: int) -> None:
        """Forget the entries at `position` and later."""
        if position <= self.first_position:
            self.length = 0
        else:
            self.length -= max(0, self.next_position - position)
        self.next_position = min(self.next_position, position) if self.length else position

    def tensors(self) -> dict[str, torch.Tensor]:
        """The live part, named `mtp.{key,value,hidden,positions}` as a saved state stores it."""
        named = {f"mtp.{name}": t for name, t in self.kv.tensors(self.length).items()}
        named["mtp.positions"] = torch.tensor([self.length, self.next_position, self.hidden_position])
        if self.hidden is not None:
            named["mtp.hidden"] = self.hidden
        return named

    def to(self, device: torch.device | str, copy: bool = False) -> MtpCache:
        """K/V are always copied (only the used part), like `ModelState.to` does for attention."""
        key = _moved(self.kv.key[:, :, :self.length], device, True)
        value = _moved(self.kv.value[:, :, :self.length], device, True)
        hidden = None if self.hidden is None else _moved(self.hidden, device, copy)
        return MtpCache(AttentionLayerState(key, value), self.length, self.next_position, hidden,
                        self.hidden_position)


def _moved(tensor: torch.Tensor, device: torch.device | str, copy: bool) -> torch.Tensor:
    moved = tensor.to(device)
    return moved.clone() if copy and moved.data_ptr() == tensor.data_ptr() else moved


def new_mtp_cache(lm: LanguageModel, batch_size: int = 1, position: int = 0) -> MtpCache:
    cfg = lm.config
    return MtpCache(empty_kv(batch_size, cfg.num_key_value_heads, cfg.head_dim, lm.dtype, lm.device),
                    next_position=position)


class SpeculativeState(ModelState):
    """A `ModelState` that also carries the MTP layer's cache, through clone, to, save and load.

    Its files are ordinary saved states with extra `mtp.*` tensors: `ModelState.load` reads them
    (ignoring the MTP part) and `SpeculativeState.load` reads either kind.
    """

    def __init__(self, layers: list[LayerState], fingerprint: str, seen_tokens: int = 0,
                 mtp: MtpCache | None = None):
        super().__init__(layers, fingerprint, seen_tokens)
        self.mtp = mtp

    @classmethod
    def wrap(cls, state: ModelState, mtp: MtpCache | None = None) -> SpeculativeState:
        """Shares `state`'s layer tensors (no copy); use the returned object from then on."""
        return cls(state.layers, state.fingerprint, state.seen_tokens, mtp)

    def layer_tensors(self) -> dict[str, torch.Tensor]:
        named = super().layer_tensors()
        if self.mtp is not None:
            named.update(self.mtp.tensors())
        return named

    def to(self, device: torch.device | str, copy: bool = False) -> SpeculativeState:
        moved = super().to(device, copy)
        mtp = None if self.mtp is None else self.mtp.to(device, copy)
        return SpeculativeState(moved.layers, moved.fingerprint, moved.seen_tokens, mtp)

    @classmethod
    def load(cls, path: str | Path, fingerprint: str, device: torch.device | str = "cpu") -> SpeculativeState:
        state = super().load(path, fingerprint, device)
        try:
            with safe_open(str(path), framework="pt", device="cpu") as handle:
                names = set(handle.keys())
                if "mtp.positions" not in names:
                    return cls.wrap(state)
                length, next_position, hidden_position = handle.get_tensor("mtp.positions").tolist()
                key = handle.get_tensor("mtp.key").to(device)
                value = handle.get_tensor("mtp.value").to(device)
                hidden = handle.get_tensor("mtp.hidden").to(device) if "mtp.hidden" in names else None
        except (SafetensorError, OSError, KeyError, ValueError) as exc:
            raise StateError(f"Cannot read the MTP part of the saved state {path}: {exc}") from exc
        mtp = MtpCache(AttentionLayerState(key, value), length, next_position, hidden, hidden_position)
        return cls.wrap(state, mtp)


class MtpRunner:
    """Runs the MTP block of `lm` over (hidden, next token) pairs, appending to an `MtpCache`."""

    def __init__(self, lm: LanguageModel, block: MtpBlock):
        self.lm, self.block = lm, block

    @torch.inference_mode()
    def extend(self, cache: MtpCache, hidden: torch.Tensor, tokens: torch.Tensor, position: int) -> torch.Tensor:
        """hidden `[B, T, H]` at positions `position..position+T-1`, tokens `[B, T]` (each the token
        after its hidden's position) -> the block's normed outputs `[B, T, H]`."""
        if position < cache.next_position:
            cache.truncate_from(position)
        elif position > cache.next_position:
            # Entries must stay consecutive; a jump (the state moved on without the block) starts afresh.
            cache.length = 0
        length = tokens.shape[1]
        positions = torch.arange(position, position + length, device=self.lm.device)
        rope = self.lm.rotary.cos_sin(positions, self.lm.dtype)
        embeds = self.lm.module.model.embed_tokens(tokens.to(self.lm.device))
        out = self.block(embeds, hidden.to(self.lm.dtype), rope, cache.kv, cache.length)
        cache.length += length
        cache.next_position = position + length
        return out

    @torch.inference_mode()
    def logits(self, out: torch.Tensor) -> torch.Tensor:
        """Block outputs `[..., H]` -> draft logits `[..., vocab]` through the main `lm_head`."""
        return self.lm.module.lm_head(out)
