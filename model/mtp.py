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

Only the last pair of a step drafts. The others (a prompt's pairs, and a step's accepted tokens
but the last) are recorded: their K/V are written, the same bits the whole layer writes, without
its attention or experts, so filling the cache over a prompt costs an fc and two small projections
per token rather than another full-attention layer over the whole prompt.
"""

from __future__ import annotations

import dataclasses
import threading
import weakref

import torch
from torch import nn

from kernels.quant import QuantizedWeight

from .config import FULL_ATTENTION, ModelConfig
from .layers import DecoderLayer, Linear, ZeroCenteredRMSNorm
from .loader import LoadError, fill_module
from .qwen3_next import LanguageModel
from .state import AttentionLayerState, LayerState, LinearLayerState, ModelState, empty_kv

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
        return self.norm(self.layers[0](self._layer_input(embeds, hidden), rope, kv, past))

    def record(self, embeds: torch.Tensor, hidden: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor],
               kv: AttentionLayerState, past: int) -> None:
        """The K/V forward writes, the same bits, without its outputs: pairs that only later drafts
        attend to (a prompt's) need nothing else, and skip the layer's attention and experts."""
        layer = self.layers[0]
        layer.self_attn.append_kv(layer.input_layernorm(self._layer_input(embeds, hidden)), rope, kv, past)

    def _layer_input(self, embeds: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.cat([self.pre_fc_norm_embedding(embeds), self.pre_fc_norm_hidden(hidden)], dim=-1))


class MtpCheckpointModule(nn.Module):
    """Holds the block as `mtp`, so parameter names are the checkpoint's `mtp.*` names."""

    def __init__(self, config: ModelConfig, moe: bool = True):
        super().__init__()
        self.mtp = MtpBlock(config, moe)


def mtp_tensor_names(tensors: dict) -> list[str]:
    return sorted(name for name in tensors if name.startswith(MTP_PREFIX))


def build_mtp_block(config: ModelConfig, tensors: dict[str, torch.Tensor | QuantizedWeight],
                    device: torch.device | str, dtype: torch.dtype) -> MtpBlock:
    """An `MtpBlock` filled from checkpoint tensors named `mtp.*` (per-expert names, as on the hub)."""
    layers = sorted({name.split(".")[2] for name in tensors if name.startswith("mtp.layers.")})
    if layers != ["0"]:
        raise LoadError(f"Expected exactly one MTP layer (mtp.layers.0), found layers {layers or 'none'}.")
    moe = "mtp.layers.0.mlp.gate.weight" in tensors
    # The block is built on the meta device and filled by the loader's own name mapping and checks.
    load_config = dataclasses.replace(config, tie_word_embeddings=False)
    with torch.device("meta"):
        module = MtpCheckpointModule(load_config, moe)
    # The tensors are already in the model's weight formats (model.loader holds them so).
    fill_module(module, load_config, {name: tensors[name] for name in mtp_tensor_names(tensors)}, dtype, device,
                weights=None)
    return module.mtp.eval()


_BLOCKS: weakref.WeakKeyDictionary[LanguageModel, MtpBlock | None] = weakref.WeakKeyDictionary()
_BLOCKS_LOCK = threading.Lock()


def mtp_block(lm: LanguageModel) -> MtpBlock | None:
    """The model's MTP block, or None when its checkpoint has no `mtp.*` tensors.

    Built once per model. The raw `mtp.*` tensors are then dropped from `lm.extra_tensors`, so
    the block's weights (for the 80B checkpoint about 3 GB in bf16, 0.9 GB in int4) are not held twice.
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


# A state of a model with an MTP block carries the block's part as two entries after the model's
# layers: its K/V (an attention layer) and the pending hidden state (stored as a linear layer).
# Checkpoints, forks, clones and saved files then handle them as they handle any layer.
MTP_STATE_LAYERS = 2


class MtpCache:
    """The MTP block's K/V plus the main model's hidden state still waiting for its next token.

    kv: K/V `[B, KVH, capacity, D]`. The pair (hidden at t, token at t + 1), placed at position t,
    is stored at index t + 1, the index of its token: the block's K/V then cover the same indices
    `[0, seen_tokens)` as the model's attention layers (index 0 stays empty), so a checkpoint's
    segment for those indices holds the pairs it completed. Entries are the consecutive positions
    `first_position .. next_position - 1`; a cache started on a state the block had not followed
    has none for the positions before it, which only costs the drafts some context.
    pending: `conv` is the final-normed hidden `[B, H]` at `hidden_position`, the first input of
    the block once the next token is known; `recurrent` holds (first_position, next_position,
    hidden_position) as fp32 `[3]` (exact far beyond any context), hidden_position -1 for none.
    """

    def __init__(self, kv: AttentionLayerState, pending: LinearLayerState):
        self.kv, self.pending = kv, pending

    @classmethod
    def new(cls, lm: LanguageModel, batch_size: int = 1, position: int = 0) -> MtpCache:
        cfg = lm.config
        kv = empty_kv(batch_size, cfg.num_key_value_heads, cfg.head_dim, lm.dtype, lm.device)
        hidden = torch.zeros(batch_size, cfg.hidden_size, dtype=lm.dtype, device=lm.device)
        marks = torch.tensor([position, position, -1], dtype=torch.float32, device=lm.device)
        return cls(kv, LinearLayerState(hidden, marks))

    def _marks(self) -> list[int]:
        return [int(x) for x in self.pending.recurrent.tolist()]

    @torch.inference_mode()
    def _set_marks(self, first: int, next_position: int, hidden_position: int) -> None:
        self.pending.recurrent.copy_(torch.tensor([first, next_position, hidden_position], dtype=torch.float32))

    @property
    def first_position(self) -> int:
        return self._marks()[0]

    @property
    def next_position(self) -> int:
        return self._marks()[1]

    @property
    def hidden_position(self) -> int:
        return self._marks()[2]

    @property
    def length(self) -> int:
        first, next_position, _ = self._marks()
        return next_position - first

    @property
    def hidden(self) -> torch.Tensor | None:
        """`[B, H]` at `hidden_position`, or None."""
        return self.pending.conv if self.hidden_position >= 0 else None

    def in_step(self, seen_tokens: int) -> bool:
        """Whether the cache has followed a state of `seen_tokens` tokens: every pair it completed
        is in, and the hidden of its last position waits for the next token."""
        _, next_position, hidden_position = self._marks()
        return seen_tokens > 0 and next_position == hidden_position == seen_tokens - 1

    def entries(self) -> tuple[torch.Tensor, torch.Tensor]:
        """K, V `[B, KVH, length, D]` of positions `first_position .. next_position - 1`."""
        first, next_position, _ = self._marks()
        return self.kv.key[:, :, first + 1:next_position + 1], self.kv.value[:, :, first + 1:next_position + 1]

    def move_to(self, position: int) -> None:
        """Make `position` the next entry's: forget entries from it on; one past the end (the state
        moved on without the block) or before the first starts the entries afresh there."""
        first, next_position, hidden_position = self._marks()
        if not first <= position <= next_position:
            first = position
        self._set_marks(first, position, hidden_position)

    def truncate_from(self, position: int) -> None:
        """Forget the entries at `position` and later."""
        first, next_position, hidden_position = self._marks()
        self._set_marks(min(first, position), min(next_position, position), hidden_position)

    def window(self, position: int, count: int) -> tuple[AttentionLayerState, int]:
        """The K/V seen by entries `position .. position + count - 1` (after `move_to(position)`):
        a view starting at `first_position`, with room for them, and the entries before them."""
        first = self.first_position
        self.kv.ensure_capacity(position + count + 1)
        view = AttentionLayerState(self.kv.key[:, :, first + 1:], self.kv.value[:, :, first + 1:])
        return view, position - first

    def advanced(self, count: int) -> None:
        first, next_position, hidden_position = self._marks()
        self._set_marks(first, next_position + count, hidden_position)

    @torch.inference_mode()
    def keep_hidden(self, hidden: torch.Tensor, position: int) -> None:
        """hidden `[B, H]`: the final-normed main hidden at `position`, waiting for its next token."""
        self.pending.conv.copy_(hidden)
        first, next_position, _ = self._marks()
        self._set_marks(first, next_position, position)

    def layers(self) -> list[LayerState]:
        return [self.kv, self.pending]


def new_mtp_cache(lm: LanguageModel, batch_size: int = 1, position: int = 0) -> MtpCache:
    return MtpCache.new(lm, batch_size, position)


def state_mtp(lm: LanguageModel, state: ModelState) -> MtpCache | None:
    """The MTP cache `state` carries, or None (an older state, or a model without an MTP block,
    which cannot keep one in step)."""
    if len(state.layers) != lm.config.num_hidden_layers + MTP_STATE_LAYERS or mtp_block(lm) is None:
        return None
    kv, pending = state.layers[-MTP_STATE_LAYERS:]
    return MtpCache(kv, pending)


def with_mtp(lm: LanguageModel, state: ModelState) -> ModelState:
    """`state` with an MTP cache when the model has an MTP block (added in place, starting at
    the state's position, if the state has none)."""
    if mtp_block(lm) is not None and state_mtp(lm, state) is None:
        state.layers.extend(MtpCache.new(lm, state.batch_size, state.seen_tokens).layers())
    return state


class MtpRunner:
    """Runs the MTP block of `lm` over (hidden, next token) pairs, appending to an `MtpCache`."""

    def __init__(self, lm: LanguageModel, block: MtpBlock):
        self.lm, self.block = lm, block

    @torch.inference_mode()
    def extend(self, cache: MtpCache, hidden: torch.Tensor, tokens: torch.Tensor, position: int) -> torch.Tensor:
        """hidden `[B, T, H]` at positions `position..position+T-1`, tokens `[B, T]` (each the token
        after its hidden's position) -> the block's normed outputs `[B, T, H]`."""
        return self._run(self.block, cache, hidden, tokens, position)

    @torch.inference_mode()
    def record(self, cache: MtpCache, hidden: torch.Tensor, tokens: torch.Tensor, position: int) -> None:
        """As extend, for pairs whose outputs nobody reads: only their K/V are computed (MtpBlock.record)."""
        self._run(self.block.record, cache, hidden, tokens, position)

    def _run(self, step, cache: MtpCache, hidden: torch.Tensor, tokens: torch.Tensor, position: int):
        length = tokens.shape[1]
        cache.move_to(position)
        kv, past = cache.window(position, length)
        positions = torch.arange(position, position + length, device=self.lm.device)
        rope = self.lm.rotary.cos_sin(positions, self.lm.dtype)
        embeds = self.lm.module.model.embed_tokens(tokens.to(self.lm.device))
        out = step(embeds, hidden.to(self.lm.dtype), rope, kv, past)
        cache.advanced(length)
        return out

    @torch.inference_mode()
    def follow(self, cache: MtpCache, normed: torch.Tensor, tokens: torch.Tensor, position: int) -> None:
        """The main model consumed `tokens` `[B, T]` at `position..position+T-1`, giving the
        final-normed hidden states `normed` `[B, T, H]`: add every pair they complete (the pending
        hidden's first, if the cache is in step) and keep the last hidden pending."""
        if cache.in_step(position):
            self.record(cache, torch.cat([cache.hidden[:, None], normed[:, :-1]], dim=1), tokens, position - 1)
        elif tokens.shape[1] > 1:
            self.record(cache, normed[:, :-1], tokens[:, 1:], position)
        else:
            cache.move_to(position)
        cache.keep_hidden(normed[:, -1], position + tokens.shape[1] - 1)

    @torch.inference_mode()
    def logits(self, out: torch.Tensor) -> torch.Tensor:
        """Block outputs `[..., H]` -> draft logits `[..., vocab]` through the main `lm_head`."""
        return self.lm.module.lm_head(out)
