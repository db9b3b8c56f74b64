"""Qwen3-Next building blocks. Parameter names follow the published checkpoint."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kernels.attention import causal_attention
from kernels.causal_conv1d import causal_conv1d, causal_conv1d_update
from kernels.gated_delta_rule import gated_delta_rule_from_gates
from kernels.gated_delta_rule import native as delta_native
from kernels.gated_rmsnorm import add_rms_norm, gated_rms_norm, rms_norm
from kernels.linear import linear
from kernels.moe import moe_experts, moe_experts_quantized, moe_route
from kernels.moe import native as moe_native
from kernels.quant import moe_native as quant_moe
from kernels.quant import prefill as quant_prefill
from kernels.rotary import apply_rotary
from kernels.rowwise import per_token

from .config import ModelConfig
from .state import AttentionLayerState, LinearLayerState


class Linear(nn.Linear):
    """`nn.Linear` whose few-row calls (decode, draft verification) take the small-row kernel."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)


class ZeroCenteredRMSNorm(nn.Module):
    """RMSNorm scaled by `1 + weight` (weights are stored around zero)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps, zero_centered=True)


class GatedRMSNorm(nn.Module):
    """RMSNorm with a plain weight (stored around one), multiplied by `silu(z)`."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        return gated_rms_norm(x, z, self.weight, self.eps)


class GatedAttention(nn.Module):
    """Softmax attention whose output is gated per channel by `sigmoid(gate)` from `q_proj`."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.heads = config.num_attention_heads
        self.kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        hidden, bias = config.hidden_size, config.attention_bias
        self.q_proj = Linear(hidden, self.heads * self.head_dim * 2, bias=bias)
        self.k_proj = Linear(hidden, self.kv_heads * self.head_dim, bias=bias)
        self.v_proj = Linear(hidden, self.kv_heads * self.head_dim, bias=bias)
        self.o_proj = Linear(self.heads * self.head_dim, hidden, bias=bias)
        self.q_norm = ZeroCenteredRMSNorm(self.head_dim, config.rms_norm_eps)
        self.k_norm = ZeroCenteredRMSNorm(self.head_dim, config.rms_norm_eps)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], state: AttentionLayerState,
                past: int) -> torch.Tensor:
        """x `[B, T, hidden]`; appends this chunk's K/V to `state` after `past` positions."""
        batch, length, _ = x.shape
        query, gate = self.q_proj(x).view(batch, length, self.heads, 2 * self.head_dim).chunk(2, dim=-1)
        query = apply_rotary(self.q_norm(query), *rope)
        total = self.append_kv(x, rope, state, past)
        attn = causal_attention(query, state.key[:, :, :total], state.value[:, :, :total], self.head_dim**-0.5,
                                gate=gate)
        return self.o_proj(attn.reshape(batch, length, -1))

    def append_kv(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], state: AttentionLayerState,
                  past: int) -> int:
        """Write the K/V of x `[B, T, hidden]` at positions `past..past+T-1` of `state`; returns past + T."""
        batch, length, _ = x.shape
        key = self.k_norm(self.k_proj(x).view(batch, length, self.kv_heads, self.head_dim))
        value = self.v_proj(x).view(batch, length, self.kv_heads, self.head_dim)
        total = past + length
        state.ensure_capacity(total)
        state.key[:, :, past:total] = apply_rotary(key, *rope).transpose(1, 2)
        state.value[:, :, past:total] = value.transpose(1, 2)
        return total


class GatedDeltaNet(nn.Module):
    """Linear attention with the gated delta rule; state size independent of length."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.key_heads = config.linear_num_key_heads
        self.value_heads = config.linear_num_value_heads
        self.key_dim = config.linear_key_head_dim
        self.value_dim = config.linear_value_head_dim
        self.group = self.value_heads // self.key_heads
        conv_dim = config.linear_conv_dim
        qkvz = 2 * self.key_heads * self.key_dim + 2 * self.value_heads * self.value_dim
        self.in_proj_qkvz = Linear(config.hidden_size, qkvz, bias=False)
        self.in_proj_ba = Linear(config.hidden_size, 2 * self.value_heads, bias=False)
        self.conv1d = nn.Conv1d(conv_dim, conv_dim, config.linear_conv_kernel_dim, groups=conv_dim, bias=False)
        self.dt_bias = nn.Parameter(torch.ones(self.value_heads))
        self.A_log = nn.Parameter(torch.zeros(self.value_heads))
        self.norm = GatedRMSNorm(self.value_dim, config.rms_norm_eps)
        self.out_proj = Linear(self.value_heads * self.value_dim, config.hidden_size, bias=False)

    def _split_projections(self, x: torch.Tensor):
        """The projections are grouped per key head: `[q | k | v(group) | z(group)]` and `[b | a]`."""
        batch, length, _ = x.shape
        group_v = self.group * self.value_dim
        projected, gates = self.in_proj_qkvz(x), self.in_proj_ba(x)
        if delta_native.supports_split(projected, gates):
            return delta_native.split_projections(projected, gates, self.key_heads, self.key_dim, self.value_heads,
                                                  self.value_dim)
        mixed = projected.view(batch, length, self.key_heads, -1)
        query, key, value, z = mixed.split([self.key_dim, self.key_dim, group_v, group_v], dim=-1)
        b, a = gates.view(batch, length, self.key_heads, -1).split([self.group, self.group], dim=-1)
        qkv = torch.cat([t.reshape(batch, length, -1) for t in (query, key, value)], dim=-1)
        z = z.reshape(batch, length, self.value_heads, self.value_dim)
        return qkv, z, b.reshape(batch, length, -1), a.reshape(batch, length, -1)

    def forward(self, x: torch.Tensor, state: LinearLayerState) -> torch.Tensor:
        batch, length, _ = x.shape
        qkv, z, b, a = self._split_projections(x)
        weight = self.conv1d.weight.squeeze(1)
        if delta_native.supports(qkv, state.conv, state.recurrent, self.value_dim):
            # A few tokens in bf16 on CPU: conv, gates and delta rule in one native call.
            out, state.conv, state.recurrent = delta_native.gated_delta_step(
                qkv, state.conv, weight, a, b, self.A_log, self.dt_bias, state.recurrent,
                self.key_heads, self.key_dim, self.value_dim,
            )
            return self.out_proj(self.norm(out, z).reshape(batch, length, -1))
        if length == 1:
            mixed = causal_conv1d_update(qkv[:, 0], state.conv, weight)[:, None]
        else:
            conv_out, state.conv = causal_conv1d(qkv.transpose(1, 2), weight, conv_state=state.conv)
            mixed = conv_out.transpose(1, 2)
        key_width = self.key_heads * self.key_dim
        query, key, value = mixed.split([key_width, key_width, self.value_heads * self.value_dim], dim=-1)
        query = query.reshape(batch, length, self.key_heads, self.key_dim)
        key = key.reshape(batch, length, self.key_heads, self.key_dim)
        value = value.reshape(batch, length, self.value_heads, self.value_dim)

        out, state.recurrent = gated_delta_rule_from_gates(
            query, key, value, a, b, self.A_log, self.dt_bias, initial_state=state.recurrent,
            use_qk_l2norm=True,
        )
        out = self.norm(out, z)
        return self.out_proj(out.reshape(batch, length, -1))


class SwiGLU(nn.Module):
    def __init__(self, hidden: int, width: int):
        super().__init__()
        self.gate_proj = Linear(hidden, width, bias=False)
        self.up_proj = Linear(hidden, width, bias=False)
        self.down_proj = Linear(width, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Router(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(config.num_experts, config.hidden_size))
        self.top_k = config.num_experts_per_tok
        self.normalize = config.norm_topk_prob

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x `[N, hidden]` -> (weights `[N, k]` in x.dtype, expert ids `[N, k]`)."""
        return moe_route(x, self.weight, self.top_k, self.normalize)


class Experts(nn.Module):
    """All routed experts' SwiGLU weights, stacked: gate and up fused as `[E, 2I, hidden]`."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        width = config.moe_intermediate_size
        self.gate_up_proj = nn.Parameter(torch.zeros(config.num_experts, 2 * width, config.hidden_size))
        self.down_proj = nn.Parameter(torch.zeros(config.num_experts, config.hidden_size, width))

    def forward(self, x: torch.Tensor, weights: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
        """Runs each expert once on the tokens routed to it; experts nobody chose cost nothing."""
        if quant_prefill.supports_experts(x, self.gate_up_proj, self.down_proj):
            # Prefill chunks over quantized experts: the bf16 experts on the routed experts' exact weights.
            return moe_experts_quantized(x, weights, experts, self.gate_up_proj, self.down_proj)
        return moe_experts(x, weights, experts, self.gate_up_proj, self.down_proj)


class SparseMoE(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.gate = Router(config)
        self.experts = Experts(config)
        self.shared_expert = SwiGLU(config.hidden_size, config.shared_expert_intermediate_size)
        self.shared_expert_gate = Linear(config.hidden_size, 1, bias=False)
        self._quantized_block: quant_moe.QuantizedMoE | None = None

    def _native_weights(self) -> tuple[torch.Tensor, ...]:
        shared = self.shared_expert
        return (self.gate.weight, self.experts.gate_up_proj, self.experts.down_proj, shared.gate_proj.weight,
                shared.up_proj.weight, shared.down_proj.weight, self.shared_expert_gate.weight)

    def quantized_block(self) -> quant_moe.QuantizedMoE:
        """The block's weights described once for the quantized MoE kernel (again if they were replaced)."""
        weights = self._native_weights()
        if self._quantized_block is None or not self._quantized_block.holds(weights):
            router, gate_up, down, *shared = weights
            self._quantized_block = quant_moe.QuantizedMoE(router, self.gate.top_k, self.gate.normalize, gate_up,
                                                           down, *shared)
        return self._quantized_block

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        block_weights = self._native_weights()
        if not torch.is_grad_enabled() and moe_native.supports(flat, *block_weights, top_k=self.gate.top_k):
            # A few tokens in bf16 on CPU: the whole block in one native call.
            router, gate_up, down, *shared = block_weights
            return moe_native.sparse_moe(flat, router, self.gate.top_k, self.gate.normalize, gate_up, down,
                                         *shared).view(shape)
        if quant_moe.supports(flat, *block_weights, top_k=self.gate.top_k):
            # A few tokens over quantized weights: the whole block in one native call, as the few-token forward.
            return self.quantized_block()(flat).view(shape)
        weights, experts = self.gate(flat)
        routed = self.experts(flat, weights, experts)
        gate = per_token(lambda tokens: torch.sigmoid(self.shared_expert_gate(tokens)), flat, dim=0)
        shared = gate * self.shared_expert(flat)
        return (routed + shared).view(shape)


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, index: int):
        super().__init__()
        self.is_linear = config.layer_types[index] == "linear_attention"
        if self.is_linear:
            self.linear_attn = GatedDeltaNet(config)
        else:
            self.self_attn = GatedAttention(config)
        if config.is_moe_layer(index):
            self.mlp = SparseMoE(config)
        else:
            self.mlp = SwiGLU(config.hidden_size, config.intermediate_size)
        self.input_layernorm = ZeroCenteredRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = ZeroCenteredRMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, x, rope, state, past: int) -> torch.Tensor:
        normed = self.input_layernorm(x)
        if self.is_linear:
            mixed = self.linear_attn(normed, state)
        else:
            mixed = self.self_attn(normed, rope, state, past)
        post_norm = self.post_attention_layernorm
        x, normed = add_rms_norm(x, mixed, post_norm.weight, post_norm.eps)
        return x + self.mlp(normed)
