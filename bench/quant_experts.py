"""Time one prefill chunk's routed experts over quantized weights on the CPU, at the 80B's shapes.

    python -m bench.quant_experts                      # fp8, int8, int4 against bf16, 2,048 tokens
    python -m bench.quant_experts --formats int4 --tokens 512 --experts 128
    DOCANALYST_ISA=avx2 python -m bench.quant_experts  # the AVX2 build

Qwen3-Next-80B-A3B's routed experts (hidden 2,048, expert width 512, 512 experts, top 10; gate
and up held as two weights, as the published checkpoints hold them) with random weights and
routing, one layer at a time, in each format:

* the experts kernel over bf16 weights (`kernels.moe.native.moe_experts`);
* the experts kernel over quantized weights, dequantizing each expert's rows as it reaches them
  (`moe_experts_quantized`, what prefill runs);
* the routed experts dequantized in groups into bf16 buffers beside the kernel
  (`kernels.quant.prefill.quantized_experts`, the path where that kernel does not run);
* the dequantizer alone (`kernels.quant.dequant_native`), G weights/s writing every routed
  expert into a buffer of 4 experts at a time.

The quantized results are compared bit for bit with each other and with the bf16 kernel on the
exact weights rounded to bf16 (a mismatch stops the run). The paths take turns, --repeats times;
the best time of each is printed, in ms, one JSON line per format.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from kernels.moe import moe_experts
from kernels.moe import native as moe_native
from kernels.native import flush_denormals, isa_order, matmul_has_amx
from kernels.quant import QuantizedRows, dequant_native, fp8_block, prefill, quantize_int4, quantize_int8
from kernels.quant.moe_reference import exact_weight

FORMATS = ("fp8_block", "int8", "int4")


def random_experts(format_name: str, shape: tuple[int, int, int], generator: torch.Generator):
    dense = torch.randn(*shape, generator=generator) * 0.02
    if format_name == "int8":
        return quantize_int8(dense)
    if format_name == "int4":
        return quantize_int4(dense)
    data = (dense * 5000).clamp(-448, 448).to(torch.float8_e4m3fn)
    scale = torch.rand(shape[0], shape[1] // 128, shape[2] // 128, generator=generator) * 1e-3 + 1e-4
    return fp8_block(data, scale)


def best_ms(calls: dict, repeats: int) -> dict[str, float]:
    """Each call once in turn, `repeats` times: the best of each, in ms."""
    best = dict.fromkeys(calls, float("inf"))
    for _ in range(repeats):
        for name, call in calls.items():
            start = time.perf_counter()
            call()
            best[name] = min(best[name], (time.perf_counter() - start) * 1e3)
    return {name: round(value, 1) for name, value in best.items()}


def measure(format_name: str, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor, args: argparse.Namespace,
            generator: torch.Generator) -> dict:
    """One format's experts: each path's best time and the dequantizer's rate (see the docstring)."""
    E, H, I = args.experts, args.hidden, args.width
    gate_up = QuantizedRows((random_experts(format_name, (E, I, H), generator),
                             random_experts(format_name, (E, I, H), generator)))
    down = random_experts(format_name, (E, H, I), generator)
    dense_gate_up, dense_down = (exact_weight(w).to(torch.bfloat16) for w in (gate_up, down))
    bf16 = moe_native.moe_experts(x, weights, ids, dense_gate_up, dense_down).view(torch.int16)
    for path in (moe_native.moe_experts_quantized(x, weights, ids, gate_up, down),
                 prefill.quantized_experts(x, weights, ids, gate_up, down, moe_experts)):
        if not torch.equal(path.view(torch.int16), bf16):
            raise SystemExit(f"{format_name}: a quantized path differs from the bf16 kernel on the exact weights")
    routed, buffer = torch.unique(ids), torch.empty(4, 2 * I, H, dtype=torch.bfloat16)

    def dequantize_routed() -> None:
        for start in range(0, len(routed) - 3, 4):
            group = routed[start : start + 4]
            for part, rows in zip(gate_up.parts, (slice(0, I), slice(I, 2 * I)), strict=True):
                dequant_native.dequantize_into(part, buffer[:, rows], experts=group)
            dequant_native.dequantize_into(down, buffer.view(4, H, 2 * I)[:, :, :I], experts=group)

    times = best_ms({"bf16_kernel": lambda: moe_native.moe_experts(x, weights, ids, dense_gate_up, dense_down),
                     "in_kernel": lambda: moe_native.moe_experts_quantized(x, weights, ids, gate_up, down),
                     "grouped": lambda: prefill.quantized_experts(x, weights, ids, gate_up, down, moe_experts),
                     "dequantizer": dequantize_routed}, args.repeats)
    dequantized = len(routed) // 4 * 4 * 3 * I * H
    return {"format": format_name, "ms": times,
            "dequantizer_g_weights_per_s": round(dequantized / times["dequantizer"] / 1e6, 2)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--formats", nargs="+", choices=FORMATS, default=list(FORMATS))
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--experts", type=int, default=512)
    parser.add_argument("--top-k", type=int, default=10)
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--width", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=4)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    flush_denormals()
    generator = torch.Generator().manual_seed(0)
    E, H = args.experts, args.hidden
    x = torch.randn(args.tokens, H, generator=generator).to(torch.bfloat16)
    weights, ids = torch.randn(args.tokens, E, generator=generator).softmax(-1).topk(args.top_k, dim=-1)
    weights = weights.to(torch.bfloat16)
    routed = torch.unique(ids)
    print(json.dumps({"isa": isa_order()[0] if isa_order() else None, "amx": matmul_has_amx(), "threads": args.threads,
                      "tokens": args.tokens, "experts": E, "routed_experts": len(routed), "top_k": args.top_k,
                      "hidden": H, "width": args.width}), flush=True)
    for format_name in args.formats:
        print(json.dumps(measure(format_name, x, weights, ids, args, generator)), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
