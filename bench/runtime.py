"""This runtime against transformers' Qwen3-Next on the same random weights, on CPU.

    python bench/runtime.py [--lengths 4096 16384 32768] [--decode-after 4096] [--dtype bf16]
    python bench/runtime.py --weights int4 --skip-reference     # this runtime with int4 weights

Both sides load the model in ../shared/reference/bench-config.json from one checkpoint folder
and are measured in one process, alternating: prefill time (last position's logits only; the
reference in one forward, this runtime in its prefill chunks as the app runs it), decode tokens/s
after a prompt (greedy, the same argmax on both sides), and the peak resident memory above the
loaded model during each prefill (sampled from /proc every 5 ms, after a warm-up forward on each
side). Decode, and prompts up to 8,192 tokens, are measured --repeats times on each side
(alternating) and the best of each side is reported with all runs. Prints JSON with both sides
and ratios.

--weights measures this runtime with its weights held in another format, loaded as the app would:
int8 / int4 quantized while loading (`load_model(..., weights=...)`), fp8 from an FP8 copy of the
checkpoint in the official layout (128 x 128 blocks, `bench/fp8_checkpoint.py`), kept FP8 in memory.
The reference keeps the bf16 checkpoint in --dtype. The resident weight bytes and formats are
reported with the results (`weights_bytes`, `weight_formats`).

Each side runs in its own floating-point mode: this runtime flushes denormals to zero on every
thread (as loading a CPU model does), while the reference runs as it does in a process of its
own, with denormals computed (x86's default; transformers does not change it). Its DeltaNet
decays underflow, so flushing would make it faster too: --reference-flush-denormals measures it
that way.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.fp8_checkpoint import write_fp8_checkpoint  # noqa: E402
from kernels.native import flush_denormals  # noqa: E402
from model import load_model, prefill  # noqa: E402
from model.demo import write_demo_checkpoint  # noqa: E402
from model.generation import DEFAULT_PREFILL_CHUNK  # noqa: E402
from model.sampling import argmax_index  # noqa: E402

BENCH_CONFIG = ROOT.parent / "shared" / "reference" / "bench-config.json"
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
WEIGHTS = ("bf16", "fp8", "int8", "int4")
# A prefill of a few seconds swings by 10-20% from run to run on a shared machine; longer ones
# average that out within the run.
SHORT_PROMPT = 8192


def rss_bytes() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakMemory:
    """Highest RSS seen while the block runs, sampled by a background thread."""

    def __enter__(self):
        self.start = self.peak = rss_bytes()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self):
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, rss_bytes())

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_bytes())


REFERENCE_FLUSHES_DENORMALS = False


def as_ours() -> None:
    flush_denormals(True)


def as_reference() -> None:
    flush_denormals(REFERENCE_FLUSHES_DENORMALS)


def ours_prefill(lm, ids: torch.Tensor, chunk: int, mtp: bool = True) -> tuple[float, int]:
    """(seconds, bytes of the resulting state); `mtp`: the MTP block's cache follows the prompt, as in
    the app (a model without the block runs the same either way)."""
    as_ours()
    state = lm.new_state(mtp=mtp)
    started = time.perf_counter()
    prefill(lm, state, ids[0], chunk_size=chunk)
    return time.perf_counter() - started, state.nbytes()


def reference_prefill(hf, ids: torch.Tensor) -> float:
    as_reference()
    started = time.perf_counter()
    with torch.inference_mode():
        hf(ids, logits_to_keep=1, use_cache=True)
    return time.perf_counter() - started


def ours_decode(lm, ids: torch.Tensor, steps: int) -> float:
    as_ours()
    state = lm.new_state(mtp=False)  # plain decode steps never read the MTP cache
    logits = prefill(lm, state, ids[0])
    token = argmax_index(logits)
    started = time.perf_counter()
    for _ in range(steps):
        token = argmax_index(lm.forward(torch.tensor([[token]]), state, last_only=True)[0, -1])
    return steps / (time.perf_counter() - started)


def reference_decode(hf, ids: torch.Tensor, steps: int) -> float:
    as_reference()
    with torch.inference_mode():
        out = hf(ids, logits_to_keep=1, use_cache=True)
        cache, token = out.past_key_values, torch.tensor([[argmax_index(out.logits[0, -1])]])
        started = time.perf_counter()
        for _ in range(steps):
            out = hf(token, past_key_values=cache, use_cache=True)
            cache, token = out.past_key_values, torch.tensor([[argmax_index(out.logits[0, -1])]])
    return steps / (time.perf_counter() - started)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[4096, 16384, 32768])
    parser.add_argument("--decode-after", type=int, default=4096)
    parser.add_argument("--decode-steps", type=int, default=32)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    parser.add_argument("--weights", choices=WEIGHTS, default="bf16",
                        help="format this runtime holds its weights in (bf16: dense in --dtype)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--prefill-chunk", type=int, default=DEFAULT_PREFILL_CHUNK,
                        help="this runtime prefills in chunks of this many tokens, as the app does")
    parser.add_argument("--skip-reference", action="store_true", help="measure this runtime only")
    parser.add_argument("--repeats", type=int, default=3,
                        help=f"decode, and prompts up to {SHORT_PROMPT} tokens, are measured this many times on "
                             "each side, alternating; the best of each side is reported")
    parser.add_argument("--reference-flush-denormals", action="store_true",
                        help="run the reference with denormals flushed too (faster than it runs by itself)")
    args = parser.parse_args()
    global REFERENCE_FLUSHES_DENORMALS
    REFERENCE_FLUSHES_DENORMALS = args.reference_flush_denormals
    torch.set_num_threads(args.threads)
    dtype = DTYPES[args.dtype]
    with tempfile.TemporaryDirectory() as tmp:
        folder = write_demo_checkpoint(Path(tmp) / "bench", config_overrides=json.loads(BENCH_CONFIG.read_text()))
        if args.weights == "fp8":
            lm = load_model(write_fp8_checkpoint(folder, Path(tmp) / "bench-fp8"), dtype=dtype)
        else:
            lm = load_model(folder, dtype=dtype, weights=None if args.weights == "bf16" else args.weights)
        hf = None
        if not args.skip_reference:
            from transformers import AutoModelForCausalLM

            hf = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).eval()
        weights = lm.parameter_bytes()
        generator = torch.Generator().manual_seed(0)
        # Warm both sides up so one-time allocations (thread pools, kernel caches, heap growth)
        # are not counted as prefill memory.
        warm = torch.randint(0, 151000, (1, 512), generator=generator)
        ours_prefill(lm, warm, args.prefill_chunk)
        if hf is not None:
            reference_prefill(hf, warm)
        # With this runtime alone in the process, RSS here is the loaded model after a warm-up:
        # each prefill's peak is also reported above it, whatever the earlier runs left resident.
        loaded_rss = rss_bytes()
        results = {"machine": platform.processor() or platform.machine(), "threads": args.threads,
                   "prefill_chunk": args.prefill_chunk, "reference_flushes_denormals": args.reference_flush_denormals,
                   "dtype": args.dtype, "weights": args.weights, "weight_formats": list(lm.weight_formats),
                   "weights_bytes": weights, "prefill": [], "decode": {}}
        # Decode first: after the reference's 32K prefill this process decoded at under half the rate
        # of a fresh one (ours alone after its own 32K prefill did not slow down).
        decode_ids = torch.randint(0, 151000, (1, args.decode_after), generator=generator)
        decode, ours_rates, reference_rates = results["decode"], [], []
        for _ in range(args.repeats):
            ours_rates.append(round(ours_decode(lm, decode_ids, args.decode_steps), 1))
            if hf is not None:
                reference_rates.append(round(reference_decode(hf, decode_ids, args.decode_steps), 1))
        decode["ours_tokens_per_s"], decode["ours_runs_tokens_per_s"] = max(ours_rates), ours_rates
        if hf is not None:
            decode["reference_tokens_per_s"] = max(reference_rates)
            decode["reference_runs_tokens_per_s"] = reference_rates
            decode["speedup"] = round(decode["ours_tokens_per_s"] / decode["reference_tokens_per_s"], 2)
        for length in args.lengths:
            ids = torch.randint(0, 151000, (1, length), generator=generator)
            row = {"tokens": length}
            ours_runs, reference_runs = [], []
            for _ in range(args.repeats if length <= SHORT_PROMPT else 1):
                with PeakMemory() as memory:
                    seconds, row["ours_state_bytes"] = ours_prefill(lm, ids, args.prefill_chunk)
                ours_runs.append(round(seconds, 2))
                row["ours_peak_extra_bytes"] = max(row.get("ours_peak_extra_bytes", 0), memory.peak - memory.start)
                if hf is None:
                    row["ours_peak_above_loaded_bytes"] = max(row.get("ours_peak_above_loaded_bytes", 0),
                                                              memory.peak - loaded_rss)
                if hf is not None:
                    with PeakMemory() as memory:
                        reference_runs.append(round(reference_prefill(hf, ids), 2))
                    row["reference_peak_extra_bytes"] = max(row.get("reference_peak_extra_bytes", 0),
                                                            memory.peak - memory.start)
            row["ours_s"] = min(ours_runs)
            if len(ours_runs) > 1:
                row["ours_runs_s"] = ours_runs
            if hf is not None:
                row["reference_s"] = min(reference_runs)
                if len(reference_runs) > 1:
                    row["reference_runs_s"] = reference_runs
                row["speedup"] = round(row["reference_s"] / row["ours_s"], 2)
            row["ours_tokens_per_s"] = round(length / row["ours_s"])
            results["prefill"].append(row)
            print(json.dumps(row), file=sys.stderr, flush=True)
    print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
