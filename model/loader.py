"""Load a Hugging Face checkpoint folder (Qwen3-Next, Qwen3.5 / Qwen3.6) tensor by tensor."""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import json
import re
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from kernels import native as native_kernels
from kernels.quant import QuantizedRows, QuantizedWeight

from .checkpoint_layout import CheckpointLayout, LayoutError
from .config import ConfigError, ModelConfig
from .quantization import (
    OUTPUT_LAYER_WEIGHT,
    CheckpointScheme,
    QuantizationError,
    TensorGroups,
    checkpoint_scheme,
    convert,
    dense,
    load_format,
    resolve_weights,
    weight_formats,
)
from .qwen3_next import LanguageModel, Qwen3NextForCausalLM

_EXPERT_TENSOR = re.compile(
    r"^((?:model|mtp)\.layers\.\d+\.mlp\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$"
)
_FINGERPRINT_SAMPLE = 1 << 16


class LoadError(RuntimeError):
    """A checkpoint folder this runtime cannot load; the message says why, for a person."""


def default_dtype(device: torch.device | str) -> torch.dtype:
    """bf16 where the hardware multiplies bf16 natively or the CPU kernels run (their AVX2 builds
    compute in fp32 from bf16 weights, half the bytes of fp32 ones), fp32 otherwise."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
    if device.type == "cpu":
        native = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
        return torch.bfloat16 if native or native_kernels.kernels_run() else torch.float32
    return torch.float32


def shard_files(folder: Path) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise LoadError(f"The shard index {index} is unreadable: {exc}") from exc
        shards = [folder / name for name in sorted(set(weight_map.values()))]
    elif (folder / "model.safetensors").is_file():
        shards = [folder / "model.safetensors"]
    else:
        raise LoadError(f"No weights in {folder}: expected model.safetensors or model.safetensors.index.json.")
    missing = [s.name for s in shards if not s.is_file()]
    if missing:
        raise LoadError(f"Weight shards listed in the index are missing: {', '.join(missing[:5])}.")
    return shards


def weights_identity(shards: list[Path]) -> str:
    """Cheap identity of the weight files: headers, sizes and sampled bytes (not a full hash)."""
    digest = hashlib.sha256()
    for shard in shards:
        size = shard.stat().st_size
        digest.update(f"{shard.name}:{size}".encode())
        with shard.open("rb") as handle:
            for offset in (0, max(0, size // 2 - _FINGERPRINT_SAMPLE // 2), max(0, size - _FINGERPRINT_SAMPLE)):
                handle.seek(offset)
                digest.update(handle.read(_FINGERPRINT_SAMPLE))
    return digest.hexdigest()


@dataclass
class _Target:
    """Where checkpoint tensors land: a parameter, filled whole or one expert slice at a time.

    A quantized parameter is held in ``quantized`` (a linear layer's weight) or in ``stacks``
    (the experts: one stacked data and scale buffer per projection, filled expert by expert).
    """

    shape: tuple[int, ...]
    tensor: torch.Tensor | None = None
    filled: set = field(default_factory=set)
    expected_parts: int = 1
    quantized: QuantizedWeight | None = None
    stacks: dict[str, QuantizedWeight] = field(default_factory=dict)


def _targets(module: nn.Module, config: ModelConfig) -> dict[str, _Target]:
    targets = {name: _Target(tuple(p.shape)) for name, p in module.named_parameters()}
    for name, target in targets.items():
        if name.endswith("experts.gate_up_proj"):
            target.expected_parts = 2 * config.num_experts
        elif name.endswith("experts.down_proj"):
            target.expected_parts = config.num_experts
    return targets


def _place(name: str, config: ModelConfig) -> tuple[str, tuple, object]:
    """Checkpoint name -> (parameter name, index into it, part id)."""
    match = _EXPERT_TENSOR.match(name)
    if not match:
        return name, (), "whole"
    prefix, expert, proj = match.group(1), int(match.group(2)), match.group(3)
    width = config.moe_intermediate_size
    if proj == "down_proj":
        return f"{prefix}.down_proj", (expert,), (expert, proj)
    rows = slice(0, width) if proj == "gate_proj" else slice(width, 2 * width)
    return f"{prefix}.gate_up_proj", (expert, rows), (expert, proj)


def _copy_tensor(name, value, targets, config, dtype, device, weights: str | None = "bf16") -> None:
    """Put one checkpoint weight (a tensor or a quantized weight) where it belongs, in the format
    ``weights`` asks for (see :func:`model.quantization.convert`)."""
    param_name, index, part = _place(name, config)
    target = targets.get(param_name)
    if target is None:
        raise LoadError(f"The checkpoint has a tensor this model does not expect: {name}.")
    stored = convert(value, load_format(param_name, weights), dtype)
    if isinstance(stored, QuantizedWeight):
        _place_quantized(name, stored, target, index, part, config, device)
        return
    value = stored
    if target.tensor is None:
        target.tensor = _weight_buffer(target.shape, dtype, device)
    destination = target.tensor[index] if index else target.tensor
    if tuple(value.shape) != tuple(destination.shape):
        raise LoadError(
            f"Tensor {name} has shape {list(value.shape)} but the config implies {list(destination.shape)}."
        )
    destination.copy_(value)
    target.filled.add(part)


def _weight_buffer(shape, dtype: torch.dtype, device) -> torch.Tensor:
    """An empty tensor for a weight, on huge pages where the system gives them (see
    kernels.native.back_with_huge_pages: weights are streamed at every token)."""
    buffer = torch.empty(shape, dtype=dtype, device=device)
    native_kernels.back_with_huge_pages(buffer)
    return buffer


def _owned(value: torch.Tensor, device) -> torch.Tensor:
    """A copy of a weight in a buffer of its own: a checkpoint tensor may view the file's memory
    map, which would then stay mapped (and resident) for as long as the model lives."""
    return _weight_buffer(value.shape, value.dtype, device).copy_(value)


def _owned_weight(weight: QuantizedWeight, device) -> QuantizedWeight:
    """A quantized weight with its data and scales in buffers of their own (see _owned)."""
    return replace(weight, data=_owned(weight.data, device), scale=_owned(weight.scale, device))


def _held(name: str, value, config, dtype: torch.dtype, device, weights: str | None):
    """A checkpoint tensor in the form the model's weight of that name takes (its large linear
    layers in ``weights``' format, the rest dense in ``dtype``), in buffers of its own: how the
    MTP block's tensors wait for the block to be built (model.mtp)."""
    held = convert(value, load_format(_place(name, config)[0], weights), dtype)
    return _owned_weight(held, device) if isinstance(held, QuantizedWeight) else _owned(dense(held, dtype), device)


def _place_quantized(name, weight: QuantizedWeight, target: _Target, index, part, config, device) -> None:
    """A linear layer's quantized weight, or one expert's, copied into its slot of the stacks."""
    if target.tensor is not None or (not index and target.stacks):
        raise LoadError(f"Tensor {name} is quantized but other parts of {name.rpartition('.')[0]} are not.")
    if not index:
        if tuple(weight.shape) != target.shape:
            raise LoadError(
                f"Tensor {name} has shape {list(weight.shape)} but the config implies {list(target.shape)}."
            )
        target.quantized = _owned_weight(weight, device)
        target.filled.add(part)
        return
    expert, proj = part
    width = config.moe_intermediate_size
    expected = (width, target.shape[2]) if proj != "down_proj" else tuple(target.shape[1:])
    if tuple(weight.shape) != expected:
        raise LoadError(f"Tensor {name} has shape {list(weight.shape)} but the config implies {list(expected)}.")
    stack = target.stacks.get(proj)
    if stack is None:
        experts = target.shape[0]
        stack = QuantizedWeight(
            weight.format, _weight_buffer((experts, *weight.data.shape), weight.data.dtype, device),
            _weight_buffer((experts, *weight.scale.shape), weight.scale.dtype, device),
            (experts, *weight.shape), weight.group_size,
        )
        target.stacks[proj] = stack
    if (stack.format, stack.data.shape[1:], stack.scale.shape[1:], stack.scale.dtype) != (
        weight.format, weight.data.shape, weight.scale.shape, weight.scale.dtype
    ):
        raise LoadError(f"Tensor {name} is stored unlike the other experts of its layer.")
    stack.data[expert].copy_(weight.data)
    stack.scale[expert].copy_(weight.scale)
    target.filled.add(part)


def _installed_value(target: _Target) -> torch.Tensor | QuantizedWeight | QuantizedRows | None:
    if target.quantized is not None:
        return target.quantized
    if target.stacks:
        if "down_proj" in target.stacks:
            return target.stacks["down_proj"]
        if set(target.stacks) != {"gate_proj", "up_proj"}:
            return None
        return QuantizedRows((target.stacks["gate_proj"], target.stacks["up_proj"]))
    return target.tensor


def _tied_head(embedding: _Target, head_format: str | None) -> _Target:
    """lm_head when the checkpoint ties it to the embedding: the embedding's own tensor, or with
    a quantized head asked for, an int8 copy of it. The embedding stays dense (token lookups read
    its rows; the model's compute dtype is read from it), so the copy costs vocab x hidden bytes
    more (half the bf16 embedding), which decode reads instead of the bf16 embedding each token."""
    if head_format in (None, "bf16") or embedding.tensor is None:
        return embedding
    # In weight buffers like the others' (decode reads the head at every token).
    quantized = convert(embedding.tensor, head_format, embedding.tensor.dtype)
    head = _Target(embedding.shape, quantized=_owned_weight(quantized, embedding.tensor.device))
    head.filled.add("whole")
    return head


def _install(module: nn.Module, targets: dict[str, _Target], config: ModelConfig,
             weights: str | None = "bf16") -> None:
    head = targets.get(OUTPUT_LAYER_WEIGHT)
    if head is not None and config.tie_word_embeddings and _installed_value(head) is None:
        embedding = targets["model.embed_tokens.weight"]
        targets[OUTPUT_LAYER_WEIGHT] = _tied_head(embedding, load_format(OUTPUT_LAYER_WEIGHT, weights))
    missing = [name for name, t in targets.items()
               if _installed_value(t) is None or len(t.filled) < t.expected_parts]
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise LoadError(f"The checkpoint is missing tensors: {shown}.")
    for name, target in targets.items():
        owner_name, _, leaf = name.rpartition(".")
        owner = module.get_submodule(owner_name)
        value = _installed_value(target)
        if isinstance(value, torch.Tensor):
            setattr(owner, leaf, nn.Parameter(value, requires_grad=False))
        else:
            # A quantized weight is no parameter: layers and kernels take it where they take a tensor.
            del owner._parameters[leaf]
            setattr(owner, leaf, value)


def fill_module(module: nn.Module, config: ModelConfig, tensors: dict[str, torch.Tensor | QuantizedWeight],
                dtype: torch.dtype, device: torch.device | str, weights: str | None = "bf16") -> None:
    """Fill a meta-device module from hub-named tensors (experts split per expert), checking names and
    shapes; ``weights`` as load_model takes it (None: quantized tensors stay as they are)."""
    targets = _targets(module, config)
    for name, value in tensors.items():
        _copy_tensor(name, value, targets, config, dtype, device, weights)
    _install(module, targets, config, weights)


def release_freed_memory() -> None:
    """Hand memory freed while loading back to the OS: quantizing on load frees many fp32
    temporaries of a few MB, which glibc would otherwise keep in its heap (tens of MB)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def read_config(folder: Path) -> tuple[ModelConfig, CheckpointScheme]:
    """The model config and the checkpoint's quantization, with errors fit for a person."""
    if not (folder / "config.json").is_file():
        raise LoadError(f"No config.json in {folder}: this is not a Hugging Face model folder.")
    try:
        raw = json.loads((folder / "config.json").read_text(encoding="utf-8"))
        return ModelConfig.from_dict(raw), checkpoint_scheme(raw)
    except (ConfigError, QuantizationError) as exc:
        raise LoadError(str(exc)) from exc
    except (OSError, ValueError, AttributeError) as exc:
        raise LoadError(f"The config.json in {folder} is unreadable: {exc}") from exc


def load_model(path: str | Path, device: torch.device | str = "cpu",
               dtype: torch.dtype | None = None, weights: str | None = None) -> LanguageModel:
    """Load a checkpoint folder (single file or sharded safetensors) of any supported family.

    ``dtype`` is the compute dtype. ``weights`` None keeps the checkpoint's format (official FP8 and
    compressed-tensors int8/int4 stay quantized in memory); "bf16" holds every weight in ``dtype``;
    "int8"/"int4" quantize the large linear layers while loading, tensor by tensor, and lm_head to
    int8 (model.quantization.OUTPUT_LAYER_FORMAT; a head tied to the embedding gets its own copy).
    """
    folder = Path(path)
    if not folder.is_dir():
        raise LoadError(f"Model folder {folder} does not exist.")
    config, scheme = read_config(folder)
    try:
        wanted = resolve_weights(weights)
    except QuantizationError as exc:
        raise LoadError(str(exc)) from exc
    device = torch.device(device)
    dtype = dtype or default_dtype(device)
    shards = shard_files(folder)

    with torch.device("meta"):
        module = Qwen3NextForCausalLM(config)
    targets = _targets(module, config)
    groups = TensorGroups(scheme)
    layout = CheckpointLayout(config)
    extra: dict[str, torch.Tensor | QuantizedWeight] = {}
    for shard in shards:
        try:
            with safe_open(str(shard), framework="pt", device="cpu") as handle:
                for tensor_name in handle.keys():
                    if layout.skips(tensor_name):
                        continue
                    for stored_name, stored in groups.feed(tensor_name, handle.get_tensor(tensor_name)):
                        for name, value in layout.feed(stored_name, stored):
                            if name.startswith("mtp."):
                                extra[name] = _held(name, value, config, dtype, device, wanted)
                            else:
                                _copy_tensor(name, value, targets, config, dtype, device, wanted)
        except (QuantizationError, LayoutError) as exc:
            raise LoadError(str(exc)) from exc
        except (SafetensorError, OSError, RuntimeError) as exc:
            if isinstance(exc, LoadError):
                raise
            raise LoadError(f"The weight file {shard.name} is damaged or truncated ({exc}).") from exc
    try:
        groups.finish()
        layout.finish()
    except (QuantizationError, LayoutError) as exc:
        raise LoadError(str(exc)) from exc
    _install(module, targets, config, wanted)
    release_freed_memory()
    formats = list(weight_formats(module))
    # The MTP block's formats too: its K/V are part of a state.
    held = sorted({v.format if isinstance(v, QuantizedWeight) else str(v.dtype) for v in extra.values()})
    fingerprint = hashlib.sha256(
        f"{config.digest()}|{weights_identity(shards)}|{dtype}|{wanted}|{formats}|{held}|"
        f"{native_kernels.numerics_identity()}".encode()
    ).hexdigest()
    return LanguageModel(config, module, fingerprint, path=folder, extra_tensors=extra)




def checkpoint_tensors(module: Qwen3NextForCausalLM, config: ModelConfig) -> dict[str, torch.Tensor]:
    """The module's weights under hub names (experts split per expert), for writing checkpoints."""
    tensors: dict[str, torch.Tensor] = {}
    width = config.moe_intermediate_size
    for name, param in module.named_parameters():
        prefix, _, leaf = name.rpartition(".")
        if leaf == "gate_up_proj":
            for expert in range(param.shape[0]):
                tensors[f"{prefix}.{expert}.gate_proj.weight"] = param[expert, :width].contiguous()
                tensors[f"{prefix}.{expert}.up_proj.weight"] = param[expert, width:].contiguous()
        elif leaf == "down_proj" and prefix.endswith("experts"):
            for expert in range(param.shape[0]):
                tensors[f"{prefix}.{expert}.down_proj.weight"] = param[expert].contiguous()
        else:
            tensors[name] = param.detach().contiguous()
    return tensors
