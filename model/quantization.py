"""Quantized checkpoints and weights: which formats a checkpoint holds, how its tensors group into
quantized weights while they stream in, and which weights are quantized on request.

Two checkpoint layouts are read:

* official FP8 (``quantization_config.quant_method == "fp8"``, e4m3, 128 x 128 blocks):
  ``<linear>.weight`` in float8_e4m3fn plus ``<linear>.weight_scale_inv``;
* compressed-tensors ``pack-quantized`` (symmetric int4 per group or int8 per channel):
  ``<linear>.weight_packed`` (int32 words), ``<linear>.weight_scale``, ``<linear>.weight_shape``.

``load_model(..., weights="int8" | "int4")`` quantizes every large linear layer (experts included)
as it is read, and the output layer (lm_head) to OUTPUT_LAYER_FORMAT; ``python -m model.quantize``
writes the compressed-tensors layout, so a converted checkpoint loads without converting again.
A compressed-tensors checkpoint may quantize modules differently, one ``config_groups`` entry
each (the int4 body and the int8 lm_head here); each quantized tensor takes the group that
targets its module (see :meth:`CheckpointScheme.group_of`).
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
KEEP_UNQUANTIZED = ("in_proj_ba", "in_proj_b", "in_proj_a", "shared_expert_gate")
# The output layer takes 8 bits (int8 per output channel) whatever the body's format: every logit
# comes from it, so its rounding reaches the token choice directly (llama.cpp likewise keeps it
# in 6 or 8 bits: Q6_K in Q4_K_M). It is the largest single weight decode reads per token.
OUTPUT_LAYER = "lm_head"
OUTPUT_LAYER_WEIGHT = f"{OUTPUT_LAYER}.weight"
OUTPUT_LAYER_FORMAT = INT8
# compressed-tensors targets: the one module class every quantized tensor here belongs to, and
# the prefix of a module-name pattern (matched from the start of the name, as the library does).
LINEAR_TARGET = "Linear"
REGEX_TARGET = "re:"
CLASS_NAME = re.compile(r"^[A-Z]\w*$")
# The linear layers' weights: q/k/v/o_proj, in_proj_qkvz (or in_proj_qkv, in_proj_z), out_proj,
# gate/up/down_proj.
PROJECTION = re.compile(r"(?:^|\.)\w*proj\w*\.weight$")


class QuantizationError(ValueError):
    """A quantized checkpoint this runtime cannot read; the message says why, for a person."""


@dataclass(frozen=True)
class WeightGroup:
    """One compressed-tensors config group: the modules it targets and how their weights are stored."""

    targets: tuple[str, ...]
    bits: int
    group_size: int = 0


@dataclass(frozen=True)
class CheckpointScheme:
    """What a checkpoint's ``quantization_config`` says: "fp8", "pack-quantized" or None (plain),
    and for pack-quantized its weight groups."""

    method: str | None
    groups: tuple[WeightGroup, ...] = ()

    def group_of(self, module: str) -> WeightGroup:
        """The group whose targets take the checkpoint module ``module`` (e.g. "lm_head"): a name
        target (exact, or a ``re:`` pattern matched from the start) before the "Linear" class
        target, which every quantized tensor here belongs to, as compressed-tensors matches them."""
        for group in self.groups:
            if any(_names(target, module) for target in group.targets):
                return group
        for group in self.groups:
            if LINEAR_TARGET in group.targets:
                return group
        raise QuantizationError(f"{module} is stored quantized but no compressed-tensors config group targets it.")


def _names(target: str, module: str) -> bool:
    if target.startswith(REGEX_TARGET):
        return re.match(target[len(REGEX_TARGET):], module) is not None
    return target == module


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
    groups = quant.get("config_groups") or {}
    if not groups:
        raise QuantizationError("The compressed-tensors quantization_config has no config_groups.")
    read = tuple(_weight_group(name, group) for name, group in groups.items())
    if sum(LINEAR_TARGET in group.targets for group in read) > 1:
        raise QuantizationError(f"More than one compressed-tensors config group targets {LINEAR_TARGET!r}.")
    return CheckpointScheme("pack-quantized", read)


def _weight_group(name: str, group: dict[str, Any]) -> WeightGroup:
    """One ``config_groups`` entry, refused unless it is a weight-only int4/int8 group over targets
    this runtime can tell apart (the "Linear" class, module names, ``re:`` patterns)."""
    args = group.get("weights")
    if not args:
        raise QuantizationError(f"compressed-tensors group {name!r} quantizes no weights.")
    bits, strategy = int(args.get("num_bits", 0)), args.get("strategy")
    if args.get("type", "int") != "int" or not args.get("symmetric", True) or group.get("input_activations"):
        raise QuantizationError("Only symmetric integer weight-only compressed-tensors checkpoints are supported.")
    if group.get("format") not in (None, "pack-quantized"):
        raise QuantizationError(f"compressed-tensors group {name!r} is in format {group['format']!r} "
                                "(only pack-quantized is supported).")
    targets = tuple(group.get("targets") or ())
    if not targets:
        raise QuantizationError(f"compressed-tensors group {name!r} has no targets.")
    for target in targets:
        _check_target(name, target)
    if (bits, strategy) == (4, "group"):
        return WeightGroup(targets, 4, int(args.get("group_size") or INT4_GROUP_SIZE))
    if (bits, strategy) == (8, "channel"):
        return WeightGroup(targets, 8)
    raise QuantizationError(f"compressed-tensors {bits}-bit weights by {strategy!r} are not supported "
                            "(int4 by group and int8 by channel are).")


def _check_target(group: str, target: Any) -> None:
    if not isinstance(target, str) or not target:
        raise QuantizationError(f"compressed-tensors group {group!r} has a target {target!r} that is not a name.")
    if target.startswith(REGEX_TARGET):
        try:
            re.compile(target[len(REGEX_TARGET):])
        except re.error as exc:
            raise QuantizationError(f"compressed-tensors group {group!r} has an invalid pattern {target!r}: {exc}.") \
                from None
    elif CLASS_NAME.match(target) and target != LINEAR_TARGET:
        # Module classes (CamelCase) other than Linear: this runtime's modules are not those of
        # the library that wrote the checkpoint, so what such a target covers is unknown here.
        raise QuantizationError(
            f"compressed-tensors group {group!r} targets the module class {target!r}; only {LINEAR_TARGET!r}, "
            f"module names and '{REGEX_TARGET}' patterns are supported."
        )


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
        return _unpacked(base, parts, self.scheme.group_of(base))


def _unpacked(base: str, parts: dict[str, Tensor], group: WeightGroup) -> QuantizedWeight:
    """compressed-tensors int32 words -> this runtime's bytes (the same bytes for int4)."""
    rows, columns = (int(v) for v in parts["shape"].tolist())
    packed = parts["packed"]
    words = -(-columns * group.bits // 32)
    if packed.dtype != torch.int32 or packed.dim() != 2 or tuple(packed.shape) != (rows, words):
        raise QuantizationError(f"{base}.weight_packed has shape {list(packed.shape)}, but a {group.bits}-bit "
                                f"weight {[rows, columns]} packs into {[rows, words]} int32 words.")
    raw = packed.contiguous().view(torch.uint8)
    try:
        # Views of the file's bytes where they can be (the loader copies weights into buffers of
        # their own): the int4 bytes are the words' bytes, whole rows when the width fills them.
        if group.bits == 4:
            return QuantizedWeight(INT4, raw[:, : -(-columns // 2)].contiguous(), parts["scale"], (rows, columns),
                                   group.group_size)
        values = (raw[:, :columns] ^ 0x80).view(torch.int8)  # stored as value + 128
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


def _group_config(weights: str, targets: list[str]) -> dict[str, Any]:
    if weights == INT4:
        args = {"num_bits": 4, "type": "int", "symmetric": True, "strategy": "group", "group_size": INT4_GROUP_SIZE}
    else:
        args = {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "channel", "group_size": None}
    return {"targets": targets, "weights": args, "input_activations": None, "format": "pack-quantized"}


def quantization_config(weights: str, output_layer: bool = True) -> dict[str, Any]:
    """The config.json ``quantization_config`` of a checkpoint written by ``model.quantize``: the
    large linear layers in ``weights`` and, when ``output_layer`` (it is a tensor of its own, not
    tied to the embedding), lm_head in OUTPUT_LAYER_FORMAT, in a group of its own when the formats
    differ (a name target wins over the "Linear" one)."""
    groups = {"group_0": _group_config(weights, [LINEAR_TARGET])}
    if output_layer and weights != OUTPUT_LAYER_FORMAT:
        groups["group_1"] = _group_config(OUTPUT_LAYER_FORMAT, [f"{REGEX_TARGET}.*{OUTPUT_LAYER}$"])
    kept = KEEP_UNQUANTIZED if output_layer else (*KEEP_UNQUANTIZED, OUTPUT_LAYER)
    return {
        "quant_method": "compressed-tensors",
        "format": "pack-quantized",
        "quantization_status": "compressed",
        "config_groups": groups,
        "ignore": [f"re:.*{name}$" for name in kept] + ["re:.*mlp.gate$", "re:^(model\\.)?visual\\..*"],
    }


def quantizable(param_name: str) -> bool:
    """Whether on-load quantization applies: large linear weights and the routed experts."""
    if param_name.endswith(("experts.gate_up_proj", "experts.down_proj")):
        return True
    if not PROJECTION.search(param_name):
        return False
    return not any(f".{keep}." in f".{param_name}" for keep in KEEP_UNQUANTIZED)


def load_format(param_name: str, weights: str | None) -> str | None:
    """The format (for :func:`convert`) a weight of the model takes when ``weights`` is asked:
    the large linear layers ``weights``; lm_head OUTPUT_LAYER_FORMAT when quantizing, else as asked
    (None keeps what the checkpoint holds); everything else dense in the compute dtype."""
    if quantizable(param_name):
        return weights
    if param_name == OUTPUT_LAYER_WEIGHT:
        return OUTPUT_LAYER_FORMAT if weights in (INT8, INT4) else weights
    return "bf16"


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
    "OUTPUT_LAYER_FORMAT",
    "OUTPUT_LAYER_WEIGHT",
    "WEIGHT_CHOICES",
    "CheckpointScheme",
    "QuantizationError",
    "TensorGroups",
    "WeightGroup",
    "checkpoint_scheme",
    "convert",
    "dense",
    "load_format",
    "packed_tensors",
    "quantizable",
    "quantization_config",
    "quantized_weights",
    "resolve_weights",
    "weight_formats",
]
