"""Time the linear layer over quantized weights for decode (1 row) and draft verification (16 rows)
on the CPU, at the model's shapes, and print one line per case.

    python -m bench.quant_linear                  # every shape, 1 and 16 rows, both native builds
    python -m bench.quant_linear --rows 1 --pool-mb 0 --threads 1

Shapes (N x K): an expert's gate or up projection 512 x 2048, its down projection 2048 x 512, and
an in_proj-sized 8192 x 2048. Each case times bf16 (`kernels.linear`, its native small-row kernel
where the CPU has one), then fp8_block, int8 and int4 through the native kernel (each build this
CPU runs; int4 in the AVX-512 build by its table and by pair products) and through the reference
(dequantize tile by tile, then fp32 products).

GB/s counts the bytes of the weight a call must read (quantized values and scales, or bf16), so
it compares how close each path gets to the memory's bandwidth. By default the calls rotate over
copies of the weight totalling at least --pool-mb, so most reads come from memory, not cache, as
in a model whose weights far exceed the cache; --pool-mb 0 reuses one copy (cache-resident). The
copies lie in one buffer on huge pages, as the loader holds weights (DOCANALYST_HUGE_PAGES=0: 4 KB).
"""

from __future__ import annotations

import argparse
import functools
import statistics
import time
from collections.abc import Callable

import torch

from kernels.linear import linear
from kernels.native import back_with_huge_pages
from kernels.quant import native
from kernels.quant.formats import FP8_BLOCK_SIZE, QuantizedWeight
from kernels.quant.reference import fp8_block, quantize_int4, quantize_int8, quantized_linear_reference

SHAPES = {"expert gate/up": (512, 2048), "expert down": (2048, 512), "in_proj-like": (8192, 2048)}


def weight_bytes(weight: torch.Tensor | QuantizedWeight) -> int:
    return weight.nbytes if isinstance(weight, QuantizedWeight) else weight.numel() * weight.element_size()


def stacked(tensor: torch.Tensor, count: int) -> torch.Tensor:
    """`count` copies of `tensor` in one buffer on huge pages, as the loader holds a model's weights
    (the experts of a layer are one stack)."""
    stack = torch.empty((count, *tensor.shape), dtype=tensor.dtype)
    back_with_huge_pages(stack)
    return stack.copy_(tensor.expand(count, *tensor.shape))


def copies(weight: torch.Tensor | QuantizedWeight, pool_bytes: int) -> list:
    """Enough copies of `weight` to total pool_bytes (at least one)."""
    count = max(1, -(-pool_bytes // weight_bytes(weight)))
    if isinstance(weight, QuantizedWeight):
        data, scale = stacked(weight.data, count), stacked(weight.scale, count)
        return [QuantizedWeight(weight.format, data[i], scale[i], weight.shape, weight.group_size)
                for i in range(count)]
    return list(stacked(weight, count))


def seconds_per_call(call: Callable[[object], object], weights: list, budget: float) -> float:
    """Median over rounds of the mean time of one call, rotating over `weights`."""
    for weight in weights[:2]:
        call(weight)
    start = time.perf_counter()
    call(weights[0])
    once = max(time.perf_counter() - start, 1e-7)
    per_round = max(len(weights), min(2000, int(budget / 5 / once)))
    rounds = []
    for _ in range(5):
        start = time.perf_counter()
        for i in range(per_round):
            call(weights[i % len(weights)])
        rounds.append((time.perf_counter() - start) / per_round)
    return statistics.median(rounds)


def report(shape: str, size: tuple[int, int], rows: int, fmt: str, path: str, seconds: float, nbytes: int,
           reference: float | None = None) -> None:
    speedup = f"{reference / seconds:7.1f}x" if reference else ""
    print(f"{shape:<16}{f'{size[0]} x {size[1]}':>12}{rows:>5}  {fmt:<10}{path:<14}"
          f"{seconds * 1e6:>10.1f}{nbytes / seconds / 1e9:>8.2f}{speedup:>8}", flush=True)


def bench_shape(name: str, rows_list: list[int], pool: int, budget: float, with_reference: bool,
                builds: list[str]) -> None:
    """Every format and path at one shape, for each number of rows."""
    size = SHAPES[name]
    generator = torch.Generator().manual_seed(0)
    dense = torch.randn(*size, generator=generator) * 0.02
    largest = float(dense.abs().max())
    blocks = (-(-size[0] // FP8_BLOCK_SIZE), -(-size[1] // FP8_BLOCK_SIZE))
    fp8 = fp8_block((dense / largest * 448).to(torch.float8_e4m3fn), torch.full(blocks, largest / 448))
    quantized = {"fp8_block": fp8, "int8": quantize_int8(dense), "int4": quantize_int4(dense)}
    bf16 = copies(dense.to(torch.bfloat16), pool)
    for rows in rows_list:
        x = torch.randn(rows, size[1], generator=generator).to(torch.bfloat16)
        seconds = seconds_per_call(functools.partial(dense_call, x), bf16, budget)
        report(name, size, rows, "bf16", "linear", seconds, weight_bytes(bf16[0]))
        for fmt, weight in quantized.items():
            weights = copies(weight, pool)
            reference = None
            if with_reference:
                # A few copies only: the reference is compute-bound, and slow.
                reference = seconds_per_call(functools.partial(quantized_linear_reference, x), weights[:4], budget)
                report(name, size, rows, fmt, "reference", reference, weight_bytes(weight))
            for isa in builds:
                # int4 in the AVX-512 build both ways: by the 16-entry table and by pair products.
                for pairs in (False, True) if fmt == "int4" and isa == "avx512" else (False,):
                    seconds = seconds_per_call(functools.partial(native_call, x, isa, pairs), weights, budget)
                    report(name, size, rows, fmt, f"native-{isa}" + ("-pairs" if pairs else ""), seconds,
                           weight_bytes(weight), reference)
            del weights


def dense_call(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return linear(x, weight)


def native_call(x: torch.Tensor, isa: str, int4_pairs: bool, weight: QuantizedWeight) -> torch.Tensor:
    return native.quantized_linear_small_m(x, weight, isa=isa, int4_pairs=int4_pairs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--pool-mb", type=int, default=512, help="weight copies to rotate over (0: one copy)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--budget", type=float, default=1.0, help="seconds per measurement, about")
    parser.add_argument("--no-reference", action="store_true", help="skip the (slow) reference path")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    builds = [isa for isa in native.VARIANTS if native.kernel(isa) is not None]
    print(f"threads={args.threads} native builds={builds or 'none'} pool={args.pool_mb} MB")
    print(f"{'shape':<16}{'N x K':>12}{'rows':>5}  {'format':<10}{'path':<14}{'us/call':>10}{'GB/s':>8}{'x ref':>8}")
    with torch.inference_mode():
        for name in args.shapes:
            bench_shape(name, args.rows, args.pool_mb << 20, args.budget, not args.no_reference, builds)


if __name__ == "__main__":
    main()
