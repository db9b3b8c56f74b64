"""Builds and loads the C kernels (`*.c` beside their op) with the system compiler, once per version.

A library lands in a per-user cache folder named by its source's hash, written to a temporary
name and renamed so parallel processes never load a half-written file. Anything missing (no
compiler, no AVX-512 BF16, a failed build) makes `load` return None and callers keep PyTorch's
path; set DOCANALYST_NATIVE=0 to force that.

Every kernel is built for AVX-512 (with BF16 and AMX); a source may also be built for AVX2 + FMA
(`isa="avx2"`), a variant that CPUs without AVX-512 BF16 run instead.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import re
import shutil
import subprocess
import tempfile
import warnings
from pathlib import Path

import torch  # imported before any kernel library, whose libgomp.so.1 then resolves to torch's

FLAGS = ["-O3", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512bf16", "-mamx-tile", "-mamx-bf16", "-fopenmp",
         "-shared", "-fPIC"]
AVX2_FLAGS = ["-O3", "-mavx2", "-mfma", "-mf16c", "-fopenmp", "-shared", "-fPIC"]
LIBRARIES = ["-lm"]
# Instruction sets a source can be built for: the compiler flags, and the /proc/cpuinfo flags a CPU
# must report to run the build.
ISAS = {"avx512": (FLAGS, ("avx512_bf16",)), "avx2": (AVX2_FLAGS, ("avx2", "fma", "f16c"))}
# Calls of up to this many tokens (decode, draft verification) always take the native kernels, which
# give a token the same bits whatever the call's size; that is what keeps speculative decoding exact.
FEW_TOKENS = 16


@functools.cache
def _cpu_flags() -> frozenset[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    return frozenset(word for line in text.splitlines() if line.startswith("flags") for word in line.split())


def cpu_runs(isa: str) -> bool:
    """Whether this CPU runs code built for `isa` (a key of ISAS)."""
    return all(flag in _cpu_flags() for flag in ISAS[isa][1])


def _cpu_has_avx512_bf16() -> bool:
    return cpu_runs("avx512")


def compiler() -> str | None:
    """The C compiler (CC, else cc), or None where there is none."""
    return shutil.which(os.environ.get("CC", "cc"))


@functools.cache
def matmul_has_amx() -> bool:
    """Whether PyTorch's bf16 matmuls run on AMX tiles here (oneDNN), and so whether the kernels' own
    AMX paths may run: on such CPUs tiles beat the pair dot-product instruction several times over.
    DOCANALYST_AMX=0 makes this False (to test the other paths)."""
    if os.environ.get("DOCANALYST_AMX", "1") == "0":
        return False
    probe = getattr(torch.cpu, "_is_amx_tile_supported", None)
    return bool(probe and probe())


def tiles_pay_off(tokens: int) -> bool:
    """Whether a CPU call over `tokens` tokens should run on AMX tiles (a kernel's AMX path or PyTorch's
    GEMMs): more than FEW_TOKENS on a CPU with them."""
    return tokens > FEW_TOKENS and matmul_has_amx()


def flush_denormals(enabled: bool = True) -> bool:
    """Treat denormal floats as zero (or, with enabled=False, stop) on this thread and on every
    thread of the OpenMP pool; returns whether the pool's threads were reached.

    Decays of long contexts underflow to denormals, which x86 handles ~100x slower; PyTorch's own
    switch only reaches the calling thread. Without the native helper only this thread is set."""
    torch.set_flush_denormal(enabled)
    helper = load(Path(__file__).with_name("denormals.c"), "set_flush_denormals", (ctypes.c_int, ctypes.c_int))
    if helper is None:
        return False
    helper(max(torch.get_num_threads(), os.cpu_count() or 1), int(enabled))
    return True


@functools.cache
def numerics_identity() -> str:
    """Which arithmetic the CPU kernels do in this process: their C sources, whether they can run
    and whether they take the AMX tiles. A model's fingerprint includes it, so model states computed
    by other kernels (an earlier build, another CPU) are not taken for this build's bits."""
    digest = hashlib.sha256()
    for source in sorted(Path(__file__).parent.rglob("*.[ch]")):
        digest.update(source.relative_to(Path(__file__).parent).as_posix().encode() + b"\0" + source.read_bytes())
    enabled = os.environ.get("DOCANALYST_NATIVE", "1") != "0" and compiler() is not None
    runs = enabled and _cpu_has_avx512_bf16()
    # Where AVX-512 BF16 is missing, kernels with an AVX2 build run it.
    avx2 = enabled and not runs and cpu_runs("avx2")
    digest.update(f"runs={runs}|avx2={avx2}|amx={matmul_has_amx()}|flags={' '.join(FLAGS)}".encode())
    return digest.hexdigest()[:16]


def _cache_dir() -> Path:
    root = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(root) / "docanalyst" / "native"


def _source_bytes(source: Path) -> bytes:
    """The source and, recursively, the local files it #includes: a change to any rebuilds."""
    text = source.read_bytes()
    included = re.findall(rb'^#include "([^"]+)"', text, flags=re.MULTILINE)
    return text + b"".join(_source_bytes(source.parent / name.decode()) for name in included)


def _build(source: Path, compiler: str, flags: list[str] = FLAGS) -> Path:
    digest = hashlib.sha256(_source_bytes(source) + " ".join([compiler, *flags, *LIBRARIES]).encode()).hexdigest()[:16]
    target = _cache_dir() / f"{source.stem}-{digest}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        partial = Path(tmp) / target.name
        subprocess.run([compiler, *flags, "-o", str(partial), str(source), *LIBRARIES], check=True, capture_output=True)
        os.replace(partial, target)
    return target


def build(source: Path, isa: str = "avx512") -> Path:
    """The library of `source` built for `isa`, whether or not this CPU runs it (a build check);
    raises CalledProcessError (compiler output in its stderr) or FileNotFoundError (no compiler)."""
    cc = compiler()
    if cc is None:
        raise FileNotFoundError("no C compiler: set CC or install cc")
    return _build(source, cc, ISAS[isa][0])


@functools.cache
def load(source: Path, function: str, argtypes: tuple, isa: str = "avx512"):
    """The C function `function` of `source` built for `isa`, with its ctypes argument types, or
    None where it cannot run here."""
    if os.environ.get("DOCANALYST_NATIVE", "1") == "0" or not cpu_runs(isa):
        return None
    cc = compiler()
    if cc is None:
        return None
    try:
        # torch is already imported, so the library's libgomp.so.1 resolves to the OpenMP runtime
        # torch loaded and both share one thread pool.
        library = ctypes.CDLL(str(_build(source, cc, ISAS[isa][0])))
    except (OSError, subprocess.CalledProcessError) as error:
        warnings.warn(f"native kernel {source.name} unavailable, using PyTorch's path: {error}", stacklevel=2)
        return None
    entry = getattr(library, function)
    entry.argtypes = list(argtypes)
    entry.restype = None
    return entry
