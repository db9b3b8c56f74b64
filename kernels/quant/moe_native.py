"""Binding of `sparse_moe_quant.c`: the sparse MoE block for a few bf16 tokens whose experts (and
shared expert) are held quantized, in one native call; the router and the shared expert's gate are
read in bf16 as stored. `moe_reference.py` is its readable definition."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

from ..native import FEW_TOKENS, Kernel, int4_pairs_preferred
from .formats import FP8_BLOCK, FP8_BLOCK_SIZE, INT4_GROUP_SIZE, QuantizedRows, QuantizedWeight
from .native import BF16_CODE, FORMAT_CODES, VARIANTS, half_or_float, int4_group_fits

SOURCE = Path(__file__).with_name("sparse_moe_quant.c")
SPARSE_MOE = Kernel(SOURCE, "sparse_moe_quant", "pipinpnn", isas=VARIANTS, returns="n")
_LANES = Kernel(SOURCE, "sparse_moe_quant_lanes", "p", isas=VARIANTS)
# The most experts a token may take (MAX_TOP_K of kernels/moe/block_steps.h: the MoE kernels'
# per-token arrays).
MAX_TOP_K = 64
# One row of the weight table per weight, these int64 fields each (the C struct weight_ref).
WEIGHT_FIELDS = ("format", "data", "scale", "scale_bf16", "rows", "columns", "row_bytes", "scale_stride", "group",
                 "expert_bytes", "expert_scales")

Weight = Tensor | QuantizedWeight | QuantizedRows


def kernel() -> Kernel | None:
    """The block kernel where a build of it runs here, else None."""
    return SPARSE_MOE if SPARSE_MOE.available() else None


def available() -> bool:
    return kernel() is not None


def lanes(isa: str) -> int | None:
    """The vector width in fp32 lanes of the `isa` build (16 or 8), or None where it cannot run here."""
    if _LANES.entry(isa) is None:
        return None
    value = torch.zeros(1, dtype=torch.int32)
    _LANES(value, isa=isa)
    return int(value)


def _readable(weight: Weight, stacked: bool) -> bool:
    """A bf16 tensor or a quantized weight on the CPU, `[E, N, K]` when `stacked`, else `[N, K]`."""
    parts = weight.parts if isinstance(weight, QuantizedRows) else (weight,)
    return all(
        len(part.shape) == (3 if stacked else 2) and part.device.type == "cpu"
        and (int4_group_fits(part) if isinstance(part, QuantizedWeight) else part.dtype == torch.bfloat16)
        for part in parts
    )


def supports(x: Tensor, router: Tensor, gate_up: Weight, down: Weight, shared_gate_proj: Weight,
             shared_up_proj: Weight, shared_down: Weight, shared_expert_gate: Weight, top_k: int) -> bool:
    """Whether the kernel takes this block: x `[N, H]` bf16 on the CPU with at most FEW_TOKENS tokens,
    no gradient asked for, some weight quantized (bf16 blocks have their own kernel), every weight a
    bf16 tensor or a quantized weight the dot products read, top_k up to MAX_TOP_K, and a build this
    CPU runs."""
    weights = (router, gate_up, down, shared_gate_proj, shared_up_proj, shared_down, shared_expert_gate)
    if not any(isinstance(w, QuantizedWeight | QuantizedRows) for w in weights):
        return False
    if x.device.type != "cpu" or x.dtype != torch.bfloat16 or x.dim() != 2 or not 0 < x.shape[0] <= FEW_TOKENS:
        return False
    if torch.is_grad_enabled() and x.requires_grad:
        return False
    return (
        all(_readable(w, stacked=False) for w in (router, shared_gate_proj, shared_up_proj, shared_down,
                                                   shared_expert_gate))
        and _readable(gate_up, stacked=True) and _readable(down, stacked=True)
        and (not isinstance(gate_up, QuantizedRows) or len(gate_up.parts) == 2)
        and not (isinstance(gate_up, QuantizedWeight) and gate_up.format == FP8_BLOCK
                 and gate_up.shape[1] // 2 % FP8_BLOCK_SIZE)
        and 0 < top_k <= min(MAX_TOP_K, router.shape[0])
        and available()
    )


class QuantizedMoE:
    """A sparse MoE block's weights described once for the kernel (addresses, strides, formats);
    it keeps every tensor it describes alive. Shapes: router `[E, H]`; gate_up `[E, 2I, H]` (gate
    rows first; a QuantizedRows of gate and up, or one weight); down `[E, H, I]`; the shared
    expert's gate/up `[S, H]` and down `[H, S]`; its gate `[1, H]`."""

    def __init__(self, router: Tensor, top_k: int, normalize: bool, gate_up: Weight, down: Weight,
                 shared_gate_proj: Weight, shared_up_proj: Weight, shared_down: Weight, shared_expert_gate: Weight):
        self.weights = (router, gate_up, down, shared_gate_proj, shared_up_proj, shared_down, shared_expert_gate)
        self.top_k, self.normalize = top_k, normalize
        experts, hidden = router.shape
        width = gate_up.shape[1] // 2
        shared = shared_gate_proj.shape[0]
        expected = {"gate_up": (gate_up.shape, (experts, 2 * width, hidden)),
                    "down": (down.shape, (experts, hidden, width)),
                    "shared gate": (shared_gate_proj.shape, (shared, hidden)),
                    "shared up": (shared_up_proj.shape, (shared, hidden)),
                    "shared down": (shared_down.shape, (hidden, shared)),
                    "shared expert gate": (shared_expert_gate.shape, (1, hidden))}
        for name, (shape, wanted) in expected.items():
            if tuple(shape) != wanted:
                raise ValueError(f"{name} weight of shape {list(shape)}, expected {list(wanted)}")
        self._kept: list[Tensor] = []
        gate, up = _gate_and_up(gate_up, width)
        rows = [describe(w, rows, self._kept) for w, rows in (
            (router, None), *gate, *up, (down, None), (shared_gate_proj, None), (shared_up_proj, None),
            (shared_down, None), (shared_expert_gate, None))]
        self.table = torch.tensor(rows, dtype=torch.int64)
        self.hidden = hidden

    def holds(self, weights: tuple[Weight, ...]) -> bool:
        """Whether this description is of exactly these weights (router first, as in __init__)."""
        return len(weights) == len(self.weights) and all(a is b for a, b in zip(weights, self.weights, strict=True))

    def __call__(self, x: Tensor, out: Tensor | None = None, threads: int | None = None,
                 int4_pairs: bool | None = None) -> Tensor:
        """x `[N, H]` bf16 -> `[N, H]` bf16 (into `out`, contiguous, when given), over `threads`
        threads (default: torch's count); int4 weights by pair products where `int4_pairs` (default:
        kernels.native.int4_pairs_preferred) and the build and their group allow."""
        if x.shape[-1] != self.hidden:
            raise ValueError(f"x of width {x.shape[-1]} for a block of width {self.hidden}")
        x = x if x.is_contiguous() else x.contiguous()
        if out is None:
            out = torch.empty_like(x)
        pairs = int4_pairs_preferred() if int4_pairs is None else int4_pairs
        status = SPARSE_MOE(x, x.shape[0], self.table, self.top_k, int(self.normalize), out, int(pairs),
                            torch.get_num_threads() if threads is None else threads)
        if status != 0:
            raise MemoryError("MoE work buffers could not be allocated")
        return out


def describe(weight: Tensor | QuantizedWeight, rows: slice | None, keep: list[Tensor]) -> list[int]:
    """The WEIGHT_FIELDS of `weight` (`[N, K]` or a stack `[E, N, K]`), of its `rows` when given; the
    tensors the description points into are appended to `keep`, which must outlive its use."""
    *_, total_rows, columns = weight.shape
    rows = rows or slice(0, total_rows)
    if isinstance(weight, Tensor):
        data = weight if weight.is_contiguous() else weight.contiguous()
        keep.append(data)
        row_bytes = columns * data.element_size()
        expert_bytes = total_rows * row_bytes if data.dim() == 3 else 0
        return [BF16_CODE, data.data_ptr() + rows.start * row_bytes, 0, 0, rows.stop - rows.start, columns,
                row_bytes, 0, 0, expert_bytes, 0]
    data = weight.data if weight.data.is_contiguous() else weight.data.contiguous()
    scale = half_or_float(weight.scale)
    keep.extend((data, scale))
    row_bytes, scale_stride = data.shape[-1] * data.element_size(), scale.shape[-1]
    first_scale_row = rows.start // FP8_BLOCK_SIZE if weight.format == FP8_BLOCK else rows.start
    stacked = data.dim() == 3
    return [FORMAT_CODES[weight.format], data.data_ptr() + rows.start * row_bytes,
            scale.data_ptr() + first_scale_row * scale_stride * scale.element_size(),
            int(scale.dtype == torch.bfloat16), rows.stop - rows.start, columns, row_bytes, scale_stride,
            weight.group_size or INT4_GROUP_SIZE, data[0].numel() * data.element_size() if stacked else 0,
            scale[0].numel() if stacked else 0]


def expert_table(gate_up: Weight, down: Weight, keep: list[Tensor]) -> Tensor:
    """Stacked experts' gate, up (the halves of gate_up `[E, 2I, H]`) and down (`[E, H, I]`) as three
    rows of WEIGHT_FIELDS (int64 `[3, 11]`), for the experts kernel; raises ValueError for a fused
    fp8 gate_up whose halves split inside a scale block."""
    (gate, gate_rows), (up, up_rows) = (pair[0] for pair in _gate_and_up(gate_up, gate_up.shape[1] // 2))
    rows = [describe(gate, gate_rows, keep), describe(up, up_rows, keep), describe(down, None, keep)]
    return torch.tensor(rows, dtype=torch.int64)


def gate_up_split_problem(gate_up: Weight, width: int) -> str | None:
    """Why gate_up `[E, 2I, H]` cannot be read as a gate and an up projection of `width` rows each
    (parts of other heights, a fused fp8 weight split inside a scale block), or None."""
    if isinstance(gate_up, QuantizedRows):
        heights = [part.shape[1] for part in gate_up.parts]
        return None if heights == [width, width] else f"gate/up parts of {heights} rows, expected two of {width}"
    if isinstance(gate_up, QuantizedWeight) and gate_up.format == FP8_BLOCK and width % FP8_BLOCK_SIZE:
        return f"fused fp8 gate/up rows split at {width}, inside a {FP8_BLOCK_SIZE}-row scale block"
    return None


def _gate_and_up(gate_up: Weight, width: int) -> tuple[list, list]:
    """(weight, rows) of the gate and of the up projection within gate_up `[E, 2I, H]`."""
    problem = gate_up_split_problem(gate_up, width)
    if problem is not None:
        raise ValueError(problem)
    if isinstance(gate_up, QuantizedRows):
        gate, up = gate_up.parts
        return [(gate, None)], [(up, None)]
    return [(gate_up, slice(0, width))], [(gate_up, slice(width, 2 * width))]
