"""Write a quantized copy of a checkpoint folder: ``python -m model.quantize SRC DST --weights int8|int4``.

The source may be bf16/fp32 or official FP8. Tensors stream through one at a time and are
written shard by shard, so converting the 80B model needs memory for one output shard, not
for the model. Large linear layers (experts included) become compressed-tensors
``pack-quantized`` tensors, and lm_head int8 ones (a config group of its own beside an int4
body), exactly the bytes ``load_model(SRC, weights=...)`` would hold; everything else is copied
(FP8 ones dequantized to bf16). An lm_head tied to the embedding has no tensor to write: it stays
tied, and ``load_model(DST, weights=...)`` gives it its int8 copy. Config, tokenizer and other
files are copied, with ``quantization_config`` replaced.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from kernels.quant import QuantizedWeight

from .checkpoint_layout import VISION_PREFIXES, LayoutError, split_fused_experts
from .loader import LoadError, read_config, shard_files
from .quantization import (
    WEIGHT_CHOICES,
    QuantizationError,
    TensorGroups,
    convert,
    dense,
    load_format,
    packed_tensors,
    quantization_config,
)

DEFAULT_SHARD_BYTES = 4 * 1024**3
DENSE_DTYPE = torch.bfloat16


def quantize_checkpoint(source: Path, target: Path, weights: str, shard_bytes: int = DEFAULT_SHARD_BYTES) -> Path:
    """Write ``source`` with its large linear layers in ``weights`` ("int8" or "int4") to ``target``."""
    if weights not in WEIGHT_CHOICES or weights == "bf16":
        raise QuantizationError(f"Choose int8 or int4, not {weights!r}.")
    config, scheme = read_config(source)
    if target.exists() and any(target.iterdir()):
        raise FileExistsError(f"{target} exists and is not empty.")
    target.mkdir(parents=True, exist_ok=True)
    writer = ShardWriter(target, shard_bytes)
    groups = TensorGroups(scheme)
    for shard in shard_files(source):
        with safe_open(str(shard), framework="pt", device="cpu") as handle:
            for tensor_name in handle.keys():
                for name, value in groups.feed(tensor_name, handle.get_tensor(tensor_name)):
                    # Fused experts (Qwen3.5 MoE releases) are written per expert, as quantized
                    # checkpoints store them.
                    split = split_fused_experts(name, value, config.moe_intermediate_size)
                    for expert_name, expert in split or [(name, value)]:
                        writer.add(_converted(expert_name, expert, weights))
    groups.finish()
    writer.close()
    _copy_side_files(source, target, quantization_config(weights, output_layer=not config.tie_word_embeddings))
    return target


def _converted(name: str, value: torch.Tensor | QuantizedWeight, weights: str) -> dict[str, torch.Tensor]:
    wanted = None if name.startswith(VISION_PREFIXES) or value.dim() != 2 else load_format(name, weights)
    if wanted in (None, "bf16"):
        # Kept as stored (the vision tower too, which this runtime does not run); an FP8 weight
        # that stays unquantized is written in bf16.
        return {name: dense(value, DENSE_DTYPE) if isinstance(value, QuantizedWeight) else value.contiguous()}
    quantized = convert(value, wanted, DENSE_DTYPE)
    return packed_tensors(name.removesuffix(".weight"), quantized)


class ShardWriter:
    """Collects tensors and writes a safetensors shard whenever ``shard_bytes`` are pending; ``close``
    names the shards ``model-0000i-of-0000n.safetensors`` and writes the index."""

    def __init__(self, folder: Path, shard_bytes: int = DEFAULT_SHARD_BYTES):
        self.folder, self.shard_bytes = Path(folder), shard_bytes
        self.folder.mkdir(parents=True, exist_ok=True)
        self.names: list[str] = []
        self.pending: dict[str, torch.Tensor] = {}
        self.pending_bytes = 0
        self.written: list[tuple[str, list[str]]] = []
        self.total_bytes = 0

    def add(self, tensors: dict[str, torch.Tensor]) -> None:
        for name, tensor in tensors.items():
            self.pending[name] = tensor
            self.pending_bytes += tensor.numel() * tensor.element_size()
            self.names.append(name)
        if self.pending_bytes >= self.shard_bytes:
            self._flush()

    def _flush(self) -> None:
        if not self.pending:
            return
        name = f"model-{len(self.written) + 1:05d}.safetensors"
        save_file(self.pending, str(self.folder / name), metadata={"format": "pt"})
        self.written.append((name, list(self.pending)))
        self.total_bytes += self.pending_bytes
        self.pending, self.pending_bytes = {}, 0

    def close(self) -> None:
        self._flush()
        count = len(self.written)
        weight_map = {}
        for index, (old, names) in enumerate(self.written, 1):
            new = f"model-{index:05d}-of-{count:05d}.safetensors"
            (self.folder / old).rename(self.folder / new)
            weight_map.update(dict.fromkeys(names, new))
        index = {"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map}
        (self.folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2), encoding="utf-8")


def _copy_side_files(source: Path, target: Path, quantization: dict) -> None:
    for path in source.iterdir():
        if path.is_file() and not path.name.endswith(".safetensors") and path.name != "model.safetensors.index.json":
            shutil.copy2(path, target / path.name)
    config = json.loads((source / "config.json").read_text(encoding="utf-8"))
    config["quantization_config"] = quantization
    (target / "config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m model.quantize", description=__doc__.splitlines()[0])
    parser.add_argument("source", type=Path, help="checkpoint folder to read (bf16, fp32 or FP8)")
    parser.add_argument("target", type=Path, help="new folder to write")
    parser.add_argument("--weights", required=True, choices=["int8", "int4"])
    parser.add_argument("--shard-gb", type=float, default=DEFAULT_SHARD_BYTES / 1024**3)
    args = parser.parse_args(argv)
    try:
        quantize_checkpoint(args.source, args.target, args.weights, int(args.shard_gb * 1024**3))
    except (LoadError, QuantizationError, LayoutError, FileExistsError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"Wrote {args.target} ({args.weights} weights).")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
