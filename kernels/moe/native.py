"""ctypes bindings of the MoE kernels, each built for AVX-512 (BF16, AMX) and for AVX2 + FMA + F16C (and
the routed experts for AVX-512 without BF16 too):
`sparse_moe_bf16.c`, the whole sparse MoE block for a few bf16 tokens, and `experts_bf16.c`, the
routed experts for many tokens, over bf16 weights or quantized ones (dequantized exactly as the
kernel reaches them)."""

from __future__ import annotations

from pathlib import Path

import torch

from ..native import FEW_TOKENS, Kernel, tiles_pay_off
from ..quant.formats import QuantizedRows, QuantizedWeight
from ..quant.moe_native import MAX_TOP_K, expert_table, gate_up_split_problem

HERE = Path(__file__).parent

SPARSE_MOE = Kernel(HERE / "sparse_moe_bf16.c", "sparse_moe_bf16", "piipiinppipppippn", isas=("avx512", "avx2"),
                    returns="n")
EXPERTS_ISAS = ("avx512", "avx512f", "avx2")
EXPERTS = Kernel(HERE / "experts_bf16.c", "moe_experts_bf16", "piippiippipnn", isas=EXPERTS_ISAS, returns="n")
QUANTIZED_EXPERTS = Kernel(HERE / "experts_bf16.c", "moe_experts_quant", "piippiipipnn", isas=EXPERTS_ISAS,
                           returns="n")


def kernel() -> Kernel | None:
    """The sparse-MoE block kernel, or None where no build of it runs here."""
    return SPARSE_MOE if SPARSE_MOE.available() else None


def experts_kernel() -> Kernel | None:
    """The routed-experts kernel, or None where no build of it runs here."""
    return EXPERTS if EXPERTS.available() else None


def supports(x: torch.Tensor, *weights: torch.Tensor, top_k: int) -> bool:
    """x `[N, H]`: bf16 on CPU, at most FEW_TOKENS tokens, contiguous bf16 weights."""
    return (
        x.device.type == "cpu"
        and x.dtype == torch.bfloat16
        and 0 < x.shape[0] <= FEW_TOKENS
        and top_k <= MAX_TOP_K
        and all(w.dtype == torch.bfloat16 and w.is_contiguous() for w in weights)
        and kernel() is not None
    )


def sparse_moe(x: torch.Tensor, router: torch.Tensor, top_k: int, normalize: bool, gate_up: torch.Tensor,
               down: torch.Tensor, shared_gate_proj: torch.Tensor, shared_up_proj: torch.Tensor,
               shared_down: torch.Tensor, shared_gate: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """x `[N, H]` -> `[N, H]`: routed experts (router `[E, H]`, gate_up `[E, 2I, H]`, down `[E, H, I]`)
    plus the shared expert (gate/up `[S, H]`, down `[H, S]`) scaled by sigmoid(shared_gate `[1, H]` . x);
    into `out` (contiguous) when given."""
    x = x.contiguous()
    tokens, hidden = x.shape
    if out is None:
        out = torch.empty_like(x)
    status = SPARSE_MOE(x, tokens, hidden, router, router.shape[0], top_k, int(normalize), gate_up, down,
                        down.shape[2], shared_gate_proj, shared_up_proj, shared_down, shared_gate_proj.shape[0],
                        shared_gate, out, torch.get_num_threads())
    if status != 0:
        raise MemoryError("MoE work buffers could not be allocated")
    return out


def supports_experts(x: torch.Tensor, weights: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor) -> bool:
    """x `[N, H]` and the routing weights bf16 on CPU, top-k at most MAX_TOP_K, contiguous bf16 weights,
    hidden and expert widths multiples of 16."""
    return (
        x.device.type == "cpu"
        and gate_up.shape[2] % 16 == 0
        and down.shape[2] % 16 == 0
        and x.dtype == weights.dtype == gate_up.dtype == down.dtype == torch.bfloat16
        and weights.shape[1] <= MAX_TOP_K
        and gate_up.is_contiguous()
        and down.is_contiguous()
        and experts_kernel() is not None
    )


def moe_experts(x: torch.Tensor, weights: torch.Tensor, experts: torch.Tensor, gate_up: torch.Tensor,
                down: torch.Tensor, amx: bool | None = None) -> torch.Tensor:
    """x `[N, H]`; weights, experts `[N, k]`; gate_up `[E, 2I, H]`; down `[E, H, I]` -> `[N, H]` bf16,
    the contract of `reference.experts_swiglu`. `amx`: use AMX tiles (default: for more than a few
    tokens on CPUs whose matmuls use them; never for few tokens, whose bits must not depend on the
    call's size; the AVX2 build has none)."""
    return _routed(EXPERTS, x, weights, experts, gate_up.shape[0], (gate_up, down), down.shape[2], amx)


def supports_quantized_experts(x: torch.Tensor, weights: torch.Tensor, gate_up: QuantizedRows | QuantizedWeight,
                               down: QuantizedWeight) -> bool:
    """As supports_experts, for stacked quantized experts on the CPU: gate_up `[E, 2I, H]` a
    QuantizedRows of gate and up (`[E, I, H]` each) or one weight (in fp8 only where gate and up
    meet at a 128-row scale block), down `[E, H, I]`."""
    if not (isinstance(gate_up, QuantizedRows | QuantizedWeight) and isinstance(down, QuantizedWeight)):
        return False
    width = down.shape[2]
    return (
        x.device.type == gate_up.device.type == down.device.type == "cpu"
        and x.dim() == 2
        and len(gate_up.shape) == len(down.shape) == 3
        and gate_up.shape[1] == 2 * width
        and gate_up_split_problem(gate_up, width) is None
        and gate_up.shape[2] % 16 == 0
        and width % 16 == 0
        and x.dtype == weights.dtype == torch.bfloat16
        and weights.shape[1] <= MAX_TOP_K
        and QUANTIZED_EXPERTS.available()
    )


def moe_experts_quantized(x: torch.Tensor, weights: torch.Tensor, experts: torch.Tensor,
                          gate_up: QuantizedRows | QuantizedWeight, down: QuantizedWeight,
                          amx: bool | None = None) -> torch.Tensor:
    """moe_experts over quantized experts: the bits of moe_experts on their exact weights rounded to
    bf16, without those bf16 weights ever being written out whole."""
    kept: list[torch.Tensor] = []
    table = expert_table(gate_up, down, kept)
    return _routed(QUANTIZED_EXPERTS, x, weights, experts, down.shape[0], (table,), down.shape[2], amx)


def _routed(kernel: Kernel, x: torch.Tensor, weights: torch.Tensor, experts: torch.Tensor, count: int,
            weight_arguments: tuple, width: int, amx: bool | None) -> torch.Tensor:
    """One call of an experts kernel (`count` experts of `width`, weights as `weight_arguments`)."""
    if amx is None:
        amx = tiles_pay_off(x.shape[0])
    x, weights = x.contiguous(), weights.contiguous()
    experts = experts.to(torch.int64).contiguous()
    tokens, hidden = x.shape
    out = torch.empty_like(x)
    status = kernel(x, tokens, hidden, weights, experts, weights.shape[1], count, *weight_arguments, width, out,
                    int(amx), torch.get_num_threads(), isa=kernel.isa_for(hidden, width))
    if status != 0:
        raise MemoryError("MoE work buffers could not be allocated")
    return out
