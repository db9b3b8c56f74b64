"""Time the Triton kernels on a CUDA device at Qwen3-Next shapes and print JSON.

    python -m bench.kernels                         # every op; prefill T in {4K, 32K, 128K}, decode B in {1, 8}
    python -m bench.kernels --ops gdr --lengths 4096
    python -m bench.kernels --sweep                 # recurrent vs chunked GDR kernel for short T
    python -m bench.kernels --reference-max-len 0   # skip the PyTorch references

Shapes: H = 16 key heads, HV = 32 value heads, K = V = 128 (Gated DeltaNet); conv channels
2 H K + HV V = 8192, width 4; gated norm over V = 128 per value head; MoE hidden 2048, 512
experts of width 512, top 10. All inputs bf16 (the model's dtype), states fp32.

Each time is the median of `triton.testing.do_bench` (L2 flushed between calls), in ms. Every
entry compares "ours" (the Triton kernels) with `fla` where it is importable and with the
PyTorch reference on the same GPU, and records the largest difference from the reference.
Decode entries add the bytes a call must move at least and the bandwidth that implies, as a
fraction of the device-to-device copy bandwidth measured first.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

H, HV, DIM = 16, 32, 128
CONV_CHANNELS, CONV_WIDTH = 2 * H * DIM + HV * DIM, 4
HIDDEN, EXPERTS, EXPERT_WIDTH, TOP_K = 2048, 512, 512, 10
PREFILL_LENGTHS = (4096, 32768, 131072)
DECODE_BATCHES = (1, 8)
SWEEP_LENGTHS = (1, 2, 4, 8, 16, 32, 64, 128)
BF16 = torch.bfloat16


def require_gpu() -> None:
    """Exit with a clear message unless compiled Triton kernels can run here."""
    if not torch.cuda.is_available():
        sys.exit("bench/kernels.py needs a CUDA device and none is visible; run it on a GPU machine.")
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        sys.exit("TRITON_INTERPRET is set: unset it to time compiled kernels.")
    from kernels.triton_utils import triton_importable

    if not triton_importable():
        sys.exit("Triton is not importable: `pip install triton` into this environment.")


def median_ms(fn: Callable[[], object]) -> float:
    from triton.testing import do_bench

    return round(float(do_bench(fn, warmup=25, rep=100, return_mode="median")), 4)


def attempt(fn: Callable[[], object]) -> float | str:
    """Time fn, or return the error that stopped it (a missing feature in fla, out of memory)."""
    try:
        return median_ms(fn)
    except Exception as exc:  # a comparison that cannot run must not end the whole report
        torch.cuda.empty_cache()
        return f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max())


def copy_bandwidth_gbps() -> float:
    """Device-to-device copy of 1 GiB: read + write bytes over time."""
    src = torch.empty(1 << 28, dtype=torch.float32, device="cuda")
    dst = torch.empty_like(src)
    ms = median_ms(lambda: dst.copy_(src))
    return round(2 * src.numel() * 4 / ms / 1e6, 1)


def bandwidth(entry: dict[str, Any], nbytes: int, copy_gbps: float) -> None:
    entry["min_bytes"] = nbytes
    if isinstance(entry.get("ours_ms"), float):
        gbps = nbytes / entry["ours_ms"] / 1e6
        entry["ours_GBps"] = round(gbps, 1)
        entry["ours_fraction_of_copy"] = round(gbps / copy_gbps, 3)


def fla_ops() -> tuple[Callable | None, Callable | None]:
    try:
        from fla.ops.gated_delta_rule import chunk_gated_delta_rule, fused_recurrent_gated_delta_rule
    except Exception:
        return None, None
    return chunk_gated_delta_rule, fused_recurrent_gated_delta_rule


def gdr_inputs(batch: int, length: int, seed: int = 0):
    gen = torch.Generator(device="cuda").manual_seed(seed)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen, device="cuda")

    q, k = randn(batch, length, H, DIM).to(BF16), randn(batch, length, H, DIM).to(BF16)
    v = randn(batch, length, HV, DIM).to(BF16)
    a, b = randn(batch, length, HV).to(BF16), randn(batch, length, HV).to(BF16)
    A_log, dt_bias = randn(HV) * 0.5, randn(HV).to(BF16)
    g = -A_log.exp() * F.softplus(a.float() + dt_bias)
    beta = b.sigmoid()
    state = randn(batch, HV, DIM, DIM) * 0.1
    return (q, k, v, g, beta), (a, b, A_log, dt_bias), state


def expand_heads(q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """fla is called with q, k repeated to the value heads, which every fla version accepts."""
    return q.repeat_interleave(HV // H, dim=2), k.repeat_interleave(HV // H, dim=2)


def bench_gdr_prefill(lengths: list[int], reference_max_len: int) -> list[dict[str, Any]]:
    from kernels.gated_delta_rule import chunk_gated_delta_rule
    from kernels.gated_delta_rule.triton_chunk import chunk_gated_delta_rule_triton

    fla_chunk, _ = fla_ops()
    results = []
    for length in lengths:
        inputs, _, state = gdr_inputs(1, length)
        entry: dict[str, Any] = {"op": "gdr_prefill", "B": 1, "T": length, "H": H, "HV": HV, "K": DIM, "V": DIM}
        entry["ours_ms"] = attempt(lambda: chunk_gated_delta_rule_triton(*inputs, initial_state=state))  # noqa: B023
        if fla_chunk is not None:
            q, k = expand_heads(inputs[0], inputs[1])
            entry["fla_ms"] = attempt(
                lambda: fla_chunk(  # noqa: B023
                    q=q, k=k, v=inputs[2], g=inputs[3], beta=inputs[4], initial_state=state,  # noqa: B023
                    output_final_state=True, use_qk_l2norm_in_kernel=True,
                )
            )
            del q, k
        if length <= reference_max_len:
            entry["reference_ms"] = attempt(lambda: chunk_gated_delta_rule(*inputs, initial_state=state))  # noqa: B023
            out, final = chunk_gated_delta_rule_triton(*inputs, initial_state=state)
            ref_out, ref_final = chunk_gated_delta_rule(*inputs, initial_state=state)
            entry["max_abs_diff_out"] = max_diff(out, ref_out)
            entry["max_abs_diff_state"] = max_diff(final, ref_final)
            del out, final, ref_out, ref_final
        results.append(entry)
        del inputs, state
        torch.cuda.empty_cache()

    # Variable lengths: the longest T as 8 packed sequences of unequal length.
    length = max(lengths)
    inputs, _, _ = gdr_inputs(1, length)
    shares = torch.tensor([0.0, 0.02, 0.30, 0.05, 0.15, 0.10, 0.20, 0.08, 0.10]).cumsum(0)
    cuts = (shares / shares[-1] * length).round().long()
    cu = cuts.to(device="cuda", dtype=torch.int32)
    state = torch.zeros(8, HV, DIM, DIM, device="cuda")
    entry = {"op": "gdr_prefill_varlen", "sequences": 8, "T_total": length}
    entry["ours_ms"] = attempt(lambda: chunk_gated_delta_rule_triton(*inputs, initial_state=state, cu_seqlens=cu))
    if fla_chunk is not None:
        q, k = expand_heads(inputs[0], inputs[1])
        entry["fla_ms"] = attempt(
            lambda: fla_chunk(
                q=q, k=k, v=inputs[2], g=inputs[3], beta=inputs[4], initial_state=state,
                output_final_state=True, use_qk_l2norm_in_kernel=True, cu_seqlens=cu.long(),
            )
        )
    results.append(entry)
    return results


def bench_gdr_decode(batches: list[int], copy_gbps: float) -> list[dict[str, Any]]:
    from kernels.gated_delta_rule import recurrent_gated_delta_rule
    from kernels.gated_delta_rule.triton_recurrent import (
        recurrent_gated_delta_rule_from_gates_triton,
        recurrent_gated_delta_rule_triton,
    )

    _, fla_recurrent = fla_ops()
    results = []
    for batch in batches:
        inputs, gates, state = gdr_inputs(batch, 1)
        q, k, v, _, _ = inputs
        entry: dict[str, Any] = {"op": "gdr_decode", "B": batch, "H": H, "HV": HV, "K": DIM, "V": DIM}
        work = state.clone()
        entry["ours_ms"] = attempt(
            lambda: recurrent_gated_delta_rule_triton(*inputs, initial_state=work, state_out=work)  # noqa: B023
        )
        entry["ours_fused_gates_ms"] = attempt(
            lambda: recurrent_gated_delta_rule_from_gates_triton(  # noqa: B023
                q, k, v, *gates, initial_state=work, state_out=work  # noqa: B023
            )
        )
        if fla_recurrent is not None:
            qe, ke = expand_heads(q, k)
            entry["fla_ms"] = attempt(
                lambda: fla_recurrent(  # noqa: B023
                    q=qe, k=ke, v=v, g=inputs[3], beta=inputs[4], initial_state=work,  # noqa: B023
                    output_final_state=True, use_qk_l2norm_in_kernel=True,
                )
            )
        entry["reference_ms"] = attempt(
            lambda: recurrent_gated_delta_rule(*inputs, initial_state=work, state_out=work)  # noqa: B023
        )
        out, final = recurrent_gated_delta_rule_triton(*inputs, initial_state=state)
        ref_out, ref_final = recurrent_gated_delta_rule(*inputs, initial_state=state)
        entry["max_abs_diff_out"] = max_diff(out, ref_out)
        entry["max_abs_diff_state"] = max_diff(final, ref_final)
        state_bytes = state.numel() * 4 * 2
        io_bytes = sum(t.numel() * t.element_size() for t in (*inputs, out))
        bandwidth(entry, state_bytes + io_bytes, copy_gbps)
        results.append(entry)
    return results


def bench_gdr_sweep() -> list[dict[str, Any]]:
    """Where the Triton dispatcher should switch from the recurrent to the chunked kernel."""
    from kernels.gated_delta_rule import TRITON_RECURRENT_MAX_LEN
    from kernels.gated_delta_rule.triton_chunk import chunk_gated_delta_rule_triton
    from kernels.gated_delta_rule.triton_recurrent import recurrent_gated_delta_rule_triton

    results = []
    for length in SWEEP_LENGTHS:
        inputs, _, state = gdr_inputs(1, length)
        results.append({
            "op": "gdr_sweep",
            "T": length,
            "recurrent_ms": attempt(lambda: recurrent_gated_delta_rule_triton(*inputs, initial_state=state)),  # noqa: B023
            "chunk_ms": attempt(lambda: chunk_gated_delta_rule_triton(*inputs, initial_state=state)),  # noqa: B023
            "current_switch": TRITON_RECURRENT_MAX_LEN,
        })
    return results


def bench_conv(lengths: list[int], batches: list[int], reference_max_len: int, copy_gbps: float):
    from kernels.causal_conv1d import conv
    from kernels.causal_conv1d.triton_conv import causal_conv1d_triton, causal_conv1d_update_triton

    gen = torch.Generator(device="cuda").manual_seed(1)
    weight = (torch.randn(CONV_CHANNELS, CONV_WIDTH, generator=gen, device="cuda") / 2).to(BF16)
    results = []
    for length in lengths:
        # The model's layout: a [B, D, T] view of the [B, T, D] projection.
        x = torch.randn(1, length, CONV_CHANNELS, generator=gen, device="cuda").to(BF16).transpose(1, 2)
        tail = torch.randn(1, CONV_CHANNELS, CONV_WIDTH - 1, generator=gen, device="cuda").to(BF16)
        entry: dict[str, Any] = {"op": "conv_prefill", "T": length, "D": CONV_CHANNELS, "W": CONV_WIDTH}
        entry["ours_ms"] = attempt(lambda: causal_conv1d_triton(x, weight, conv_state=tail))  # noqa: B023
        if length <= reference_max_len:
            entry["reference_ms"] = attempt(lambda: conv.causal_conv1d(x, weight, conv_state=tail))  # noqa: B023
            entry["max_abs_diff"] = max_diff(
                causal_conv1d_triton(x, weight, conv_state=tail)[0], conv.causal_conv1d(x, weight, conv_state=tail)[0]
            )
        bandwidth(entry, 2 * x.numel() * 2, copy_gbps)
        results.append(entry)
    for batch in batches:
        x = torch.randn(batch, CONV_CHANNELS, generator=gen, device="cuda").to(BF16)
        tail = torch.randn(batch, CONV_CHANNELS, CONV_WIDTH - 1, generator=gen, device="cuda").to(BF16)
        entry = {"op": "conv_decode", "B": batch, "D": CONV_CHANNELS, "W": CONV_WIDTH}
        entry["ours_ms"] = attempt(lambda: causal_conv1d_update_triton(x, tail, weight))  # noqa: B023
        entry["reference_ms"] = attempt(lambda: conv.causal_conv1d_update(x, tail, weight))  # noqa: B023
        ours_tail, ref_tail = tail.clone(), tail.clone()
        entry["max_abs_diff"] = max_diff(
            causal_conv1d_update_triton(x, ours_tail, weight), conv.causal_conv1d_update(x, ref_tail, weight)
        )
        nbytes = 2 * x.numel() * 2 + 2 * tail.numel() * 2 + weight.numel() * 2
        bandwidth(entry, nbytes, copy_gbps)
        results.append(entry)
    return results


def bench_norm(lengths: list[int], batches: list[int], reference_max_len: int, copy_gbps: float):
    from kernels.gated_rmsnorm import norm
    from kernels.gated_rmsnorm.triton_norm import gated_rms_norm_triton

    gen = torch.Generator(device="cuda").manual_seed(2)
    weight = (1 + 0.1 * torch.randn(DIM, generator=gen, device="cuda")).to(BF16)
    results = []
    for tokens, op in [*((t, "norm_prefill") for t in lengths), *((b, "norm_decode") for b in batches)]:
        x = torch.randn(tokens, HV, DIM, generator=gen, device="cuda").to(BF16)
        z = torch.randn(tokens, HV, DIM, generator=gen, device="cuda").to(BF16)
        entry: dict[str, Any] = {"op": op, "tokens": tokens, "rows": tokens * HV, "D": DIM}
        entry["ours_ms"] = attempt(lambda: gated_rms_norm_triton(x, z, weight))  # noqa: B023
        if tokens <= reference_max_len:
            entry["reference_ms"] = attempt(lambda: norm.gated_rms_norm(x, z, weight))  # noqa: B023
            entry["max_abs_diff"] = max_diff(gated_rms_norm_triton(x, z, weight), norm.gated_rms_norm(x, z, weight))
        bandwidth(entry, 3 * x.numel() * 2, copy_gbps)
        results.append(entry)
    return results


def bench_moe(lengths: list[int], batches: list[int], reference_max_len: int, copy_gbps: float):
    from kernels.moe import reference
    from kernels.moe.triton_moe import experts_swiglu_triton, route_triton

    gen = torch.Generator(device="cuda").manual_seed(3)
    router = (torch.randn(EXPERTS, HIDDEN, generator=gen, device="cuda") * HIDDEN**-0.5).to(BF16)
    gate_up = (torch.randn(EXPERTS, 2 * EXPERT_WIDTH, HIDDEN, generator=gen, device="cuda") * HIDDEN**-0.5).to(BF16)
    down = (torch.randn(EXPERTS, HIDDEN, EXPERT_WIDTH, generator=gen, device="cuda") * EXPERT_WIDTH**-0.5).to(BF16)
    results = []
    for tokens, op in [*((b, "moe_decode") for b in batches), *((t, "moe_prefill") for t in lengths)]:
        x = torch.randn(tokens, HIDDEN, generator=gen, device="cuda").to(BF16)
        weights, ids = reference.route(x, router, TOP_K, True)
        entry: dict[str, Any] = {"op": op, "tokens": tokens, "hidden": HIDDEN, "E": EXPERTS, "I": EXPERT_WIDTH}
        entry["k"] = TOP_K
        entry["router_ours_ms"] = attempt(lambda: route_triton(x, router, TOP_K, True))  # noqa: B023
        entry["ours_ms"] = attempt(lambda: experts_swiglu_triton(x, weights, ids, gate_up, down))  # noqa: B023
        if tokens <= reference_max_len:
            entry["router_reference_ms"] = attempt(lambda: reference.route(x, router, TOP_K, True))  # noqa: B023
            entry["reference_ms"] = attempt(
                lambda: reference.experts_swiglu(x, weights, ids, gate_up, down)  # noqa: B023
            )
            entry["router_ids_equal"] = bool(torch.equal(route_triton(x, router, TOP_K, True)[1], ids))
            entry["max_abs_diff"] = max_diff(
                experts_swiglu_triton(x, weights, ids, gate_up, down),
                reference.experts_swiglu(x, weights, ids, gate_up, down),
            )
        routed = int(ids.unique().numel())
        flops = 2 * tokens * TOP_K * 3 * EXPERT_WIDTH * HIDDEN
        if isinstance(entry["ours_ms"], float):
            entry["ours_TFLOPs"] = round(flops / entry["ours_ms"] / 1e9, 1)
        entry["experts_routed"] = routed
        # Each routed expert's gate, up and down weights once, plus the activations in and out.
        bandwidth(entry, routed * 3 * EXPERT_WIDTH * HIDDEN * 2 + 2 * x.numel() * 2, copy_gbps)
        results.append(entry)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ops = ["gdr", "conv", "norm", "moe"]
    parser.add_argument("--ops", nargs="+", default=ops, choices=ops)
    parser.add_argument("--lengths", type=int, nargs="+", default=list(PREFILL_LENGTHS), help="prefill T")
    parser.add_argument("--batches", type=int, nargs="+", default=list(DECODE_BATCHES), help="decode B")
    parser.add_argument("--reference-max-len", type=int, default=32768, help="skip PyTorch references beyond this T")
    parser.add_argument("--sweep", action="store_true", help="only the recurrent vs chunked GDR sweep")
    args = parser.parse_args()
    require_gpu()

    import triton

    report: dict[str, Any] = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "fla": fla_ops()[0] is not None,
    }
    if args.sweep:
        report["results"] = bench_gdr_sweep()
        print(json.dumps(report, indent=2))
        return
    copy_gbps = copy_bandwidth_gbps()
    report["copy_GBps"] = copy_gbps
    results: list[dict[str, Any]] = []
    if "gdr" in args.ops:
        results += bench_gdr_decode(args.batches, copy_gbps)
        results += bench_gdr_prefill(args.lengths, args.reference_max_len)
    if "conv" in args.ops:
        results += bench_conv(args.lengths, args.batches, args.reference_max_len, copy_gbps)
    if "norm" in args.ops:
        results += bench_norm(args.lengths, args.batches, args.reference_max_len, copy_gbps)
    if "moe" in args.ops:
        results += bench_moe(args.lengths, args.batches, args.reference_max_len, copy_gbps)
    report["results"] = results
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
