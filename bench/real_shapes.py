"""Qwen3-Next-80B-A3B's real layer shapes on this CPU in bf16, FP8, int8 and int4, projected to 48 layers.

    python bench/real_shapes.py [--layers 4] [--formats bf16 fp8 int8 int4] [--prompt 2048] [--decode-steps 32]
    python bench/real_shapes.py --quick          # 2 layers, 512-token prompt, 8 decode steps, one run each

The 80B model does not fit this machine, but its layers do, one or a few at a time. This writes a
random checkpoint with the published per-layer dimensions (hidden 2048; 512 experts of width 512,
10 routed + 1 shared of width 512; Gated DeltaNet 16 key / 32 value heads of 128; attention 16 query
/ 2 K/V heads of 256, rotary on 25%) and a small vocabulary (--vocab, 4,096, so the embedding and
lm_head do not dominate), with --layers layers in the published order (every fourth is full
attention; a model without one gets its last layer as full attention, so 2 layers are one of each).
The default is 4 layers (the published 3:1 mix) when this machine's available memory holds them in
bf16 (~3.3 GB a layer), else 2. No MTP block.

The checkpoints are written under a temporary folder (--workdir), streaming tensor by tensor
(shards of 1 GiB): the bf16 one from a seeded generator, FP8 in the official layout from it
(`bench/fp8_checkpoint.py`), int8 and int4 with `python -m model.quantize`'s writer
(compressed-tensors pack-quantized). Each format is then loaded and measured in a fresh process
(so resident memory and allocator state do not carry over), and its folder removed (--checkpoints
keeps them in a folder of your choice and reuses them on the next run):

* weights: `lm.parameter_bytes()`, per layer type (a layer's parameters and quantized weights) and
  apart from the embedding, final norm and lm_head; RSS after loading;
* prefill: a --prompt-token prompt in --prefill-chunk chunks as the app prefills (best of
  --repeats; time per decoder layer from forward hooks, the MoE block's share of it);
* decode: --decode-steps greedy steps after that prompt; before each step a 1 GiB buffer is read
  (untimed) so weights come from memory, as in the 80B model whose other layers would have pushed
  them out of the caches;
* the model's own head (final norm and lm_head on one row), timed apart and subtracted;
* `*_other_cpu_load`: the share of the machine's CPU time other processes used meanwhile (0 is a
  quiet machine; on a busy one two-thread timings can be several times slower than the code).

The JSON also says which commit ran (and whether model/ or kernels/ differed from it) and which
paths quantized weights take here (`quantized_paths`).

Projection to the published model (36 Gated DeltaNet + 12 attention layers, vocab 151,936): weights =
36 x a DeltaNet layer + 12 x an attention layer + the bf16 embedding + the lm_head in the format the
checkpoint holds it (bf16 in bf16 and FP8, as in the official FP8 release; int8 in int8 and int4);
prefill time = 36 x the mean DeltaNet layer + 12 x the mean attention layer (hook times) + the rest
of the measured forward (embedding, final norm) with the head replaced by a 151,936 x 2048 head in
that format timed here; decode time per token = 48 x (measured step - own head) / layers + that
head, so it assumes the measured layer mix (exact for the 3:1 mix of 4 layers). K/V and DeltaNet
state bytes at 32K and 262K tokens are arithmetic from the published config. Prints JSON; progress goes to stderr.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import gc
import json
import multiprocessing
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.fp8_checkpoint import ShardWriter, write_fp8_checkpoint  # noqa: E402
from kernels.linear import linear  # noqa: E402
from kernels.native import flush_denormals  # noqa: E402
from kernels.quant.formats import QuantizedWeight  # noqa: E402
from model import ModelConfig, load_model, prefill  # noqa: E402
from model.generation import DEFAULT_PREFILL_CHUNK  # noqa: E402
from model.quantization import convert, quantized_weights  # noqa: E402
from model.quantize import quantize_checkpoint  # noqa: E402
from model.qwen3_next import Qwen3NextForCausalLM  # noqa: E402

FORMATS = ("bf16", "fp8", "int8", "int4")
# config.json of Qwen3-Next-80B-A3B-Instruct (the fields this runtime reads).
PUBLISHED = {
    "architectures": ["Qwen3NextForCausalLM"], "model_type": "qwen3_next", "vocab_size": 151936,
    "hidden_size": 2048, "intermediate_size": 5120, "num_hidden_layers": 48, "num_attention_heads": 16,
    "num_key_value_heads": 2, "head_dim": 256, "linear_num_key_heads": 16, "linear_num_value_heads": 32,
    "linear_key_head_dim": 128, "linear_value_head_dim": 128, "linear_conv_kernel_dim": 4, "num_experts": 512,
    "num_experts_per_tok": 10, "moe_intermediate_size": 512, "shared_expert_intermediate_size": 512,
    "decoder_sparse_step": 1, "mlp_only_layers": [], "norm_topk_prob": True, "rms_norm_eps": 1e-6,
    "max_position_embeddings": 262144, "tie_word_embeddings": False, "hidden_act": "silu",
    "attention_bias": False, "full_attention_interval": 4,
    "rope_parameters": {"rope_type": "default", "rope_theta": 10000000.0, "partial_rotary_factor": 0.25},
    "mtp_num_hidden_layers": 1, "torch_dtype": "bfloat16",
}
LINEAR, FULL = "linear_attention", "full_attention"
STATE_LENGTHS = (32768, 262144)
EVICT_BYTES = 1 << 30
SHARD_BYTES = 1 << 30
# Resident bf16 bytes of one real-shape layer (experts 3.22 GB plus projections), for --layers' default.
BF16_LAYER_BYTES = 3.35e9


def layer_types(count: int) -> list[str]:
    types = [FULL if (i + 1) % 4 == 0 else LINEAR for i in range(count)]
    if FULL not in types:
        types[-1] = FULL
    return types


def bench_config(layers: int, vocab: int) -> dict:
    types = layer_types(layers)
    return {**PUBLISHED, "vocab_size": vocab, "num_hidden_layers": layers, "layer_types": types,
            "mtp_num_hidden_layers": 0}


def available_bytes() -> int:
    with open("/proc/meminfo") as handle:
        for line in handle:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 0


def default_layers() -> int:
    """4 (the published 3:1 mix) where bf16 weights, the eviction buffer and room to spare fit, else 2."""
    return 4 if 0.9 * available_bytes() >= 4 * BF16_LAYER_BYTES + 3 * EVICT_BYTES else 2


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def code_version() -> dict:
    """The commit measured, and whether model/ or kernels/ differ from it."""
    def git(*argv: str) -> str:
        try:
            return subprocess.run(["git", *argv], cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()
        except (OSError, subprocess.CalledProcessError):
            return ""
    return {"commit": git("rev-parse", "--short", "HEAD"),
            "model_or_kernels_modified": bool(git("status", "--porcelain", "--", "model", "kernels"))}


def quantized_paths() -> dict:
    """Which CPU paths quantized weights take here: the native small-row kernel for decode (up to
    16 rows), whether it multiplies int4 by bf16 pair products, and, for prefill chunks, the bf16
    GEMM on dequantized tiles or the fp32 reference."""
    import kernels.native as native
    import kernels.quant as quant

    weight = quant.quantize_int4(torch.ones(32, 256))
    uses_native = getattr(quant, "uses_native", None)
    prefill_path = getattr(quant, "prefill", None)
    return {
        "decode_native_kernel": bool(uses_native and uses_native(torch.ones(1, 256, dtype=torch.bfloat16), weight)),
        "prefill_bf16_gemm": bool(prefill_path and prefill_path.supports(torch.ones(64, 256, dtype=torch.bfloat16),
                                                                         weight)),
        "decode_int4_pairs": bool(getattr(native, "int4_pairs_preferred", lambda: False)()),
    }


def checkpoint_names(module: torch.nn.Module, config: ModelConfig):
    """(checkpoint name, shape) of every tensor, layer by layer, experts split per expert."""
    width = config.moe_intermediate_size
    for name, param in module.named_parameters():
        prefix, _, leaf = name.rpartition(".")
        if leaf == "gate_up_proj":
            for expert in range(param.shape[0]):
                yield f"{prefix}.{expert}.gate_proj.weight", (width, param.shape[2])
                yield f"{prefix}.{expert}.up_proj.weight", (width, param.shape[2])
        elif leaf == "down_proj" and prefix.endswith("experts"):
            for expert in range(param.shape[0]):
                yield f"{prefix}.{expert}.down_proj.weight", tuple(param.shape[1:])
        else:
            yield name, tuple(param.shape)


def random_tensor(name: str, shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
    """Init scales of the published architecture, as `model.demo` draws them; bf16."""
    if name.endswith("A_log"):
        return torch.empty(shape).uniform_(1.0, 16.0, generator=generator).log().to(torch.bfloat16)
    if name.endswith("dt_bias") or name.endswith("linear_attn.norm.weight"):
        return (1.0 + 0.1 * torch.randn(shape, generator=generator)).to(torch.bfloat16)
    if "norm" in name:
        return (0.1 * torch.randn(shape, generator=generator)).to(torch.bfloat16)
    return torch.empty(shape, dtype=torch.bfloat16).normal_(0.0, 0.02, generator=generator)


def write_random_checkpoint(folder: Path, raw: dict, seed: int) -> Path:
    """A bf16 checkpoint of `raw`'s shapes, generated and written a tensor at a time."""
    config = ModelConfig.from_dict(raw)
    with torch.device("meta"):
        module = Qwen3NextForCausalLM(config)
    generator = torch.Generator().manual_seed(seed)
    writer = ShardWriter(folder, SHARD_BYTES)
    for name, shape in checkpoint_names(module, config):
        writer.add({name: random_tensor(name, shape, generator)})
    writer.close()
    (folder / "config.json").write_text(json.dumps(raw, indent=2), encoding="utf-8")
    return folder


def prepare(fmt: str, bf16_folder: Path, workdir: Path) -> Path:
    if fmt == "bf16":
        return bf16_folder
    target = workdir / fmt
    if (target / "model.safetensors.index.json").is_file():
        return target
    if fmt == "fp8":
        return write_fp8_checkpoint(bf16_folder, target, SHARD_BYTES)
    return quantize_checkpoint(bf16_folder, target, fmt, SHARD_BYTES)


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.iterdir() if p.suffix == ".safetensors")


def rss_bytes() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class OtherLoad:
    """Share of this machine's CPU time that other processes used while the block ran (0 = quiet,
    1 = they kept every core busy): timings taken beside other work are slower than the code."""

    @staticmethod
    def _busy_seconds() -> float:
        with open("/proc/stat") as handle:
            fields = [int(v) for v in handle.readline().split()[1:8]]
        return (sum(fields) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")

    @staticmethod
    def _own_seconds() -> float:
        usage = resource.getrusage(resource.RUSAGE_SELF)
        return usage.ru_utime + usage.ru_stime

    def __enter__(self):
        self.wall, self.busy, self.own = time.perf_counter(), self._busy_seconds(), self._own_seconds()
        return self

    def __exit__(self, *exc):
        wall = time.perf_counter() - self.wall
        others = (self._busy_seconds() - self.busy) - (self._own_seconds() - self.own)
        self.share = round(min(1.0, max(0.0, others / (wall * (os.cpu_count() or 1)))), 2)


class Evictor:
    """Reads a buffer larger than the caches, so the next step's weights come from memory."""

    def __init__(self, nbytes: int = EVICT_BYTES):
        self.buffer = torch.ones(nbytes // 4, dtype=torch.float32)

    def __call__(self) -> None:
        float(self.buffer.sum())


def module_bytes(module: torch.nn.Module) -> int:
    dense = sum(p.numel() * p.element_size() for p in module.parameters())
    return dense + sum({id(v): v.nbytes for v in quantized_weights(module)}.values())


def head_seconds(norm, head_weight, hidden: torch.Tensor, evict: Evictor, repeats: int = 7) -> float:
    """Median time of the final norm and lm_head on one row, caches evicted before each call."""
    times = []
    for _ in range(repeats):
        evict()
        started = time.perf_counter()
        x = hidden if norm is None else norm(hidden)
        linear(x, head_weight)
        times.append(time.perf_counter() - started)
    return statistics.median(times)


class LayerTimer:
    """Forward hooks timing each decoder layer and its MoE block, summed over a prefill's chunks."""

    def __init__(self, layers):
        self.layer_s = [0.0] * len(layers)
        self.mlp_s = [0.0] * len(layers)
        self.handles = []
        for index, layer in enumerate(layers):
            for module, totals in ((layer, self.layer_s), (layer.mlp, self.mlp_s)):
                self.handles.append(module.register_forward_pre_hook(self._start(module)))
                self.handles.append(module.register_forward_hook(self._stop(module, totals, index)))
        self.started: dict[int, float] = {}

    def _start(self, module):
        def hook(*_):
            self.started[id(module)] = time.perf_counter()
        return hook

    def _stop(self, module, totals, index):
        def hook(*_):
            totals[index] += time.perf_counter() - self.started.pop(id(module))
        return hook

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def measure(folder: str, options: dict) -> dict:
    """Load one format's checkpoint and time it (runs in a fresh process)."""
    torch.set_num_threads(options["threads"])
    flush_denormals(True)
    started = time.perf_counter()
    lm = load_model(folder, dtype=torch.bfloat16)
    load_s = time.perf_counter() - started
    gc.collect()
    head = lm.module.lm_head.weight
    result = {"weight_formats": list(lm.weight_formats), "checkpoint_bytes": folder_bytes(Path(folder)),
              "head_format": head.format if isinstance(head, QuantizedWeight) else "bf16",
              "load_s": round(load_s, 1), "rss_after_load_bytes": rss_bytes(),
              "load_peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}
    backbone = lm.module.model
    types = list(lm.config.layer_types)
    edges = (module_bytes(backbone.embed_tokens) + module_bytes(backbone.norm) + module_bytes(lm.module.lm_head))
    per_layer = [module_bytes(layer) for layer in backbone.layers]
    total = lm.parameter_bytes()
    result["weights_bytes"] = total
    result["embedding_norm_head_bytes"] = edges
    result["weights_bytes_per_layer"] = {
        "mean": round((total - edges) / len(types)),
        **{kind: per_layer[types.index(kind)] for kind in (LINEAR, FULL) if kind in types},
    }

    evict = Evictor()
    generator = torch.Generator().manual_seed(1)
    vocab = lm.config.vocab_size
    # Warm-up: kernel builds, thread pools, allocator growth.
    warm = lm.new_state()
    logits = prefill(lm, warm, torch.randint(0, vocab, (96,), generator=generator), chunk_size=options["chunk"])
    for _ in range(2):
        lm.forward(torch.tensor([[int(logits.float().argmax())]]), warm, last_only=True)
    del warm

    hidden = torch.randn(1, 1, lm.config.hidden_size, generator=generator).to(lm.dtype)
    head_s = head_seconds(backbone.norm, lm.module.lm_head.weight, hidden, evict)
    ids = torch.randint(0, vocab, (options["prompt"],), generator=generator)
    runs, best = [], None
    with OtherLoad() as prefill_load:
        for _ in range(options["repeats"]):
            state = lm.new_state()
            timer = LayerTimer(backbone.layers)
            evict()
            started = time.perf_counter()
            logits = prefill(lm, state, ids, chunk_size=options["chunk"])
            seconds = time.perf_counter() - started
            timer.remove()
            runs.append(round(seconds, 3))
            if best is None or seconds < best[0]:
                best = (seconds, timer.layer_s, timer.mlp_s)
    seconds, layer_s, mlp_s = best
    mean_of = {kind: statistics.mean(s for s, t in zip(layer_s, types, strict=True) if t == kind)
               for kind in (LINEAR, FULL) if kind in types}
    result.update({
        "prefill_tokens": options["prompt"], "prefill_s": round(seconds, 3), "prefill_runs_s": runs,
        "prefill_tokens_per_s": round(options["prompt"] / seconds, 1),
        "prefill_s_per_layer": {"mean": round((seconds - head_s) / len(types), 3),
                                **{kind: round(value, 3) for kind, value in mean_of.items()}},
        "prefill_s_by_layer": [round(value, 3) for value in layer_s],
        "prefill_moe_share": round(sum(mlp_s) / sum(layer_s), 2),
        "prefill_outside_layers_s": round(seconds - sum(layer_s), 4),
        "state_bytes_after_prompt": state.nbytes(), "prefill_other_cpu_load": prefill_load.share,
    })

    token, steps = int(logits.float().argmax()), []
    with OtherLoad() as decode_load:
        for _ in range(options["decode_steps"]):
            evict()
            started = time.perf_counter()
            out = lm.forward(torch.tensor([[token]]), state, last_only=True)
            token = int(out[0, -1].float().argmax())
            steps.append(time.perf_counter() - started)
    step = sum(steps) / len(steps)
    result.update({
        "decode_steps": len(steps), "decode_tokens_per_s": round(1 / step, 2),
        "decode_ms_per_step_median": round(statistics.median(steps) * 1e3, 2),
        "decode_ms_per_layer": round((step - head_s) / len(types) * 1e3, 2),
        "head_ms": round(head_s * 1e3, 3), "decode_other_cpu_load": decode_load.share,
    })
    return result


def state_bytes(config: ModelConfig, tokens: int) -> dict:
    """K/V (bf16) and Gated DeltaNet state (fp32 recurrent, bf16 conv tail) of one sequence."""
    full = sum(t == FULL for t in config.layer_types)
    linear_layers = len(config.layer_types) - full
    kv = full * 2 * config.num_key_value_heads * config.head_dim * 2 * tokens
    recurrent = config.linear_num_value_heads * config.linear_key_head_dim * config.linear_value_head_dim * 4
    conv = config.linear_conv_dim * (config.linear_conv_kernel_dim - 1) * 2
    return {"kv_bytes": kv, "deltanet_bytes": linear_layers * (recurrent + conv)}


def project(row: dict, published: ModelConfig, head_80b: tuple[float, int], own_types: list[str],
            states: dict) -> dict:
    """The 80B's weights, memory, prefill and decode speed from one format's row; `head_80b` is
    (seconds, bytes) of the published lm_head in the row's head format."""
    head_80b_s, head_bytes = head_80b
    full = sum(t == FULL for t in published.layer_types)
    linear_layers = len(published.layer_types) - full
    per_layer = row["weights_bytes_per_layer"]
    hidden, vocab = published.hidden_size, published.vocab_size
    edges = (vocab * hidden + hidden) * 2 + head_bytes
    # The MTP block: a full-attention layer held in the row's format, its bf16 fc [H, 2H] and norms.
    mtp = published.mtp_num_hidden_layers * (per_layer[FULL] + 2 * hidden * hidden * 2 + 3 * hidden * 2)
    weights = linear_layers * per_layer[LINEAR] + full * per_layer[FULL] + edges + mtp
    prefill_layer = row["prefill_s_per_layer"]
    prefill_s = (linear_layers * prefill_layer[LINEAR] + full * prefill_layer[FULL]
                 + row["prefill_outside_layers_s"] - row["head_ms"] / 1e3 + head_80b_s)
    decode_s = len(published.layer_types) * row["decode_ms_per_layer"] / 1e3 + head_80b_s
    memory = {f"memory_gb_at_{tokens}": round((weights + sum(s.values())) / 1e9, 1) for tokens, s in states.items()}
    return {"weights_gb": round(weights / 1e9, 1), "mtp_block_gb": round(mtp / 1e9, 2), **memory,
            "prefill_tokens_per_s": round(row["prefill_tokens"] / prefill_s, 1),
            "decode_tokens_per_s": round(1 / decode_s, 2),
            "decode_assumes_layer_mix": f"{own_types.count(LINEAR)}:{own_types.count(FULL)}"}


def time_head_80b(config: ModelConfig, threads: int, head_format: str) -> tuple[float, int]:
    """(seconds, bytes) of one row through an lm_head of the published vocabulary in `head_format`
    (the decode and prefill head)."""
    torch.set_num_threads(threads)
    weight = torch.empty(config.vocab_size, config.hidden_size, dtype=torch.bfloat16).normal_(0, 0.02)
    weight = convert(weight, None if head_format == "bf16" else head_format, torch.bfloat16)
    hidden = torch.randn(1, config.hidden_size).to(torch.bfloat16)
    evict = Evictor()
    linear(hidden, weight)
    return head_seconds(None, weight, hidden, evict), weight.nbytes


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=None,
                        help="decoder layers in the published order (default: 4 where memory allows, else 2)")
    parser.add_argument("--formats", nargs="+", choices=FORMATS, default=list(FORMATS))
    parser.add_argument("--prompt", type=int, default=2048, help="prompt tokens prefilled before decoding")
    parser.add_argument("--decode-steps", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=2, help="prefill runs per format (the best is used)")
    parser.add_argument("--prefill-chunk", type=int, default=DEFAULT_PREFILL_CHUNK)
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", type=Path, default=None, help="folder for the temporary checkpoints")
    parser.add_argument("--checkpoints", type=Path, default=None,
                        help="keep the checkpoints in this folder (and reuse those already there) instead of "
                             "a temporary folder")
    parser.add_argument("--quick", action="store_true",
                        help="2 layers, a 512-token prompt, 8 decode steps, one prefill run")
    args = parser.parse_args()
    if args.quick:
        args.layers, args.prompt, args.decode_steps, args.repeats = args.layers or 2, 512, 8, 1
    layers = args.layers or default_layers()
    if layers < 2:
        parser.error("--layers must be at least 2 (one Gated DeltaNet and one attention layer)")
    published = ModelConfig.from_dict(PUBLISHED)
    raw = bench_config(layers, args.vocab)
    options = {"threads": args.threads, "chunk": args.prefill_chunk, "prompt": args.prompt,
               "decode_steps": args.decode_steps, "repeats": args.repeats}
    states = {tokens: state_bytes(published, tokens) for tokens in STATE_LENGTHS}
    results = {
        "cpu": cpu_model(), "threads": args.threads, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        **code_version(), "quantized_paths": quantized_paths(),
        "layers": raw["layer_types"], "vocab": args.vocab, "prompt_tokens": args.prompt,
        "decode_steps": args.decode_steps, "prefill_chunk": args.prefill_chunk,
        "state_80b": {str(tokens): s for tokens, s in states.items()}, "formats": {},
    }
    started = time.perf_counter()
    heads_80b: dict[str, tuple[float, int]] = {}
    results["head_80b_ms"] = {}
    context = multiprocessing.get_context("spawn")
    with contextlib.ExitStack() as stack:
        if args.checkpoints is None:
            workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(dir=args.workdir, prefix="real-shapes-")))
        else:
            workdir = args.checkpoints
            existing = workdir / "bf16" / "config.json"
            if existing.is_file() and json.loads(existing.read_text()) != raw:
                parser.error(f"{workdir} holds checkpoints of another shape (--layers, --vocab)")
        written = time.perf_counter()
        bf16_folder = workdir / "bf16"
        if not (bf16_folder / "config.json").is_file():
            write_random_checkpoint(bf16_folder, raw, args.seed)
        bf16_write_s = time.perf_counter() - written
        print(f"bf16 checkpoint: {folder_bytes(bf16_folder) / 1e9:.2f} GB in {bf16_write_s:.0f} s",
              file=sys.stderr, flush=True)
        for fmt in args.formats:
            converting = time.perf_counter()
            folder = prepare(fmt, bf16_folder, workdir)
            write_s = bf16_write_s if fmt == "bf16" else time.perf_counter() - converting
            with concurrent.futures.ProcessPoolExecutor(1, mp_context=context) as pool:
                row = pool.submit(measure, str(folder), options).result()
            row["checkpoint_write_s"] = round(write_s, 1)
            if fmt != "bf16" and args.checkpoints is None:
                shutil.rmtree(folder)
            head_format = row["head_format"]
            if head_format not in heads_80b:
                heads_80b[head_format] = time_head_80b(published, args.threads, head_format)
                results["head_80b_ms"][head_format] = round(heads_80b[head_format][0] * 1e3, 2)
                print(f"80B lm_head in {head_format}, one row: {heads_80b[head_format][0] * 1e3:.1f} ms",
                      file=sys.stderr, flush=True)
            row["projection_80b"] = project(row, published, heads_80b[head_format], raw["layer_types"], states)
            results["formats"][fmt] = row
            print(json.dumps({fmt: row}), file=sys.stderr, flush=True)
    results["total_s"] = round(time.perf_counter() - started)
    print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
