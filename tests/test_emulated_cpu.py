"""The runtime on a CPU without AVX-512, emulated: QEMU's user-mode emulator runs a process as on a
Haswell (AVX2, FMA, F16C; no AVX-512, no AMX, and QEMU implements no AVX-512 instruction, so one on
the path would stop the process). There the kernels must choose their AVX2 builds by themselves and
a model must give the bits this CPU gives with its AVX2 builds forced (AVX2_ONLY_ENVIRONMENT).

The few-token forward (decode, and a prompt fed 16 tokens at a time) runs only this runtime's kernels,
so its logits must match bit for bit; a 40-token prefill also runs PyTorch's fp32 GEMMs (MKL), whose
AVX2 code may differ between CPU vendors, so its logits are compared within bf16 rounding.

A CPU with AVX but not AVX2 (Sandy and Ivy Bridge servers) runs no kernel build: there a model
loads in fp32 and answers through PyTorch, as this machine does with DOCANALYST_NATIVE=0. QEMU
executes AVX2 instructions whatever CPU it is told to emulate, so that run checks the choice made
from CPUID, not the instructions; the objdump scans in test_kernels_build.py check those.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from kernels import native

ROOT = Path(__file__).resolve().parents[1]
EMULATOR = shutil.which("qemu-x86_64")
# A CPU model QEMU's TCG emulates (AVX2 since QEMU 7.2): Intel's first with AVX2, FMA and F16C.
EMULATED_CPU = "Haswell"
# Intel's first with AVX (2011), without AVX2, FMA or F16C.
NO_AVX2_CPU = "SandyBridge"

pytestmark = [
    pytest.mark.slow,  # about two minutes: the emulated process runs ~10-50x slower
    pytest.mark.skipif(platform.machine() != "x86_64" or EMULATOR is None,
                       reason="needs an x86_64 machine with qemu-x86_64 (scripts/emulator.sh installs it)"),
]

SCRIPT = """
import hashlib, json, sys, torch
sys.path.insert(0, {root!r})
from kernels import native
from model import load_model, prefill

torch.set_num_threads(2)
report = {{"isa": list(native.isa_order()), "torch": torch.backends.cpu.get_cpu_capability(), "models": {{}}}}
ids = torch.randint(0, 151000, (40,), generator=torch.Generator().manual_seed(0))
for weights in ("bf16", "int4"):
    lm = load_model({checkpoint!r}, dtype=torch.bfloat16, weights=None if weights == "bf16" else weights)
    few = hashlib.sha256()
    state = lm.new_state()
    for start in range(0, len(ids), native.FEW_TOKENS):
        logits = lm.forward(ids[None, start : start + native.FEW_TOKENS], state, last_only=True)[0, -1]
        few.update(logits.view(torch.int16).numpy().tobytes())
    for _ in range(4):
        logits = lm.forward(torch.tensor([[int(logits.float().argmax())]]), state, last_only=True)[0, -1]
        few.update(logits.view(torch.int16).numpy().tobytes())
    prefill_logits = prefill(lm, lm.new_state(), ids)
    torch.save(prefill_logits, {folder!r} + f"/prefill-{{weights}}.pt")
    report["models"][weights] = {{"few_tokens": few.hexdigest(), "formats": list(lm.weight_formats)}}
print(json.dumps(report))
"""


def run(folder: Path, checkpoint: Path, *, emulated: bool) -> dict:
    folder.mkdir()
    environment = {key: value for key, value in os.environ.items() if key not in native.AVX2_ONLY_ENVIRONMENT}
    command = [sys.executable, "-c", SCRIPT.format(root=str(ROOT), checkpoint=str(checkpoint), folder=str(folder))]
    if emulated:
        # The interpreter's binary, named as sys.executable (so the virtual environment is found),
        # whether sys.executable is that binary or a wrapper that already emulates one
        # (scripts/emulated-cpu.sh): QEMU runs binaries only.
        command = [EMULATOR, "-cpu", EMULATED_CPU, "-0", sys.executable, os.readlink("/proc/self/exe"), *command[1:]]
    else:
        environment.update(native.AVX2_ONLY_ENVIRONMENT)
    done = subprocess.run(command, env=environment, capture_output=True, text=True, timeout=1800)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    report["prefill"] = {name: torch.load(folder / f"prefill-{name}.pt") for name in report["models"]}
    return report


@pytest.mark.skipif(not native.kernels_run() or not native.cpu_runs("avx2"),
                    reason="the AVX2 builds do not run on this machine (or DOCANALYST_NATIVE=0)")
def test_a_cpu_without_avx512_runs_the_avx2_builds_with_the_same_bits(demo_checkpoint, tmp_path):
    forced = run(tmp_path / "forced", demo_checkpoint, emulated=False)
    emulated = run(tmp_path / "emulated", demo_checkpoint, emulated=True)
    # Chosen by the kernels themselves: nothing in the emulated process's environment asks for AVX2.
    assert emulated["isa"] == ["avx2"] and emulated["torch"] == "AVX2"
    assert forced["isa"] == ["avx2"]
    assert emulated["models"]["int4"]["formats"] == forced["models"]["int4"]["formats"]
    assert "int4" in emulated["models"]["int4"]["formats"]
    for weights in ("bf16", "int4"):
        assert emulated["models"][weights]["few_tokens"] == forced["models"][weights]["few_tokens"], weights
        # One bf16 rounding step either way where MKL's fp32 sums differ in order.
        torch.testing.assert_close(emulated["prefill"][weights].float(), forced["prefill"][weights].float(),
                                   rtol=2 ** -7, atol=1e-3)


NO_KERNELS_SCRIPT = """
import json, sys, torch
sys.path.insert(0, {root!r})
from kernels import native
from model import load_model, prefill

torch.set_num_threads(2)
lm = load_model({checkpoint!r}, dtype={dtype})
ids = torch.randint(0, 151000, (24,), generator=torch.Generator().manual_seed(0))
torch.save(prefill(lm, lm.new_state(), ids), {logits!r})
print(json.dumps({{"isa": list(native.isa_order()), "kernels": native.kernels_run(), "dtype": str(lm.dtype)}}))
"""


def test_a_cpu_without_avx2_loads_fp32_and_answers_through_pytorch(demo_checkpoint, tmp_path):
    def run_script(logits: Path, prefix: list[str], environment: dict, dtype: str) -> dict:
        script = NO_KERNELS_SCRIPT.format(root=str(ROOT), checkpoint=str(demo_checkpoint), logits=str(logits),
                                          dtype=dtype)
        done = subprocess.run([*prefix, "-c", script], env=environment, capture_output=True, text=True, timeout=1800)
        assert done.returncode == 0, done.stderr[-3000:]
        return json.loads(done.stdout.strip().splitlines()[-1])

    clean = {key: value for key, value in os.environ.items() if key not in native.AVX2_ONLY_ENVIRONMENT}
    # This CPU's answer without the kernels, in fp32 (its default is bf16: it has bf16 matmuls).
    run_script(tmp_path / "host.pt", [sys.executable], {**clean, "DOCANALYST_NATIVE": "0"}, "torch.float32")
    emulated = run_script(tmp_path / "emulated.pt", [EMULATOR, "-cpu", NO_AVX2_CPU, "-0", sys.executable,
                                                     os.readlink("/proc/self/exe")], clean, "None")
    # Chosen from CPUID by the kernels themselves: no build runs, so the weights load in fp32.
    assert emulated == {"isa": [], "kernels": False, "dtype": "torch.float32"}
    # The same fp32 model through PyTorch's kernels for either CPU: sums in other orders only (~4e-7
    # apart on logits up to ~1; a bf16 rounding anywhere would be ~1e-3).
    torch.testing.assert_close(torch.load(tmp_path / "emulated.pt"), torch.load(tmp_path / "host.pt"),
                               rtol=1e-5, atol=1e-5)
