"""Time a prefill chunk's attention on CPU (a chunk of new tokens over a K/V cache) and print JSON.

    python -m bench.prefill_attention                           # 2,048 new over 0 and 30,720 cached; D 128, 256
    python -m bench.prefill_attention --cached 0 129024 --dims 256 --repeats 2

Shapes are Qwen3-Next's attention: 16 query heads over 2 K/V heads, head size 256 (the 80B) or 128
(the bench model), bf16, the chunk's own keys last in the cache as the model appends them. A row
sees the cached keys and the chunk's keys up to its own. For every build of the native kernel this
CPU runs, one JSON line: the best of `repeats` calls in ms, the GFLOP/s of the products that
implies (4 * heads * D per visible key and row: scores and weighted values, causal keys only), and
the path the model takes without the native kernel (PyTorch's flash attention on the chunk's own
keys, its plain kernel on the cached ones, merged by their log-sum-exps) on the same inputs,
alternating, with the ratio. PyTorch runs its own best code whatever the build; set
`kernels.native.AVX2_ONLY_ENVIRONMENT`'s variables to compare on AVX2 terms.

A whole document is prefilled chunk by chunk, so the 80B's attention over an L-token prompt costs
12 layers x 2 * 16 * 256 * L^2 multiply-adds (the mean row sees L / 2 keys): at 262,144 tokens
~6.8 PFLOP, which at the GFLOP/s printed here for D 256 and a long cache is that prefill's
attention time.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from kernels.attention import native
from kernels.attention.blocked import pytorch_attention
from kernels.native import cpu_runs, use_isa

HEADS, KV_HEADS = 16, 2
NEW_TOKENS = 2048
CACHED = (0, 30720)
DIMS = (128, 256)


def make_case(new: int, cached: int, dim: int, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    q = torch.randn(1, new, HEADS, dim, generator=generator).bfloat16()
    k = torch.randn(1, KV_HEADS, cached + new, dim, generator=generator).bfloat16()
    v = torch.randn(1, KV_HEADS, cached + new, dim, generator=generator).bfloat16()
    return q, k, v


def products(new: int, cached: int, dim: int) -> float:
    """Floating-point operations of the scores and weighted values of the chunk's rows."""
    visible = new * cached + new * (new + 1) / 2
    return 4.0 * HEADS * dim * visible


def seconds(fn, *args) -> float:
    start = time.perf_counter()
    fn(*args)
    return time.perf_counter() - start


def measure(new: int, cached: int, dim: int, isa: str, repeats: int) -> dict:
    q, k, v = make_case(new, cached, dim)
    scale = dim**-0.5
    with use_isa(isa):
        ours = native.native_causal_attention
        difference = (ours(q, k, v, scale).float() - pytorch_attention(q, k, v, scale).float()).abs()
        best = {"ours": float("inf"), "pytorch": float("inf")}
        for _ in range(repeats):
            best["ours"] = min(best["ours"], seconds(ours, q, k, v, scale))
            best["pytorch"] = min(best["pytorch"], seconds(pytorch_attention, q, k, v, scale))
    flops = products(new, cached, dim)
    return {
        "new_tokens": new, "cached": cached, "dim": dim, "isa": isa, "threads": torch.get_num_threads(),
        "ours_ms": round(best["ours"] * 1e3, 1), "ours_gflop_per_s": round(flops / best["ours"] / 1e9),
        "pytorch_ms": round(best["pytorch"] * 1e3, 1), "pytorch_gflop_per_s": round(flops / best["pytorch"] / 1e9),
        "speedup": round(best["pytorch"] / best["ours"], 2),
        "max_abs_difference": float(difference.max()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--new-tokens", type=int, default=NEW_TOKENS)
    parser.add_argument("--cached", type=int, nargs="+", default=list(CACHED))
    parser.add_argument("--dims", type=int, nargs="+", default=list(DIMS))
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    if native.kernel() is None:
        raise SystemExit("no build of the native attention kernel runs here (needs a C compiler and AVX2)")
    isas = [isa for isa in native.ATTENTION.isas if cpu_runs(isa)]
    print(json.dumps({"heads": HEADS, "kv_heads": KV_HEADS, "builds": isas, "threads": torch.get_num_threads()}),
          flush=True)
    for dim in args.dims:
        for cached in args.cached:
            for isa in isas:
                print(json.dumps(measure(args.new_tokens, cached, dim, isa, args.repeats)), flush=True)


if __name__ == "__main__":
    main()
