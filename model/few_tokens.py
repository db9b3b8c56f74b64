"""The decoder over a few tokens (decode steps, draft verification) as a short list of native calls.

At decode the module path spends ~1.7 ms a token on Python and dispatch around ~60 small PyTorch
ops and kernel calls per layer. Here, for one sequence in bf16 on CPU with the native kernels
present, a layer is ~10 kernel calls on buffers allocated once: the residual add fused into the next
norm, the Gated DeltaNet projections read in their checkpoint layout, the key rotated straight
into the K/V cache. Weights held quantized (fp8 blocks, int8, int4) take the quantized small-row
kernel where bf16 ones take the bf16 one, and a sparse MoE block with quantized experts the
quantized block kernel. The same kernels run in the same order on the same values, so hidden
states and model states equal the module path's bit for bit (tests/test_few_tokens.py,
tests/test_few_tokens_quantized.py).
"""

from __future__ import annotations

import threading
from collections.abc import Callable

import torch

from kernels.attention import native as attention_native
from kernels.gated_delta_rule import native as delta_native
from kernels.gated_rmsnorm import native as norm_native
from kernels.linear import native as linear_native
from kernels.moe import native as moe_native
from kernels.native import FEW_TOKENS
from kernels.quant import QuantizedRows, QuantizedWeight
from kernels.quant import moe_native as quant_moe
from kernels.quant import native as quant_native
from kernels.rotary import native as rotary_native

from .config import ModelConfig
from .layers import DecoderLayer, Experts, GatedAttention, GatedDeltaNet, SparseMoE
from .quantization import quantized_weights
from .state import AttentionLayerState, LayerState, LinearLayerState

MAX_TOKENS = FEW_TOKENS


def _kernels_present(quantized: bool) -> bool:
    kernels = [linear_native.kernel, norm_native.kernels, norm_native.add_kernel, delta_native.grouped_kernel,
               moe_native.kernel, attention_native.kernel, rotary_native.kernel]
    if quantized:
        kernels += [quant_native.kernel, quant_moe.kernel]
    return all(k() is not None for k in kernels)


def _readable(owner: torch.nn.Module, weight: QuantizedWeight | QuantizedRows) -> bool:
    """Whether the quantized kernels read this weight of `owner`: on the CPU, int4 groups of whole
    steps, and a 2-D QuantizedWeight unless it is a stack of routed experts (the MoE kernel's)."""
    parts = weight.parts if isinstance(weight, QuantizedRows) else (weight,)
    shaped = isinstance(owner, Experts) or (isinstance(weight, QuantizedWeight) and weight.dim() == 2)
    return shaped and all(part.device.type == "cpu" and quant_native.int4_group_fits(part) for part in parts)


def _fits(module: torch.nn.Module, config: ModelConfig) -> bool:
    """Whether every weight is a contiguous bf16 tensor or a quantized weight the kernels read, a MoE
    block with quantized weights is one the quantized block kernel takes, no projection has a bias,
    and the widths are ones the kernels take (multiples of 16, head dims up to the attention kernel's
    limit)."""
    widths = (config.hidden_size, config.head_dim, config.linear_value_head_dim, config.linear_key_head_dim)
    probe = torch.zeros(1, config.hidden_size, dtype=torch.bfloat16)
    return (
        all(p.dtype == torch.bfloat16 and p.is_contiguous() and p.device.type == "cpu" for p in module.parameters())
        and all(_readable(owner, value) for owner in module.modules() for value in vars(owner).values()
                if isinstance(value, QuantizedWeight | QuantizedRows))
        and all(quant_moe.supports(probe, *block._native_weights(), top_k=block.gate.top_k)
                for block in module.modules()
                if isinstance(block, SparseMoE) and quantized_weights(block))
        and not config.attention_bias
        and all(width % 16 == 0 for width in widths)
        and config.head_dim <= attention_native.MAX_HEAD_DIM
        and config.num_experts_per_tok <= moe_native.MAX_TOP_K
    )


Projection = Callable[[torch.Tensor, torch.Tensor], object]


def _projection(weight: torch.Tensor | QuantizedWeight) -> Projection:
    """(x `[T, K]` bf16, out `[T, N]` bf16) -> out = x times weight `[N, K]`, by the kernel
    `kernels.linear.linear` takes for a few rows of this weight."""
    if isinstance(weight, QuantizedWeight):
        return quant_native.BoundWeight(weight)
    return lambda x, out: linear_native.linear_small_m(x, weight, torch.bfloat16, out=out)


class _Rows:
    """Work buffers for up to MAX_TOKENS rows and the views the calls take, made once per row count."""

    def __init__(self, config: ModelConfig):
        hidden, bf16 = config.hidden_size, torch.bfloat16
        self.key_heads, self.value_heads = config.linear_num_key_heads, config.linear_num_value_heads
        self.value_dim, self.head_dim = config.linear_value_head_dim, config.head_dim
        qkvz = 2 * self.key_heads * config.linear_key_head_dim + 2 * self.value_heads * self.value_dim
        heads, kv_heads, dim = config.num_attention_heads, config.num_key_value_heads, config.head_dim
        shapes = {
            "residual": (hidden,), "normed": (hidden,), "delta": (hidden,),
            "qkvz": (qkvz,), "ba": (2 * self.value_heads,), "core": (self.value_heads, self.value_dim),
            "gated": (self.value_heads * self.value_dim,),
            "query_gate": (heads, 2 * dim), "key": (kv_heads, dim), "value": (kv_heads, dim),
            "query_normed": (heads, dim), "key_normed": (kv_heads, dim), "query": (heads, dim),
            "attended": (heads, dim),
        }
        self._full = {name: torch.empty(MAX_TOKENS, *shape, dtype=bf16) for name, shape in shapes.items()}
        self._sliced: dict[int, dict[str, torch.Tensor]] = {}

    def __call__(self, count: int) -> dict[str, torch.Tensor]:
        if count not in self._sliced:
            self._sliced[count] = self._views(count)
        return self._sliced[count]

    def _views(self, count: int) -> dict[str, torch.Tensor]:
        rows = {name: full[:count] for name, full in self._full.items()}
        group, dim = self.value_heads // self.key_heads, self.head_dim
        # z is the last g * V of each key head's slice of the projection: `[T, Hk, g, V]` as strided rows.
        z = rows["qkvz"].view(count, self.key_heads, -1)[:, :, -group * self.value_dim:]
        rows["z"] = z.unflatten(-1, (group, self.value_dim))
        rows["core_grouped"] = rows["core"].view(rows["z"].shape)
        rows["gated_grouped"] = rows["gated"].view(rows["z"].shape)
        for name in ("query_gate", "key", "value", "attended"):
            rows[f"{name}_flat"] = rows[name].flatten(1)
        rows["query_part"] = rows["query_gate"][..., :dim]
        rows["gate"] = rows["query_gate"][None, ..., dim:]
        rows["query_batch"], rows["attended_batch"] = rows["query"][None], rows["attended"][None]
        return rows


class _LinearAttentionWeights:
    """A Gated DeltaNet block's tensors, read once (module attribute lookups cost more than the kernels)."""

    def __init__(self, block: GatedDeltaNet):
        self.qkvz, self.ba, self.out = (_projection(block.in_proj_qkvz.weight), _projection(block.in_proj_ba.weight),
                                        _projection(block.out_proj.weight))
        self.norm, self.norm_eps = block.norm.weight, block.norm.eps
        self.key_heads, self.key_dim, self.value_dim = block.key_heads, block.key_dim, block.value_dim
        # As GatedDeltaNet.forward computes them each call (same expressions, same bits).
        self.conv = block.conv1d.weight.squeeze(1).contiguous()
        self.decay_rate = block.A_log.float().exp().contiguous()
        self.dt_bias = block.dt_bias.float().contiguous()


class _AttentionWeights:
    def __init__(self, block: GatedAttention):
        self.q, self.k, self.v, self.o = (_projection(block.q_proj.weight), _projection(block.k_proj.weight),
                                          _projection(block.v_proj.weight), _projection(block.o_proj.weight))
        self.q_norm, self.k_norm, self.norm_eps = block.q_norm.weight, block.k_norm.weight, block.q_norm.eps
        self.scale = block.head_dim**-0.5


class _Layer:
    def __init__(self, layer: DecoderLayer, next_norm: torch.Tensor):
        self.is_linear = layer.is_linear
        self.mixer = (_LinearAttentionWeights(layer.linear_attn) if layer.is_linear
                      else _AttentionWeights(layer.self_attn))
        self.post_norm, self.next_norm = layer.post_attention_layernorm.weight, next_norm
        mlp = layer.mlp
        # (x `[T, H]`, out `[T, H]`) -> out = the MoE block of x, by the kernel the module path takes.
        self.moe: Callable[[torch.Tensor, torch.Tensor], object] | None = None
        if isinstance(mlp, SparseMoE) and quantized_weights(mlp):
            self.moe = mlp.quantized_block()
        elif isinstance(mlp, SparseMoE):
            router, gate_up, down, *shared = mlp._native_weights()
            block = (router, mlp.gate.top_k, mlp.gate.normalize, gate_up, down, *shared)
            self.moe = lambda x, out: moe_native.sparse_moe(x, *block, out=out)
        self.dense = mlp


class FewTokenForward:
    """`hidden_states` for one sequence of 1..MAX_TOKENS tokens; see the module docstring."""

    def __init__(self, module: torch.nn.Module, config: ModelConfig):
        self.embedding = module.model.embed_tokens.weight
        layers = list(module.model.layers)
        self.first_norm = layers[0].input_layernorm.weight
        norms = [layer.input_layernorm.weight for layer in layers[1:]] + [module.model.norm.weight]
        self.layers = [_Layer(layer, norm) for layer, norm in zip(layers, norms, strict=True)]
        self.eps = config.rms_norm_eps
        self.rows = _Rows(config)
        # The work buffers are shared: calls from several threads take turns (the module path does not).
        self._lock = threading.Lock()

    @classmethod
    def build(cls, module: torch.nn.Module, config: ModelConfig) -> FewTokenForward | None:
        """The fast path for this model, or None where it cannot run (then the module path does)."""
        if not _kernels_present(bool(quantized_weights(module))) or not _fits(module, config):
            return None
        return cls(module, config)

    def takes(self, input_ids: torch.Tensor) -> bool:
        """input_ids `[B, T]`: one sequence of at most MAX_TOKENS tokens, no autograd."""
        return input_ids.shape[0] == 1 and 0 < input_ids.shape[1] <= MAX_TOKENS and not torch.is_grad_enabled()

    def hidden_states(self, input_ids: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor],
                      states: list[LayerState], past: int) -> torch.Tensor:
        """input_ids `[1, T]` -> hidden states before the final norm `[1, T, hidden]` (a new tensor);
        advances the layer states by the T tokens that follow `past`."""
        with self._lock:
            return self._hidden_states(input_ids, rope, states, past)

    def _hidden_states(self, input_ids: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor],
                       states: list[LayerState], past: int) -> torch.Tensor:
        count = input_ids.shape[1]
        rows = self.rows(count)
        residual, normed, delta = rows["residual"], rows["normed"], rows["delta"]
        torch.index_select(self.embedding, 0, input_ids[0], out=residual)
        norm_native.rms_norm(residual, self.first_norm, self.eps, True, out=normed)
        for layer, state in zip(self.layers, states, strict=True):
            if layer.is_linear:
                self._linear_attention(layer.mixer, state, rows)
            else:
                self._attention(layer.mixer, state, rows, rope, past)
            norm_native.add_rms_norm(residual, delta, layer.post_norm, self.eps, True, normed)
            if layer.moe is not None:
                layer.moe(normed, out=delta)
            else:
                delta.copy_(layer.dense(normed))
            norm_native.add_rms_norm(residual, delta, layer.next_norm, self.eps, True, normed)
        return residual.clone().view(1, count, -1)

    @staticmethod
    def _linear_attention(weights: _LinearAttentionWeights, state: LinearLayerState,
                          rows: dict[str, torch.Tensor]) -> None:
        normed, qkvz, ba = rows["normed"], rows["qkvz"], rows["ba"]
        weights.qkvz(normed, qkvz)
        weights.ba(normed, ba)
        if not (state.conv.is_contiguous() and state.recurrent.is_contiguous()):
            state.conv, state.recurrent = state.conv.contiguous(), state.recurrent.contiguous()
        delta_native.gated_delta_step_grouped(
            qkvz, ba, state.conv[0], weights.conv, weights.decay_rate, weights.dt_bias, state.recurrent[0],
            weights.key_heads, weights.key_dim, weights.value_dim, rows["core"])
        norm_native.gated_rms_norm(rows["core_grouped"], rows["z"], weights.norm, weights.norm_eps,
                                   out=rows["gated_grouped"])
        weights.out(rows["gated"], rows["delta"])

    @staticmethod
    def _attention(weights: _AttentionWeights, state: AttentionLayerState, rows: dict[str, torch.Tensor],
                   rope: tuple[torch.Tensor, torch.Tensor], past: int) -> None:
        normed = rows["normed"]
        weights.q(normed, rows["query_gate_flat"])
        weights.k(normed, rows["key_flat"])
        weights.v(normed, rows["value_flat"])
        norm_native.rms_norm(rows["query_part"], weights.q_norm, weights.norm_eps, True, out=rows["query_normed"])
        norm_native.rms_norm(rows["key"], weights.k_norm, weights.norm_eps, True, out=rows["key_normed"])
        cos, sin = rope
        total = past + cos.shape[0]
        state.ensure_capacity(total)
        rotary_native.rotate_into(rows["query_normed"], cos, sin, rows["query"])
        rotary_native.rotate_into(rows["key_normed"], cos, sin, state.key[0, :, past:total].transpose(0, 1))
        rotary_native.rotate_into(rows["value"], cos[:, :0], sin[:, :0], state.value[0, :, past:total].transpose(0, 1))
        attention_native.native_causal_attention(rows["query_batch"], state.key[:, :, :total],
                                                 state.value[:, :, :total], weights.scale, gate=rows["gate"],
                                                 out=rows["attended_batch"])
        weights.o(rows["attended_flat"], rows["delta"])
