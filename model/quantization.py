"""Quantized checkpoints and weights: which formats a checkpoint holds, how its tensors group into
quantized weights while they stream in, and which weights are quantized on request.

Two checkpoint layouts are read:

* official FP8 (``quantization_config.quant_method == "fp8"``, e4m3, 128 x 128 blocks):
  ``<linear>.weight`` in float8_e4m3fn plus ``<linear>.weight_scale_inv``;
* compressed-tensors ``pack-quantized`` (symmetric int4 per group or int8 per channel):
  ``<linear>.weight_packed`` (int32 words), ``<linear>.weight_scale``, ``<linear>.weight_shape``.

``load_model(..., weights="int8" | "int4")`` quantizes every large linear layer (experts included)
as it is read, and ``python -m model.quantize`` writes the compressed-tensors layout, so a
converted checkpoint loads without converting again.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from kernels.quant import (
    FP8_BLOCK,
    INT4,
    INT4_GROUP_SIZE,
    INT8,
    QuantizedRows,
    QuantizedWeight,
    dequantize,
    fp8_block,
    quantize_int4,
    quantize_int8,
)

WEIGHT_CHOICES = ("bf16", INT8, INT4)
FP8_SCALE_SUFFIX = ".weight_scale_inv"
PACKED_SUFFIXES = (".weight_packed", ".weight_scale", ".weight_shape")
# Small or precision-sensitive projections stay in the compute dtype when quantizing on load,
# as the official FP8 checkpoints keep them (Qwen3.5 stores in_proj_ba as in_proj_b and in_proj_a).
KEEP_UNQUANTIZED = ("in_proj_ba", "in_proj_b", "in_proj_a", "shared_expert_gate", "lm_head")
# The linear layers' weights: q/k/v/o_proj, in_proj_qkvz (or in_proj_qkv, in_proj_z), out_proj,
# gate/up/down_proj.
PROJECTION = re.compile(r"(?:^|\.)\w*proj\w*\.weight$")


class QuantizationError(ValueError):
    """A quantized checkpoint this runtime cannot read; the message says why, for a person."""


@dataclass(frozen=True)
class CheckpointScheme:
    """What a checkpoint's ``quantization_config`` says: "fp8", "pack-quantized" or None (plain)."""

    method: str | None
    bits: int = 0
    group_size: int = 0


def checkpoint_scheme(raw_config: dict[str, Any]) -> CheckpointScheme:
    quant = raw_config.get("quantization_config")
    if not quant:
        return CheckpointScheme(None)
    method = quant.get("quant_method")
    if method == "fp8":
        if quant.get("fmt", "e4m3") != "e4m3":
            raise QuantizationError(f"FP8 checkpoints in format {quant.get('fmt')!r} are not supported (only e4m3).")
        if list(quant.get("weight_block_size") or []) != [128, 128]:
            raise QuantizationError(
                f"FP8 block size {quant.get('weight_block_size')} is not supported (only [128, 128])."
            )
        return CheckpointScheme("fp8")
    if method == "compressed-tensors":
        return _compressed_tensors_scheme(quant)
    raise QuantizationError(
        f"The checkpoint is quantized with {method!r}, which this runtime cannot read "
        "(supported: official FP8, compressed-tensors pack-quantized int4/int8)."
    )


def _compressed_tensors_scheme(quant: dict[str, Any]) -> CheckpointScheme:
    if quant.get("format") != "pack-quantized":
        raise QuantizationError(
            f"compressed-tensors format {quant.get('format')!r} is not supported (only pack-quantized)."
        )
    groups = list((quant.get("config_groups") or {}).values())
    if len(groups) != 1 or not groups[0].get("weights"):
        raise QuantizationError("Only compressed-tensors checkpoints with one weight quantization group are supported.")
    args = groups[0]["weights"]
    bits, strategy = int(args.get("num_bits", 0)), args.get("strategy")
    if args.get("type", "int") != "int" or not args.get("symmetric", True) or groups[0].get("input_activations"):
        raise QuantizationError("Only symmetric integer weight-only compressed-tensors checkpoints are supported.")
    if (bits, strategy) == (4, "group"):
        return CheckpointScheme("pack-quantized", 4, int(args.get("group_size") or INT4_GROUP_SIZE))
    if (bits, strategy) == (8, "channel"):
        return CheckpointScheme("pack-quantized", 8)
    raise QuantizationError(f"compressed-tensors {bits}-bit weights by {strategy!r} are not supported "
                            "(int4 by group and int8 by channel are).")


def resolve_weights(weights: str | None) -> str | None:
    """None keeps what the checkpoint holds; "bf16" dequantizes; "int8"/"int4" quantize."""
    if weights in (None, ""):
        return None
    if weights not in WEIGHT_CHOICES:
        raise QuantizationError(f"Unknown weight format {weights!r}; choose one of {', '.join(WEIGHT_CHOICES)}.")
    return weights


class TensorGroups:
    """Turns the stream of checkpoint tensors into logical weights, holding quantized parts until
    their companions (scales, shapes) arrive, possibly from another shard."""

    def __init__(self, scheme: CheckpointScheme):
        self.scheme = scheme
        self.pending: dict[str, dict[str, Tensor]] = {}

    def feed(self, name: str, value: Tensor) -> list[tuple[str, Tensor | QuantizedWeight]]:
        """The ``(<module>.weight, tensor or quantized weight)`` pairs complete after ``name``."""
        base, part = self._split(name, value)
        if base is None:
            return [(name, value)]
        parts = self.pending.setdefault(base, {})
        parts[part] = value
        ready = self._assemble(base, parts)
        if ready is None:
            return []
        del self.pending[base]
        return [(f"{base}.weight", ready)]

    def finish(self) -> None:
        if self.pending:
            names = sorted(self.pending)
            shown = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
            raise QuantizationError(f"Quantized weights lack their scales (or values) in the checkpoint: {shown}.")

    def _split(self, name: str, value: Tensor) -> tuple[str | None, str]:
        if self.scheme.method == "fp8":
            if name.endswith(FP8_SCALE_SUFFIX):
                return name[: -len(FP8_SCALE_SUFFIX)], "scale"
            if name.endswith(".weight") and value.dtype == torch.float8_e4m3fn:
                return name[: -len(".weight")], "data"
        elif self.scheme.method == "pack-quantized":
            for suffix in PACKED_SUFFIXES:
                if name.endswith(suffix):
                    return name[: -len(suffix)], suffix[len(".weight_"):]
        elif name.endswith(FP8_SCALE_SUFFIX) or name.endswith(PACKED_SUFFIXES):
            raise QuantizationError(
                f"The checkpoint holds quantized tensors ({name}) but its config.json has no quantization_config."
            )
        return None, ""

    def _assemble(self, base: str, parts: dict[str, Tensor]) -> QuantizedWeight | None:
        if self.scheme.method == "fp8":
            if not {"data", "scale"} <= parts.keys():
                return None
            data, scale = parts["data"], parts["scale"].to(torch.float32)
            try:
                return fp8_block(data, scale)
            except ValueError as exc:
                raise QuantizationError(f"{base}: {exc}.") from None
        if not {"packed", "scale", "shape"} <= parts.keys():
            return None
        return _unpacked(base, parts, self.scheme)


def _unpacked(base: str, parts: dict[str, Tensor], scheme: CheckpointScheme) -> QuantizedWeight:
    """compressed-tensors int32 words -> this runtime's bytes (the same bytes for int4)."""
    rows, columns = (int(v) for v in parts["shape"].tolist())
    packed = parts["packed"]
    if packed.dtype != torch.int32 or packed.dim() != 2 or packed.shape[0] != rows:
        raise QuantizationError(f"{base}.weight_packed has shape {list(packed.shape)} for a weight {[rows, columns]}.")
    raw = packed.contiguous().view(torch.uint8)
    try:
        if scheme.bits == 4:
            return QuantizedWeight(INT4, raw[:, : -(-columns // 2)].clone(), parts["scale"], (rows, columns),
                                   scheme.group_size)
        values = (raw[:, :columns] ^ 0x80).view(torch.int8).clone()  # stored as value + 128
        return QuantizedWeight(INT8, values, parts["scale"], (rows, columns))
    except ValueError as exc:
        raise QuantizationError(f"{base}: {exc}.") from None


def packed_tensors(name: str, weight: QuantizedWeight) -> dict[str, Tensor]:
    """A 2-D int8/int4 weight as compressed-tensors ``pack-quantized`` tensors under ``name`` (no ".weight")."""
    rows, columns = weight.shape
    if weight.format == INT4:
        raw = weight.data
        per_word = 4
    elif weight.format == INT8:
        raw = weight.data.view(torch.uint8) ^ 0x80
        per_word = 4
    else:
        raise ValueError(f"{weight.format} weights are not written as pack-quantized")
    padding = -raw.shape[1] % per_word
    words = torch.nn.functional.pad(raw, (0, padding)).contiguous().view(torch.int32)
    return {
        f"{name}.weight_packed": words,
        f"{name}.weight_scale": weight.scale.contiguous(),
        f"{name}.weight_shape": torch.tensor([rows, columns], dtype=torch.int32),
    }


def quantization_config(weights: str) -> dict[str, Any]:
    """The config.json ``quantization_config`` of a checkpoint written by ``model.quantize``."""
    if weights == INT4:
        args = {"num_bits": 4, "type": "int", "symmetric": True, "strategy": "group", "group_size": INT4_GROUP_SIZE}
    else:
        args = {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "channel", "group_size": None}
    return {
        "quant_method": "compressed-tensors",
        "format": "pack-quantized",
        "quantization_status": "compressed",
        "config_groups": {"group_0": {"targets": ["Linear"], "weights": args, "input_activations": None,
                                      "format": "pack-quantized"}},
        "ignore": [f"re:.*{name}$" for name in KEEP_UNQUANTIZED] + ["re:.*mlp.gate$", "re:^(model\\.)?visual\\..*"],
    }


def quantizable(param_name: str) -> bool:
    """Whether on-load quantization applies: large linear weights and the routed experts."""
    if param_name.endswith(("experts.gate_up_proj", "experts.down_proj")):
        return True
    if not PROJECTION.search(param_name):
        return False
    return not any(f".{keep}." in f".{param_name}" for keep in KEEP_UNQUANTIZED)


def convert(value: Tensor | QuantizedWeight, wanted: str | None, dtype: torch.dtype) -> Tensor | QuantizedWeight:
    """``value`` in the wanted format: None keeps quantized weights as they are, "bf16" means
    dense in ``dtype``, "int8"/"int4" quantize (from the exact dequantization if needed)."""
    if wanted is None:
        return value
    if isinstance(value, QuantizedWeight):
        if value.format == wanted:
            return value
        dense = dequantize(value)
    else:
        dense = value
    if wanted == "bf16":
        return dense.to(dtype)
    return quantize_int8(dense) if wanted == INT8 else quantize_int4(dense)


def quantized_weights(module: torch.nn.Module) -> list[QuantizedWeight | QuantizedRows]:
    """Every quantized weight the module's layers hold (they are attributes, not parameters)."""
    return [v for m in module.modules() for v in vars(m).values() if isinstance(v, QuantizedWeight | QuantizedRows)]


def weight_formats(module: torch.nn.Module) -> tuple[str, ...]:
    """How the module's weights are held, e.g. ("bfloat16",) or ("bfloat16", "int4")."""
    formats = {str(p.dtype).removeprefix("torch.") for p in module.parameters()}
    return tuple(sorted(formats | {v.format for v in quantized_weights(module)}))


def dense(value: Tensor | QuantizedWeight, dtype: torch.dtype) -> Tensor:
    return dequantize(value).to(dtype) if isinstance(value, QuantizedWeight) else value.to(dtype)


__all__ = [
    "FP8_BLOCK",
    "WEIGHT_CHOICES",
    "CheckpointScheme",
    "QuantizationError",
    "TensorGroups",
    "checkpoint_scheme",
    "convert",
    "dense",
    "packed_tensors",
    "quantizable",
    "quantization_config",
    "quantized_weights",
    "resolve_weights",
    "weight_formats",
]
