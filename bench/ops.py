"""Time the gated delta rule implementations on CPU and print JSON.

    python -m bench.ops                    # T in {64, 512, 4096}, H=4, HV=8, K=V=64
    python -m bench.ops --sweep            # short lengths: where "auto" should switch to chunks
    python -m bench.ops --threads 1 --repeats 9

Each entry is the median wall time of `repeats` calls after one warm-up call.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from kernels.gated_delta_rule import (
    RECURRENT_MAX_LEN,
    chunk_gated_delta_rule,
    naive_gated_delta_rule,
    recurrent_gated_delta_rule,
)

MAIN_LENGTHS = (64, 512, 4096)
SWEEP_LENGTHS = (1, 2, 4, 8, 12, 16, 24, 32, 48, 64)


def make_inputs(length: int, batch: int, key_heads: int, value_heads: int, dim: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, length, key_heads, dim, generator=gen)
    k = torch.randn(batch, length, key_heads, dim, generator=gen)
    v = torch.randn(batch, length, value_heads, dim, generator=gen)
    g = -F.softplus(torch.randn(batch, length, value_heads, generator=gen))
    beta = torch.sigmoid(torch.randn(batch, length, value_heads, generator=gen))
    state = torch.randn(batch, value_heads, dim, dim, generator=gen)
    return (q, k, v, g, beta), state


def median_ms(repeats: int, fn: Callable[..., object], *args, **kwargs) -> float:
    """Median milliseconds of `fn(*args, **kwargs)` over `repeats` calls after a warm-up call."""
    fn(*args, **kwargs)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn(*args, **kwargs)
        times.append(time.perf_counter() - start)
    return round(statistics.median(times) * 1e3, 3)


def transformers_chunk() -> Callable | None:
    """transformers' reference chunked implementation, for comparison when it is installed."""
    try:
        from transformers.models.qwen3_next import modeling_qwen3_next
        from transformers.utils import logging
    except ImportError:
        return None
    logging.set_verbosity_error()
    reference = modeling_qwen3_next.torch_chunk_gated_delta_rule

    def run(q, k, v, g, beta, initial_state):
        return reference(
            q, k, v, g, beta, initial_state=initial_state, output_final_state=True, use_qk_l2norm_in_kernel=True
        )

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", type=int, nargs="+", default=None)
    parser.add_argument("--sweep", action="store_true", help="short lengths, chunk vs recurrent only")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--key-heads", type=int, default=4)
    parser.add_argument("--value-heads", type=int, default=8)
    parser.add_argument("--dim", type=int, default=64, help="K = V")
    parser.add_argument("--chunk-sizes", type=int, nargs="+", default=[64, 32])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--naive-max-len", type=int, default=4096, help="skip the naive loop beyond this T")
    parser.add_argument("--no-reference", action="store_true", help="skip transformers' chunked form")
    args = parser.parse_args()

    if args.threads:
        torch.set_num_threads(args.threads)
    lengths = args.lengths or (SWEEP_LENGTHS if args.sweep else MAIN_LENGTHS)
    reference = None if (args.sweep or args.no_reference) else transformers_chunk()

    results = []
    for length in lengths:
        inputs, state = make_inputs(length, args.batch, args.key_heads, args.value_heads, args.dim)
        row: dict[str, float | int] = {"T": length}
        for size in args.chunk_sizes:
            row[f"chunk{size}_ms"] = median_ms(
                args.repeats, chunk_gated_delta_rule, *inputs, initial_state=state, chunk_size=size
            )
        row["recurrent_ms"] = median_ms(args.repeats, recurrent_gated_delta_rule, *inputs, initial_state=state)
        if not args.sweep and length <= args.naive_max_len:
            row["naive_ms"] = median_ms(args.repeats, naive_gated_delta_rule, *inputs, initial_state=state)
        if reference is not None:
            row["transformers_chunk_ms"] = median_ms(args.repeats, reference, *inputs, state)
        results.append(row)

    report = {
        "op": "gated_delta_rule",
        "device": "cpu",
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "shape": {"B": args.batch, "H": args.key_heads, "HV": args.value_heads, "K": args.dim, "V": args.dim},
        "recurrent_max_len": RECURRENT_MAX_LEN,
        "repeats": args.repeats,
        "results": results,
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
