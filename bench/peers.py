"""This runtime against llama.cpp on the CPU, on the same weights, in one run.

    python bench/peers.py                         # bf16 vs BF16, int8 vs Q8_0, int4 vs Q4_K_M, all this CPU has
    python bench/peers.py --isa avx2              # both sides limited to AVX2 + FMA
    python bench/peers.py --isa avx512f           # both sides limited to Skylake-SP's AVX-512
    python bench/peers.py --formats bf16 fp32 --repeats 5
    python bench/peers.py --formats bf16 --prompt 32768 --phases decode   # decode deep in a long context

The bench model (../shared/reference/bench-config.json, random weights) is written once as a
checkpoint; llama.cpp's own converter (convert_hf_to_gguf.py, from its source package) turns it
into GGUF files (BF16, F32) and its llama-quantize into Q8_0 and Q4_K_M. This runtime loads the
same checkpoint as the app would: bf16 / fp32 dense, int8 / int4 quantized while loading.

llama.cpp is built here from the source of the `llama-cpp-python` package on the registry (the
version pinned below; `pip download` fetches it), with CMake, into the per-user cache, once per
version and set of extensions: about 4 minutes on a 2-core Xeon, Zen 3 or Zen 4 (llama-bench and llama-quantize only).
By default (--isa native) both sides use every x86 extension the CPU has, AVX-VNNI of an AVX2-only
Intel CPU included, except AMX for llama.cpp: llama.cpp's AMX matrix multiply crashes
on this model's quantized tensors (segfault in ggml_backend_amx_mul_mat at 0c1e570), and its
AVX-512 paths are what it runs without AMX. --isa avx2 builds it for AVX2 + FMA + F16C only and
runs this runtime as on a CPU without AVX-512 (kernels.native.AVX2_ONLY_ENVIRONMENT: its kernels'
AVX2 builds, and PyTorch, oneDNN and MKL limited to AVX2). --isa avx512f does the same for AVX-512
as Skylake-SP has it, without VNNI, VBMI or BF16 (AVX512F_ONLY_ENVIRONMENT); Cascade Lake and Ice
Lake add VNNI, which llama.cpp's quantized products use and this runtime's do not.

Measured, for each pair: prefill of --prompt tokens (llama-bench -p, tokens/s) and decode after
--prompt tokens (llama-bench -n with -d, tokens/s; this runtime: greedy steps after a prefill of
the same length, as bench/runtime.py does; llama.cpp runs each phase with its flash attention on and
off, and the faster counts, which one listed per run). The two sides take turns, one run each, --repeats
times (this runtime's model loaded once per format, in its own process), so that a slower spell
of a shared host touches both; each side's best run is compared, every run is listed. Prints JSON
with both sides, the ratios (this runtime / llama.cpp; above 1 is faster) and the CPU. --phases
decode leaves the prefill timings out: at long prompts each side's decode run still fills its
context first (untimed), so a 32K decode comparison takes about half as long as both phases.

Both sides prefill the same layers: llama-bench runs the model's trunk, and loads the checkpoint's
MTP block only for a draft context, which it does not make; this runtime's compared prefill uses a
state without the MTP cache. The app's states carry that cache, so its prefill also runs the MTP
block over the prompt (on the bench model one more attention layer, a ninth of the layers; on the
80B one of 49): reported beside the pair as `ours_prefill_with_mtp`, not part of the ratio.
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

from kernels.native import AVX2_ONLY_ENVIRONMENT, AVX512F_ONLY_ENVIRONMENT, int4_pairs_preferred  # noqa: E402

BENCH_CONFIG = ROOT.parent / "shared" / "reference" / "bench-config.json"
LLAMA_CPP_PYTHON = "0.3.36"  # its vendored llama.cpp is 0c1e570, which knows qwen3next
PHASES = ("prefill", "decode")
# llama.cpp's flash attention, both ways in each run: off decoded 10% faster at 32K on a Zen 5
# (its default, auto, turns it on), on prefills faster at long prompts.
LLAMA_FLASH_ATTENTION = ("on", "off")
# This runtime's weight format -> llama.cpp's file type of the same precision.
PAIRS = {"fp32": "F32", "bf16": "BF16", "int8": "Q8_0", "int4": "Q4_K_M"}
# llama.cpp's CMake switches for x86 extensions -> the /proc/cpuinfo flag each needs. --isa avx2 uses
# the first five; --isa native and avx512 all that the CPU has (Zen 4, for one, has AVX-512 VNNI but not
# AVX-VNNI, whose instructions would stop llama.cpp there). GGML_NATIVE is off: AMX stays off, see the docstring.
SWITCH_FLAGS = {"GGML_AVX": "avx", "GGML_AVX2": "avx2", "GGML_FMA": "fma", "GGML_F16C": "f16c", "GGML_BMI2": "bmi2",
                "GGML_AVX512": "avx512f", "GGML_AVX512_VBMI": "avx512vbmi", "GGML_AVX512_VNNI": "avx512_vnni",
                "GGML_AVX512_BF16": "avx512_bf16", "GGML_AVX_VNNI": "avx_vnni"}
ISA_SWITCHES = {"avx2": list(SWITCH_FLAGS)[:5], "avx512f": list(SWITCH_FLAGS)[:6], "avx512": list(SWITCH_FLAGS),
                "native": list(SWITCH_FLAGS)}
# What each --isa needs at least (this runtime's AVX-512 kernels need bf16 dot products).
ISA_CPU_FLAGS = {"native": set(), "avx512": {"avx512f", "avx512bw", "avx512vl", "avx512_bf16"},
                 "avx512f": {"avx512f", "avx512bw", "avx512vl", "avx512dq"}, "avx2": {"avx2", "fma", "f16c"}}
# The environment this runtime's side runs in for each --isa.
ISA_ENVIRONMENT = {"avx2": AVX2_ONLY_ENVIRONMENT, "avx512f": AVX512F_ONLY_ENVIRONMENT, "avx512": {}, "native": {}}


def llama_cpp_switches(isa: str, cpu_flags: set[str]) -> list[str]:
    """The switches of ISA_SWITCHES[isa] that this CPU can run."""
    return [name for name in ISA_SWITCHES[isa] if SWITCH_FLAGS[name] in cpu_flags]


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
            shown = {"amx_tile", "amx_bf16", "amx_int8", *SWITCH_FLAGS.values()} | set().union(*ISA_CPU_FLAGS.values())
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


def build_llama_cpp(switches: list[str]) -> tuple[Path, float]:
    """(folder of llama-bench and llama-quantize built with `switches` on, seconds the build took; 0 when
    cached)."""
    source = llama_cpp_source()
    name = "-".join(switch.removeprefix("GGML_").lower() for switch in switches)
    build = cache_root() / f"build-{LLAMA_CPP_PYTHON}-{name}"
    binaries = build / "bin"
    if (binaries / "llama-bench").exists() and (binaries / "llama-quantize").exists():
        return binaries, 0.0
    started = time.perf_counter()
    subprocess.run(["cmake", "-S", str(source), "-B", str(build), "-DCMAKE_BUILD_TYPE=Release", "-DGGML_NATIVE=OFF",
                    "-DGGML_AMX_TILE=OFF", "-DGGML_AMX_INT8=OFF", "-DGGML_AMX_BF16=OFF",
                    *(f"-D{name}={'ON' if name in switches else 'OFF'}" for name in SWITCH_FLAGS),
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


def llama_bench(binaries: Path, model: Path, prompt: int, steps: int, threads: int, phases: list[str]) -> dict:
    """One run of each of llama.cpp's `phases`, prefill and decode-after-prompt (tokens/s), with its flash
    attention on and off (LLAMA_FLASH_ATTENTION), the faster of the two and which it was; and its build."""
    common = [str(binaries / "llama-bench"), "-m", str(model), "-t", str(threads), "-r", "1", "-o", "json",
              "-fa", ",".join(LLAMA_FLASH_ATTENTION)]
    run = {}
    arguments = {"prefill": ["-p", str(prompt), "-n", "0"], "decode": ["-p", "0", "-n", str(steps), "-d", str(prompt)]}
    for name in phases:
        rows = json.loads(subprocess.run(common + arguments[name], check=True, capture_output=True, text=True).stdout)
        best = max(rows, key=lambda row: row["avg_ts"])
        run[name] = round(best["avg_ts"], 1)
        run[f"{name}_flash_attention"] = "on" if best["flash_attn"] == 1 else "off"
    run["build"] = best.get("build_commit")
    return run


# This runtime's side: loads the model once, then one prefill and one decode per line read.
OURS_SCRIPT = """
import json, sys, torch
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
print(json.dumps({{"weight_formats": list(lm.weight_formats)}}), flush=True)
for _ in sys.stdin:
    run = {{}}
    if "prefill" in {phases!r}:
        run["prefill"] = round({prompt} / ours_prefill(lm, ids, 4096, mtp=False)[0], 1)
        run["prefill_with_mtp"] = round({prompt} / ours_prefill(lm, ids, 4096)[0], 1)
    if "decode" in {phases!r}:
        run["decode"] = round(ours_decode(lm, ids, {steps}), 1)
    print(json.dumps(run), flush=True)
"""


def compare(checkpoint: Path, weights: str, binaries: Path, model: Path, args: argparse.Namespace) -> dict:
    """Both sides' rates, one run of each in turn, --repeats times (so that a slower spell of a shared
    host falls on both): tokens/s, the best and every run of each side."""
    environment = {**os.environ, **ISA_ENVIRONMENT[args.isa]}
    script = OURS_SCRIPT.format(root=str(ROOT), threads=args.threads, weights=weights, checkpoint=str(checkpoint),
                                prompt=args.prompt, steps=args.decode_steps, phases=args.phases)
    runs: dict[str, dict[str, list[float]]] = {side: {phase: [] for phase in args.phases}
                                             for side in ("ours", "llama_cpp")}
    with_mtp: list[float] = []
    flash_attention: dict[str, list[str]] = {phase: [] for phase in args.phases}
    with subprocess.Popen([sys.executable, "-c", script], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                          env=environment) as ours:
        formats = json.loads(ours.stdout.readline())["weight_formats"]
        for _ in range(args.repeats):
            peer = llama_bench(binaries, model, args.prompt, args.decode_steps, args.threads, args.phases)
            ours.stdin.write("run\n")
            ours.stdin.flush()
            mine = json.loads(ours.stdout.readline())
            for phase in args.phases:
                runs["llama_cpp"][phase].append(peer[phase])
                runs["ours"][phase].append(mine[phase])
                flash_attention[phase].append(peer[f"{phase}_flash_attention"])
            if "prefill_with_mtp" in mine:
                with_mtp.append(mine["prefill_with_mtp"])
        ours.stdin.close()
    if ours.returncode:
        raise RuntimeError(f"this runtime's side ended with status {ours.returncode}")
    result = {"ours_weight_formats": formats, "llama_cpp_build": peer["build"]}
    if with_mtp:
        result["ours_prefill_with_mtp"] = {"tokens_per_s": max(with_mtp), "runs": with_mtp}
    for phase in args.phases:
        best = {side: max(runs[side][phase]) for side in runs}
        result[phase] = {side: {"tokens_per_s": best[side], "runs": runs[side][phase]} for side in runs}
        result[phase]["llama_cpp"]["flash_attention"] = flash_attention[phase]
        result[phase]["ratio"] = round(best["ours"] / best["llama_cpp"], 2)
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--formats", nargs="+", choices=sorted(PAIRS), default=["bf16", "int8", "int4"],
                        help="this runtime's weight formats, each against llama.cpp's of the same precision")
    parser.add_argument("--isa", choices=sorted(ISA_SWITCHES), default="native",
                        help="instruction sets both sides may use (native: all this CPU has; avx2, avx512f: this "
                             "runtime with DOCANALYST_ISA set so)")
    parser.add_argument("--prompt", type=int, default=4096, help="prefill length, and the context decode runs after")
    parser.add_argument("--decode-steps", type=int, default=32)
    parser.add_argument("--phases", nargs="+", choices=PHASES, default=list(PHASES),
                        help="what to time: prefill of --prompt tokens, decode after --prompt tokens")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--keep", type=Path, help="keep the checkpoint and GGUF files in this folder")
    args = parser.parse_args()
    cpu = cpu_description()
    missing = ISA_CPU_FLAGS[args.isa] - set(cpu.get("flags", []))
    if missing:
        parser.error(f"this CPU lacks {', '.join(sorted(missing))}: use --isa avx2")
    from model.demo import write_demo_checkpoint

    switches = llama_cpp_switches(args.isa, set(cpu.get("flags", [])))
    binaries, build_s = build_llama_cpp(switches)
    results = {"cpu": cpu, "isa": args.isa, "llama_cpp_switches": switches, "threads": args.threads,
               "prompt_tokens": args.prompt, "decode_steps": args.decode_steps, "phases": args.phases,
               "llama_cpp_python": LLAMA_CPP_PYTHON,
               "llama_cpp_build_s": round(build_s, 1),
               # Whether our int4 decode multiplies by bf16 pair products (kernels.native.int4_pairs_preferred).
               "ours_int4_pairs": args.isa in ("native", "avx512") and int4_pairs_preferred(), "pairs": []}
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
            row = {"ours": name, "llama_cpp": kind, "gguf_bytes": files[kind].stat().st_size,
                   **compare(checkpoint, name, binaries, files[kind], args)}
            results["pairs"].append(row)
            print(json.dumps(row), file=sys.stderr, flush=True)
    print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
