"""This runtime against llama.cpp on the CPU, on the same weights, in one run.

    python bench/peers.py                         # bf16 vs BF16, int8 vs Q8_0, int4 vs Q4_K_M
    python bench/peers.py --isa avx2              # both sides limited to AVX2 + FMA
    python bench/peers.py --formats bf16 fp32 --repeats 5

The bench model (../shared/reference/bench-config.json, random weights) is written once as a
checkpoint; llama.cpp's own converter (convert_hf_to_gguf.py, from its source package) turns it
into GGUF files (BF16, F32) and its llama-quantize into Q8_0 and Q4_K_M. This runtime loads the
same checkpoint as the app would: bf16 / fp32 dense, int8 / int4 quantized while loading.

llama.cpp is built here from the source of the `llama-cpp-python` package on the registry (the
version pinned below; `pip download` fetches it), with CMake, into the per-user cache, once per
version and instruction set: about 4 minutes on a 2-core Xeon (llama-bench and llama-quantize only).
It is built for the CPU's instruction sets without AMX: llama.cpp's AMX matrix multiply crashes
on this model's quantized tensors (segfault in ggml_backend_amx_mul_mat at 0c1e570), and its
AVX-512 paths are what it runs without AMX. --isa avx2 builds it for AVX2 + FMA + F16C only and
runs this runtime as on a CPU without AVX-512 (kernels.native.AVX2_ONLY_ENVIRONMENT: its kernels'
AVX2 builds, and PyTorch, oneDNN and MKL limited to AVX2).

Measured, for each pair: prefill of --prompt tokens (llama-bench -p, tokens/s) and decode after
--prompt tokens (llama-bench -n with -d, tokens/s; this runtime: greedy steps after a prefill of
the same length, as bench/runtime.py does). Each side runs --repeats times (llama-bench reports
its mean; this runtime its best and all runs), each format of this runtime in a fresh process.
Prints JSON with both sides, the ratios (this runtime / llama.cpp; above 1 is faster) and the CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from kernels.native import AVX2_ONLY_ENVIRONMENT  # noqa: E402

BENCH_CONFIG = ROOT.parent / "shared" / "reference" / "bench-config.json"
LLAMA_CPP_PYTHON = "0.3.36"  # its vendored llama.cpp is 0c1e570, which knows qwen3next
# This runtime's weight format -> llama.cpp's file type of the same precision.
PAIRS = {"fp32": "F32", "bf16": "BF16", "int8": "Q8_0", "int4": "Q4_K_M"}
# CMake switches per instruction set (GGML_NATIVE off: AMX stays off, see the module docstring).
ISA_SWITCHES = {
    "avx512": ["GGML_AVX", "GGML_AVX2", "GGML_FMA", "GGML_F16C", "GGML_BMI2", "GGML_AVX512", "GGML_AVX512_VBMI",
               "GGML_AVX512_VNNI", "GGML_AVX512_BF16", "GGML_AVX_VNNI"],
    "avx2": ["GGML_AVX", "GGML_AVX2", "GGML_FMA", "GGML_F16C", "GGML_BMI2"],
}
ISA_CPU_FLAGS = {"avx512": {"avx512f", "avx512_bf16", "avx512_vnni", "avx512vbmi", "avx_vnni"},
                 "avx2": {"avx2", "fma", "f16c"}}


def cpu_description() -> dict:
    info = {"machine": platform.machine(), "cpus": os.cpu_count()}
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return info
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key in ("model name", "cpu family", "model") and key not in info:
            info[key] = value.strip()
        if key == "flags":
            flags = set(value.split())
            shown = {"amx_tile", "amx_bf16", "amx_int8"} | set().union(*ISA_CPU_FLAGS.values())
            info["flags"] = sorted(flags & shown)
            break
    return info


def cache_root() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "docanalyst" / "llama.cpp"


def llama_cpp_source() -> Path:
    """The vendored llama.cpp of the pinned llama-cpp-python source package, unpacked once."""
    target = cache_root() / f"llama-cpp-python-{LLAMA_CPP_PYTHON}"
    source = target / f"llama_cpp_python-{LLAMA_CPP_PYTHON}" / "vendor" / "llama.cpp"
    if source.is_dir():
        return source
    target.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([sys.executable, "-m", "pip", "download", f"llama-cpp-python=={LLAMA_CPP_PYTHON}", "--no-deps",
                        "--no-binary", ":all:", "-d", tmp, "-q"], check=True)
        archive = next(Path(tmp).glob("llama_cpp_python-*.tar.gz"))
        with tarfile.open(archive) as tar:
            tar.extractall(target, filter="data")
    return source


def build_llama_cpp(isa: str) -> tuple[Path, float]:
    """(folder of llama-bench and llama-quantize, seconds the build took; 0 when cached)."""
    source = llama_cpp_source()
    build = cache_root() / f"build-{LLAMA_CPP_PYTHON}-{isa}"
    binaries = build / "bin"
    if (binaries / "llama-bench").exists() and (binaries / "llama-quantize").exists():
        return binaries, 0.0
    started = time.perf_counter()
    switches = [f"-D{name}={'ON' if name in ISA_SWITCHES[isa] else 'OFF'}" for name in ISA_SWITCHES["avx512"]]
    subprocess.run(["cmake", "-S", str(source), "-B", str(build), "-DCMAKE_BUILD_TYPE=Release", "-DGGML_NATIVE=OFF",
                    "-DGGML_AMX_TILE=OFF", "-DGGML_AMX_INT8=OFF", "-DGGML_AMX_BF16=OFF", *switches,
                    "-DLLAMA_CURL=OFF", "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF",
                    "-DLLAMA_BUILD_SERVER=OFF"], check=True, capture_output=True)
    subprocess.run(["cmake", "--build", str(build), "-j", str(os.cpu_count() or 1), "--target", "llama-bench",
                    "llama-quantize"], check=True, capture_output=True)
    return binaries, time.perf_counter() - started


def write_gguf_files(checkpoint: Path, folder: Path, binaries: Path, kinds: list[str]) -> dict[str, Path]:
    """GGUF files of `checkpoint` for each llama.cpp file type in `kinds`."""
    source = llama_cpp_source()
    environment = {**os.environ, "PYTHONPATH": str(source / "gguf-py")}
    files: dict[str, Path] = {}
    for dense in ("BF16", "F32"):
        if dense in kinds or (dense == "BF16" and set(kinds) - {"F32", "BF16"}):
            files[dense] = folder / f"bench-{dense.lower()}.gguf"
            subprocess.run([sys.executable, str(source / "convert_hf_to_gguf.py"), str(checkpoint), "--outtype",
                            dense.lower(), "--outfile", str(files[dense])], check=True, capture_output=True,
                           env=environment)
    for quantized in set(kinds) - {"F32", "BF16"}:
        files[quantized] = folder / f"bench-{quantized.lower()}.gguf"
        subprocess.run([str(binaries / "llama-quantize"), str(files["BF16"]), str(files[quantized]), quantized],
                       check=True, capture_output=True)
    return files


def llama_bench(binaries: Path, model: Path, prompt: int, steps: int, threads: int, repeats: int) -> dict:
    """llama.cpp's prefill and decode-after-prompt rates (tokens/s, mean of `repeats`)."""
    common = [str(binaries / "llama-bench"), "-m", str(model), "-t", str(threads), "-r", str(repeats), "-o", "json"]
    runs = {}
    for name, extra in (("prefill", ["-p", str(prompt), "-n", "0"]),
                        ("decode", ["-p", "0", "-n", str(steps), "-d", str(prompt)])):
        out = subprocess.run(common + extra, check=True, capture_output=True, text=True).stdout
        row = json.loads(out)[0]
        runs[name] = {"tokens_per_s": round(row["avg_ts"], 1), "stddev": round(row["stddev_ts"], 1)}
    runs["build"] = json.loads(out)[0].get("build_commit")
    return runs


OURS_SCRIPT = """
import json, sys, time, torch
sys.path.insert(0, {root!r})
from bench.runtime import ours_decode, ours_prefill
from model import load_model
torch.set_num_threads({threads})
weights = {weights!r}
lm = load_model({checkpoint!r}, dtype=torch.float32 if weights == "fp32" else torch.bfloat16,
                weights=None if weights in ("fp32", "bf16") else weights)
generator = torch.Generator().manual_seed(0)
ids = torch.randint(0, 151000, (1, {prompt}), generator=generator)
ours_prefill(lm, ids[:, :512], 4096)
prefill = [round({prompt} / ours_prefill(lm, ids, 4096)[0], 1) for _ in range({repeats})]
decode = [round(ours_decode(lm, ids, {steps}), 1) for _ in range({repeats})]
print(json.dumps({{"prefill": prefill, "decode": decode, "weight_formats": list(lm.weight_formats)}}))
"""


def ours(checkpoint: Path, weights: str, prompt: int, steps: int, threads: int, repeats: int, isa: str) -> dict:
    """This runtime's rates in a fresh process (tokens/s: best of `repeats`, and every run)."""
    environment = {**os.environ, **(AVX2_ONLY_ENVIRONMENT if isa == "avx2" else {})}
    script = OURS_SCRIPT.format(root=str(ROOT), threads=threads, weights=weights, checkpoint=str(checkpoint),
                                prompt=prompt, steps=steps, repeats=repeats)
    out = subprocess.run([sys.executable, "-c", script], check=True, capture_output=True, text=True, env=environment)
    runs = json.loads(out.stdout.strip().splitlines()[-1])
    return {"prefill": {"tokens_per_s": max(runs["prefill"]), "runs": runs["prefill"]},
            "decode": {"tokens_per_s": max(runs["decode"]), "runs": runs["decode"]},
            "weight_formats": runs["weight_formats"]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--formats", nargs="+", choices=sorted(PAIRS), default=["bf16", "int8", "int4"],
                        help="this runtime's weight formats, each against llama.cpp's of the same precision")
    parser.add_argument("--isa", choices=sorted(ISA_SWITCHES), default="avx512",
                        help="instruction sets both sides may use (avx2: this runtime with DOCANALYST_ISA=avx2)")
    parser.add_argument("--prompt", type=int, default=4096, help="prefill length, and the context decode runs after")
    parser.add_argument("--decode-steps", type=int, default=32)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--keep", type=Path, help="keep the checkpoint and GGUF files in this folder")
    args = parser.parse_args()
    cpu = cpu_description()
    missing = ISA_CPU_FLAGS[args.isa] - set(cpu.get("flags", []))
    if missing:
        parser.error(f"this CPU lacks {', '.join(sorted(missing))}: use --isa avx2")
    from model.demo import write_demo_checkpoint

    binaries, build_s = build_llama_cpp(args.isa)
    results = {"cpu": cpu, "isa": args.isa, "threads": args.threads, "prompt_tokens": args.prompt,
               "decode_steps": args.decode_steps, "llama_cpp_python": LLAMA_CPP_PYTHON,
               "llama_cpp_build_s": round(build_s, 1), "pairs": []}
    with tempfile.TemporaryDirectory() as tmp:
        folder = args.keep or Path(tmp)
        folder.mkdir(parents=True, exist_ok=True)
        checkpoint = folder / "bench"
        if not (checkpoint / "config.json").exists():
            write_demo_checkpoint(checkpoint, config_overrides=json.loads(BENCH_CONFIG.read_text()))
        kinds = [PAIRS[name] for name in args.formats]
        existing = {kind: folder / f"bench-{kind.lower()}.gguf" for kind in kinds}
        todo = [kind for kind, path in existing.items() if not path.exists()]
        files = {**existing, **(write_gguf_files(checkpoint, folder, binaries, todo) if todo else {})}
        for name in args.formats:
            kind = PAIRS[name]
            peer = llama_bench(binaries, files[kind], args.prompt, args.decode_steps, args.threads, args.repeats)
            mine = ours(checkpoint, name, args.prompt, args.decode_steps, args.threads, args.repeats, args.isa)
            row = {"ours": name, "llama_cpp": kind, "llama_cpp_build": peer.pop("build"),
                   "gguf_bytes": files[kind].stat().st_size, "ours_weight_formats": mine.pop("weight_formats")}
            for phase in ("prefill", "decode"):
                row[phase] = {"ours": mine[phase], "llama_cpp": peer[phase],
                              "ratio": round(mine[phase]["tokens_per_s"] / peer[phase]["tokens_per_s"], 2)}
            results["pairs"].append(row)
            print(json.dumps(row), file=sys.stderr, flush=True)
    print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
