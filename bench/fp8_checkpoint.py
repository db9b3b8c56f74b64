"""Write an FP8 copy of a bf16/fp32 Qwen3-Next checkpoint in the layout of the official FP8 release.

    python bench/fp8_checkpoint.py SRC DST [--shard-gb 1] [--scale-dtype bf16]

Layout (as in `Qwen3-Next-80B-A3B-Instruct-FP8`): every projection weight (`q/k/v/o_proj`,
`in_proj_qkvz`, `out_proj`, the experts' and the shared expert's `gate/up/down_proj`, those of the
MTP block included) becomes `float8_e4m3fn` with `<linear>.weight_scale_inv` of shape
[ceil(out/128), ceil(in/128)], one scale per 128 x 128 block: scale_inv = max |block| / 448 and the
stored value is weight / scale_inv, rounded to the nearest e4m3 value. Everything the official
release keeps in bf16 stays as it is: `lm_head`, the embeddings, norms, `linear_attn.{A_log,
conv1d, dt_bias, in_proj_ba, norm}`, the router (`mlp.gate`), `mlp.shared_expert_gate` and the MTP
block's `fc`; those modules are listed in `quantization_config.modules_to_not_convert`. Scales are
written in bf16 as the official checkpoints store them (rounded before the weights are divided by
them, so no value exceeds 448); `--scale-dtype fp32` writes them in fp32.

Tensors stream through one at a time and are written shard by shard (`--shard-gb`), so the writer
needs memory for one output shard, not for the model. `bench/runtime.py --weights fp8` and
`bench/real_shapes.py` use it; it is not the runtime's own converter (`python -m model.quantize`
writes int8/int4).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from collections.abc import Iterable
from pathlib import Path

import torch
from safetensors import safe_open

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from model.loader import shard_files  # noqa: E402
from model.quantize import ShardWriter  # noqa: E402  (real_shapes takes it from here too)

FP8_MAX = 448.0
BLOCK = 128
SCALE_SUFFIX = ".weight_scale_inv"
DEFAULT_SHARD_BYTES = 1 << 30
SCALE_DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
# Projections the official release keeps in bf16 although their names end in "proj".
KEPT_PROJECTIONS = ("in_proj_ba",)


def converted(name: str, tensor: torch.Tensor) -> bool:
    """Whether the official FP8 layout stores this checkpoint tensor in FP8: the 2-D weights of the
    projections (`*proj*.weight`) except `in_proj_ba`."""
    if tensor.dim() != 2 or not name.endswith(".weight"):
        return False
    module = name.removesuffix(".weight").rpartition(".")[2]
    return "proj" in module and module not in KEPT_PROJECTIONS


def fp8_blocks(weight: torch.Tensor, scale_dtype: torch.dtype = torch.bfloat16) -> tuple[torch.Tensor, torch.Tensor]:
    """weight `[N, K]` -> (float8_e4m3fn `[N, K]`, scale_inv `[ceil(N/128), ceil(K/128)]` in scale_dtype)."""
    rows, columns = weight.shape
    blocks = (-(-rows // BLOCK), -(-columns // BLOCK))
    w = weight.to(torch.float32, copy=True)
    if (rows, columns) != (blocks[0] * BLOCK, blocks[1] * BLOCK):
        w = torch.nn.functional.pad(w, (0, blocks[1] * BLOCK - columns, 0, blocks[0] * BLOCK - rows))
    tiles = w.view(blocks[0], BLOCK, blocks[1], BLOCK)
    largest = torch.maximum(tiles.amax(dim=(1, 3)), -tiles.amin(dim=(1, 3)))
    scale = (largest / FP8_MAX).clamp_(min=1e-12).to(scale_dtype)
    tiles.div_(scale.float()[:, None, :, None]).clamp_(-FP8_MAX, FP8_MAX)
    data = w[:rows, :columns]
    return data.to(torch.float8_e4m3fn), scale


def fp8_tensors(name: str, tensor: torch.Tensor, scale_dtype: torch.dtype = torch.bfloat16) -> dict[str, torch.Tensor]:
    """One checkpoint tensor as the official FP8 layout writes it (one or two tensors)."""
    if not converted(name, tensor):
        return {name: tensor.contiguous()}
    data, scale = fp8_blocks(tensor, scale_dtype)
    return {name: data, name.removesuffix(".weight") + SCALE_SUFFIX: scale}


def modules_to_not_convert(names: Iterable[str]) -> list[str]:
    """The modules (and loose parameters such as `A_log`) kept in bf16 among checkpoint tensor
    `names`, as the official config lists them; embeddings are not linear layers and are not listed."""
    kept = set()
    for name in names:
        if name.endswith(SCALE_SUFFIX) or "embed_tokens" in name:
            continue
        module = name.removesuffix(".weight")
        if module != name and "proj" in module.rpartition(".")[2] and module.rpartition(".")[2] not in KEPT_PROJECTIONS:
            continue
        kept.add(module)
    return sorted(kept)


def fp8_quantization_config(kept: list[str]) -> dict:
    return {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8", "weight_block_size": [BLOCK, BLOCK],
            "modules_to_not_convert": kept}


def write_fp8_checkpoint(source: Path, target: Path, shard_bytes: int = DEFAULT_SHARD_BYTES,
                         scale_dtype: torch.dtype = torch.bfloat16) -> Path:
    """Write `source` (a bf16/fp32 checkpoint folder) to `target` in the official FP8 layout; other
    files (tokenizer, generation config) are copied and config.json gains `quantization_config`."""
    source, target = Path(source), Path(target)
    config = json.loads((source / "config.json").read_text(encoding="utf-8"))
    if config.get("quantization_config"):
        raise ValueError(f"{source} is already quantized ({config['quantization_config'].get('quant_method')}).")
    if target.exists() and any(target.iterdir()):
        raise FileExistsError(f"{target} exists and is not empty.")
    writer = ShardWriter(target, shard_bytes)
    for shard in shard_files(source):
        with safe_open(str(shard), framework="pt", device="cpu") as handle:
            for name in handle.keys():
                writer.add(fp8_tensors(name, handle.get_tensor(name), scale_dtype))
    writer.close()
    for path in source.iterdir():
        if path.is_file() and not path.name.endswith(".safetensors") and path.name != "model.safetensors.index.json":
            shutil.copy2(path, target / path.name)
    config["quantization_config"] = fp8_quantization_config(modules_to_not_convert(writer.names))
    (target / "config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    return target


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source", type=Path, help="bf16 or fp32 checkpoint folder")
    parser.add_argument("target", type=Path, help="new folder to write")
    parser.add_argument("--shard-gb", type=float, default=DEFAULT_SHARD_BYTES / 1024**3)
    parser.add_argument("--scale-dtype", choices=sorted(SCALE_DTYPES), default="bf16",
                        help="dtype of weight_scale_inv (the official checkpoints store bf16)")
    args = parser.parse_args(argv)
    write_fp8_checkpoint(args.source, args.target, int(args.shard_gb * 1024**3), SCALE_DTYPES[args.scale_dtype])
    print(f"Wrote {args.target} (FP8, 128 x 128 blocks).", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
