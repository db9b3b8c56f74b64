"""Time the decode step's attention on CPU (one new token over a long K/V cache) and print JSON.

    python -m bench.decode_attention                         # 4K, 32K, 128K cached positions; D 128 and 256
    python -m bench.decode_attention --lengths 262144 --dims 256 --repeats 5

Shapes are Qwen3-Next's attention: 16 query heads over 2 K/V heads, head size 256 (the 80B) or
128 (the bench model), bf16 K/V laid out as the model's cache `[B, KVH, S, D]`. Each call reads
every cached key and value once; the calls cycle through copies of the K/V that together exceed
the last-level cache, so they come from memory as in a real decode step. For every build of the
native kernel this CPU runs and for 1 thread and all threads, one JSON line: the best of
`repeats` rounds in ms, the K/V bytes per second that implies, and PyTorch's
scaled_dot_product_attention on the same inputs in the same rounds (alternating) with the ratio.
PyTorch runs its own best code whatever the build; set `kernels.native.AVX2_ONLY_ENVIRONMENT`'s
variables to compare on AVX2 terms. The 80B reads 12 such layers a token: at 262,144 positions,
12 x the D 256 time is its attention share of a decode step.
"""

from __future__ import annotations

import argparse
import json
import time

import torch
import torch.nn.functional as F

from kernels.attention import native
from kernels.native import cpu_runs, use_isa

HEADS, KV_HEADS = 16, 2
LENGTHS = (4096, 32768, 131072)
DIMS = (128, 256)
COLD_BYTES = 512 << 20  # K/V copies per case together at least this large (past any L3)
MAX_COPIES = 64


def kv_bytes(length: int, dim: int) -> int:
    return 2 * KV_HEADS * length * dim * 2


def make_case(length: int, dim: int, cold_bytes: int = COLD_BYTES, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    q = torch.randn(1, 1, HEADS, dim, generator=generator).bfloat16()
    copies = min(MAX_COPIES, max(2, -(-cold_bytes // kv_bytes(length, dim))))
    caches = [
        (torch.randn(1, KV_HEADS, length, dim, generator=generator).bfloat16(),
         torch.randn(1, KV_HEADS, length, dim, generator=generator).bfloat16())
        for _ in range(copies)
    ]
    return q, caches


def pytorch_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """The fallback the model takes without native kernels: the token's heads grouped per K/V head."""
    grouped = q.reshape(1, KV_HEADS, HEADS // KV_HEADS, q.shape[-1])
    return F.scaled_dot_product_attention(grouped, k, v, scale=scale).reshape(q.shape)


def per_call_ms(fn, q, caches, scale) -> float:
    start = time.perf_counter()
    for k, v in caches:
        fn(q, k, v, scale)
    return (time.perf_counter() - start) / len(caches) * 1e3


def measure(length: int, dim: int, isa: str, threads: int, repeats: int, cold_bytes: int = COLD_BYTES) -> dict:
    q, caches = make_case(length, dim, cold_bytes)
    scale = dim**-0.5
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with use_isa(isa):
            ours = native.native_causal_attention
            difference = (ours(q, *caches[0], scale).float() - pytorch_attention(q, *caches[0], scale).float()).abs()
            best = {"ours": float("inf"), "pytorch": float("inf")}
            for _ in range(repeats):
                best["ours"] = min(best["ours"], per_call_ms(ours, q, caches, scale))
                best["pytorch"] = min(best["pytorch"], per_call_ms(pytorch_attention, q, caches, scale))
    finally:
        torch.set_num_threads(previous)
    gigabytes = kv_bytes(length, dim) / 1e9
    return {
        "length": length, "dim": dim, "isa": isa, "threads": threads,
        "ours_ms": round(best["ours"], 3), "ours_gb_per_s": round(gigabytes / best["ours"] * 1e3, 1),
        "pytorch_ms": round(best["pytorch"], 3), "pytorch_gb_per_s": round(gigabytes / best["pytorch"] * 1e3, 1),
        "speedup": round(best["pytorch"] / best["ours"], 2),
        "max_abs_difference": float(difference.max()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", type=int, nargs="+", default=list(LENGTHS))
    parser.add_argument("--dims", type=int, nargs="+", default=list(DIMS))
    parser.add_argument("--threads", type=int, nargs="+", default=sorted({1, torch.get_num_threads()}))
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    if native.kernel() is None:
        raise SystemExit("no build of the native attention kernel runs here (needs a C compiler and AVX2)")
    isas = [isa for isa in native.ATTENTION.isas if cpu_runs(isa)]
    print(json.dumps({"heads": HEADS, "kv_heads": KV_HEADS, "builds": isas, "threads": args.threads}), flush=True)
    for dim in args.dims:
        for length in args.lengths:
            for isa in isas:
                for threads in args.threads:
                    print(json.dumps(measure(length, dim, isa, threads, args.repeats)), flush=True)


if __name__ == "__main__":
    main()
