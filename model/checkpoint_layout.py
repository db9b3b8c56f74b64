"""How each family's published checkpoints name and lay out their tensors, mapped onto the runtime's.

The runtime has one decoder module tree for every family (model/qwen3_next.py), named and laid
out as the Qwen3-Next checkpoints are. Qwen3.5 / Qwen3.6 checkpoints differ in three ways, undone
here while the tensors stream in:

* names: vision-language checkpoints hold the text decoder under `model.language_model.` and the
  vision tower under `model.visual.` (never read); `lm_head` and the MTP block (`mtp.`) sit at the
  top, as in Qwen3-Next;
* the Gated DeltaNet input projections are separate, `in_proj_qkv` (`[q | k | v]`, each in head
  order), `in_proj_z`, `in_proj_b` and `in_proj_a` (value-head order), where Qwen3-Next groups
  them per key head: `in_proj_qkvz` is, for each key head, `[q | k | v and z of its value heads]`
  and `in_proj_ba` `[b | a of its value heads]`. Both orders give value head `i` to key head
  `i // (value heads / key heads)`, so the grouped tensors are the separate ones' rows gathered in
  another order, and every kernel and fast path reads them unchanged;
* routed experts may be stored fused, `experts.gate_up_proj` `[E, 2I, H]` (gate rows first) and
  `experts.down_proj` `[E, H, I]`; they are split into the per-expert tensors the loader places.

Quantized projections keep their quantized form where their scales allow it (int8 and int4 scale
whole rows; FP8 scales 128-row blocks, which move whole when the head dims are multiples of 128,
as in every published checkpoint). Otherwise the grouped weight is built from their exact fp32
values, and then held as the caller asked.
"""

from __future__ import annotations

import re

import torch
from torch import Tensor

from kernels.quant import FP8_BLOCK, QuantizedWeight, dequantize

from .config import QWEN3_NEXT, ModelConfig

LANGUAGE_MODEL_PREFIX = "model.language_model."
VISION_PREFIXES = ("model.visual.", "visual.")
_SEPARATE_PROJECTION = re.compile(r"^(.+\.linear_attn)\.in_proj_(qkv|z|b|a)\.weight$")
_FUSED_EXPERTS = re.compile(r"^(.+\.mlp\.experts)\.(gate_up_proj|down_proj)(?:\.weight)?$")
_EXPERT = re.compile(r"^(.+\.mlp\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")
_GROUPS = {"qkv": "qkvz", "z": "qkvz", "b": "ba", "a": "ba"}
_PARTS = {"qkvz": ("qkv", "z"), "ba": ("b", "a")}
_FP8_ROWS = 128


class LayoutError(ValueError):
    """Checkpoint tensors that do not fit together; the message says which, for a person."""


def grouped_qkvz_rows(config: ModelConfig) -> Tensor:
    """Rows of `cat([in_proj_qkv, in_proj_z])` in the order of the grouped `in_proj_qkvz`."""
    key_heads, key_dim = config.linear_num_key_heads, config.linear_key_head_dim
    group_width = config.linear_num_value_heads // key_heads * config.linear_value_head_dim
    key_width = key_heads * key_dim
    value_start = 2 * key_width
    z_start = value_start + config.linear_num_value_heads * config.linear_value_head_dim
    pieces = []
    for head in range(key_heads):
        pieces += [
            torch.arange(head * key_dim, (head + 1) * key_dim),
            torch.arange(key_width + head * key_dim, key_width + (head + 1) * key_dim),
            torch.arange(value_start + head * group_width, value_start + (head + 1) * group_width),
            torch.arange(z_start + head * group_width, z_start + (head + 1) * group_width),
        ]
    return torch.cat(pieces)


def grouped_ba_rows(config: ModelConfig) -> Tensor:
    """Rows of `cat([in_proj_b, in_proj_a])` in the order of the grouped `in_proj_ba`."""
    value_heads = config.linear_num_value_heads
    group = value_heads // config.linear_num_key_heads
    pieces = []
    for head in range(config.linear_num_key_heads):
        pieces += [torch.arange(head * group, (head + 1) * group),
                   torch.arange(value_heads + head * group, value_heads + (head + 1) * group)]
    return torch.cat(pieces)


def _whole_blocks(rows: Tensor, total: int) -> Tensor | None:
    """For FP8: the source block of each 128-row output block, or None when some output block is
    not one source block moved whole (same rows, same order)."""
    blocks = []
    for start in range(0, rows.numel(), _FP8_ROWS):
        segment = rows[start:start + _FP8_ROWS]
        first = int(segment[0])
        length = min(_FP8_ROWS, total - first)
        if first % _FP8_ROWS or segment.numel() != length or not torch.equal(
                segment, torch.arange(first, first + length)):
            return None
        blocks.append(first // _FP8_ROWS)
    return torch.tensor(blocks)


def gather_rows(parts: list[Tensor | QuantizedWeight], rows: Tensor) -> Tensor | QuantizedWeight:
    """`cat(parts)[rows]` for 2-D weights, quantized ones kept quantized where their scales allow."""
    if all(isinstance(p, Tensor) for p in parts) and len({p.dtype for p in parts}) == 1:
        return torch.cat(parts)[rows]
    if all(isinstance(p, QuantizedWeight) for p in parts):
        first = parts[0]
        alike = all((p.format, p.group_size, p.shape[1:], p.scale.dtype)
                    == (first.format, first.group_size, first.shape[1:], first.scale.dtype) for p in parts)
        data = torch.cat([p.data for p in parts]) if alike else None
        scale = torch.cat([p.scale for p in parts]) if alike else None
        shape = (rows.numel(), *first.shape[1:])
        if alike and first.format != FP8_BLOCK:
            return QuantizedWeight(first.format, data[rows], scale[rows], shape, first.group_size)
        if alike and all(p.shape[0] % _FP8_ROWS == 0 for p in parts[:-1]):
            blocks = _whole_blocks(rows, data.shape[0])
            if blocks is not None:
                return QuantizedWeight(first.format, data[rows], scale[blocks], shape, first.group_size)
    exact = [dequantize(p) if isinstance(p, QuantizedWeight) else p.float() for p in parts]
    return torch.cat(exact)[rows]


def split_rows(value: Tensor | QuantizedWeight, start: int, stop: int) -> Tensor | QuantizedWeight:
    """Rows `start:stop` of a 2-D weight."""
    if isinstance(value, Tensor):
        return value[start:stop]
    return gather_rows([value], torch.arange(start, stop))


def split_fused_experts(name: str, value: Tensor | QuantizedWeight, width: int
                        ) -> list[tuple[str, Tensor | QuantizedWeight]] | None:
    """A fused expert tensor (`...experts.gate_up_proj` `[E, 2 * width, H]` or `...experts.down_proj`)
    as per-expert `(name, weight)` pairs; None for any other tensor."""
    fused = _FUSED_EXPERTS.match(name)
    if fused is None or value.dim() != 3:
        return None
    prefix, projection = fused.groups()
    experts = value.shape[0]
    if projection == "down_proj":
        return [(f"{prefix}.{e}.down_proj.weight", value[e]) for e in range(experts)]
    if value.shape[1] != 2 * width:
        raise LayoutError(f"{name} has {value.shape[1]} rows per expert; the config implies {2 * width}.")
    pairs = []
    for e in range(experts):
        pairs.append((f"{prefix}.{e}.gate_proj.weight", split_rows(value[e], 0, width)))
        pairs.append((f"{prefix}.{e}.up_proj.weight", split_rows(value[e], width, 2 * width)))
    return pairs


class CheckpointLayout:
    """Turns a family's checkpoint tensors, as they stream in, into the runtime's names and layout."""

    def __init__(self, config: ModelConfig):
        self.config = config
        self.mapped = config.family != QWEN3_NEXT
        self.pending: dict[tuple[str, str], dict[str, Tensor | QuantizedWeight]] = {}
        self._rows = {"qkvz": grouped_qkvz_rows(config), "ba": grouped_ba_rows(config)} if self.mapped else {}

    def skips(self, name: str) -> bool:
        """Tensors the runtime never reads (the vision tower), decided before they are read."""
        return self.mapped and name.startswith(VISION_PREFIXES)

    def feed(self, name: str, value: Tensor | QuantizedWeight) -> list[tuple[str, Tensor | QuantizedWeight]]:
        """The `(runtime name, value)` pairs complete once `name` has arrived (possibly none)."""
        if not self.mapped:
            return [(name, value)]
        if name.startswith(LANGUAGE_MODEL_PREFIX):
            name = "model." + name[len(LANGUAGE_MODEL_PREFIX):]
        experts = split_fused_experts(name, value, self.config.moe_intermediate_size)
        if experts is not None:
            return experts
        separate = _SEPARATE_PROJECTION.match(name)
        if not separate:
            return [(name, value)]
        prefix, part = separate.groups()
        group = _GROUPS[part]
        parts = self.pending.setdefault((prefix, group), {})
        parts[part] = value
        if set(parts) != set(_PARTS[group]):
            return []
        del self.pending[(prefix, group)]
        ordered = [parts[p] for p in _PARTS[group]]
        if len({p.shape[1] for p in ordered}) != 1:
            raise LayoutError(f"The input projections of {prefix} have different input widths.")
        rows = self._rows[group]
        total = sum(p.shape[0] for p in ordered)
        if total != rows.numel():
            raise LayoutError(
                f"The projections in_proj_{' + in_proj_'.join(_PARTS[group])} of {prefix} have {total} rows "
                f"together but the config implies {rows.numel()}."
            )
        return [(f"{prefix}.in_proj_{group}.weight", gather_rows(ordered, rows))]

    def finish(self) -> None:
        if self.pending:
            names = sorted(f"{prefix}.in_proj_{'/'.join(sorted(parts))}" for (prefix, _), parts in self.pending.items())
            shown = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
            raise LayoutError(f"The checkpoint has only some of the Gated DeltaNet input projections: {shown}.")


def published_tensors(tensors: dict[str, Tensor], config: ModelConfig, fused_experts: bool = False
                      ) -> dict[str, Tensor]:
    """Runtime-named tensors (experts split per expert) as a Qwen3.5 vision-language checkpoint
    stores them, the inverse of `CheckpointLayout.feed`; `fused_experts` stacks the experts as the
    bf16 MoE releases do. For writing demo checkpoints."""
    qkvz_rows, ba_rows = grouped_qkvz_rows(config), grouped_ba_rows(config)
    qkv_width = 2 * config.linear_num_key_heads * config.linear_key_head_dim + (
        config.linear_num_value_heads * config.linear_value_head_dim)
    published: dict[str, Tensor] = {}
    for name, value in tensors.items():
        if name.startswith("model."):
            name = LANGUAGE_MODEL_PREFIX + name[len("model."):]
        if name.endswith(".in_proj_qkvz.weight"):
            separate = torch.empty_like(value)
            separate[qkvz_rows] = value
            prefix = name.removesuffix("qkvz.weight")
            published[prefix + "qkv.weight"] = separate[:qkv_width].contiguous()
            published[prefix + "z.weight"] = separate[qkv_width:].contiguous()
        elif name.endswith(".in_proj_ba.weight"):
            separate = torch.empty_like(value)
            separate[ba_rows] = value
            prefix = name.removesuffix("ba.weight")
            heads = config.linear_num_value_heads
            published[prefix + "b.weight"] = separate[:heads].contiguous()
            published[prefix + "a.weight"] = separate[heads:].contiguous()
        else:
            published[name] = value
    return _fused(published) if fused_experts else published


def _fused(tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    experts: dict[str, dict[str, dict[int, Tensor]]] = {}
    fused: dict[str, Tensor] = {}
    for name, value in tensors.items():
        match = _EXPERT.match(name)
        if match:
            prefix, expert, projection = match.groups()
            experts.setdefault(prefix, {}).setdefault(projection, {})[int(expert)] = value
        else:
            fused[name] = value
    for prefix, projections in experts.items():
        count = len(projections["down_proj"])
        fused[f"{prefix}.gate_up_proj"] = torch.stack(
            [torch.cat([projections["gate_proj"][e], projections["up_proj"][e]]) for e in range(count)])
        fused[f"{prefix}.down_proj"] = torch.stack([projections["down_proj"][e] for e in range(count)])
    return fused
