"""Builds and binds the C kernels (`*.c` beside their op) with the system compiler, once per version.

A library lands in a per-user cache folder named by its source's hash, written to a temporary
name and renamed so parallel processes never load a half-written file. Anything missing (no
compiler, no build the CPU runs, a failed build) makes a `Kernel` unavailable and callers keep
PyTorch's path; set DOCANALYST_NATIVE=0 to force that.

A source is built for each instruction set it supports (ISAS: AVX-512 with BF16 and AMX, AVX-512
without them, AVX2 + FMA + F16C); the process runs the first build in ISA_PREFERENCE that the CPU
runs and the kernel has. DOCANALYST_ISA=avx512f or avx2 makes a newer CPU run those builds (and
PyTorch's path where a kernel has none), to measure and test what older CPUs get.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import hashlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path
from typing import NamedTuple

import torch  # imported before any kernel library, whose libgomp.so.1 then resolves to torch's

FLAGS = ["-O3", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512bf16", "-mamx-tile", "-mamx-bf16", "-fopenmp",
         "-shared", "-fPIC"]
AVX2_FLAGS = ["-O3", "-mavx2", "-mfma", "-mf16c", "-fopenmp", "-shared", "-fPIC"]
# AVX-512 as Skylake-SP has it (Cascade Lake, Ice Lake and Tiger Lake add no bf16 arithmetic): the
# fp32 code of the AVX2 builds on 16-lane vectors and 32 registers.
AVX512F_FLAGS = ["-O3", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma", "-mf16c", "-fopenmp",
                 "-shared", "-fPIC"]
LIBRARIES = ["-lm"]


class InstructionSet(NamedTuple):
    """What building for and running an instruction set takes."""

    compiler_flags: list[str]
    cpuinfo_flags: tuple[str, ...]  # /proc/cpuinfo flags a CPU must report to run the build
    cpuid_probe: str  # PyTorch's CPUID probe (a torch.cpu function) that must agree


# Instruction sets a source can be built for.
ISAS = {"avx512": InstructionSet(FLAGS, ("avx512_bf16",), "_is_avx512_bf16_supported"),
        "avx512f": InstructionSet(AVX512F_FLAGS, ("avx512f", "avx512bw", "avx512vl", "avx512dq", "fma", "f16c"),
                                  "_is_avx512_supported"),
        "avx2": InstructionSet(AVX2_FLAGS, ("avx2", "fma", "f16c"), "_is_avx2_supported")}
# A process's environment that makes this CPU stand for one without AVX-512: the kernels' AVX2
# builds, and PyTorch's own kernels, oneDNN and MKL limited to AVX2 (no AVX-512, no AMX).
AVX2_ONLY_ENVIRONMENT = {"DOCANALYST_ISA": "avx2", "ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2",
                         "MKL_ENABLE_INSTRUCTIONS": "AVX2"}
# A process's environment that makes this CPU stand for one with AVX-512 but no bf16 arithmetic or
# AMX (Skylake-SP to Ice Lake): the kernels' builds for it, PyTorch's AVX-512 kernels, oneDNN and
# MKL without their bf16 and AMX code.
AVX512F_ONLY_ENVIRONMENT = {"DOCANALYST_ISA": "avx512f", "ATEN_CPU_CAPABILITY": "avx512",
                            "ONEDNN_MAX_CPU_ISA": "AVX512_CORE", "MKL_ENABLE_INSTRUCTIONS": "AVX512"}
# Channels the avx512f builds widen from bf16 at a time (two 16-lane vectors): rows of other widths
# run a kernel's AVX2 build there (Kernel.isa_for).
WIDE_FP32_CHANNELS = 32
# The order in which a kernel's builds are tried.
ISA_PREFERENCE = ("avx512", "avx512f", "avx2")
# Calls of up to this many tokens (decode, draft verification) always take the native kernels, which
# give a token the same bits whatever the call's size; that is what keeps speculative decoding exact.
FEW_TOKENS = 16


@functools.cache
def _cpuinfo() -> str:
    try:
        return Path("/proc/cpuinfo").read_text()
    except OSError:
        return ""


@functools.cache
def _cpu_flags() -> frozenset[str]:
    return frozenset(word for line in _cpuinfo().splitlines() if line.startswith("flags") for word in line.split())


@functools.cache
def _cpu_vendor() -> str:
    """The CPU's vendor string (GenuineIntel, AuthenticAMD), or "" where /proc/cpuinfo does not say."""
    for line in _cpuinfo().splitlines():
        if line.startswith("vendor_id"):
            return line.partition(":")[2].strip()
    return ""


@functools.cache
def _torch_cpu_reports(probe_name: str, without_probe: bool) -> bool:
    """What PyTorch's CPUID probe `torch.cpu.<probe_name>()` says, or `without_probe` where it has none."""
    probe = getattr(torch.cpu, probe_name, None)
    return without_probe if probe is None else bool(probe())


def cpu_runs(isa: str) -> bool:
    """Whether this CPU runs code built for `isa` (a key of ISAS): the kernel reports its flags and
    the CPUID instruction, as PyTorch reads it for its own kernels, reports the set too. The two
    agree on hardware; an emulated CPU (QEMU's -cpu Haswell) hides AVX-512 from CPUID only."""
    build = ISAS[isa]
    return all(flag in _cpu_flags() for flag in build.cpuinfo_flags) and _torch_cpu_reports(build.cpuid_probe, True)


_forced_isa: str | None = None
# Bumped whenever the ISA choice changes, so kernels re-resolve their build.
_choice_generation = 0


@functools.cache
def isa_order() -> tuple[str, ...]:
    """The instruction sets this process runs kernels for, best first: ISA_PREFERENCE filtered by
    the CPU, starting at DOCANALYST_ISA (or `use_isa`'s choice) where one is set."""
    forced = _forced_isa or os.environ.get("DOCANALYST_ISA") or None
    if forced is not None and forced not in ISAS:
        raise ValueError(f"DOCANALYST_ISA must be one of {', '.join(ISAS)}, not {forced!r}")
    order = ISA_PREFERENCE[ISA_PREFERENCE.index(forced):] if forced else ISA_PREFERENCE
    return tuple(isa for isa in order if cpu_runs(isa))


@contextlib.contextmanager
def use_isa(isa: str | None):
    """Within the block, kernels run their `isa` build (None: the CPU's best), as DOCANALYST_ISA
    would for a whole process; for tests that check every build this CPU runs."""
    global _forced_isa
    previous = _forced_isa
    _set_forced_isa(isa)
    try:
        yield
    finally:
        _set_forced_isa(previous)


def _set_forced_isa(isa: str | None) -> None:
    global _forced_isa, _choice_generation
    if isa is not None and isa not in ISAS:
        raise ValueError(f"unknown instruction set {isa!r}")
    _forced_isa = isa
    _choice_generation += 1
    isa_order.cache_clear()
    int4_pairs_preferred.cache_clear()
    numerics_identity.cache_clear()


def compiler() -> str | None:
    """The C compiler (CC, else cc), or None where there is none."""
    return shutil.which(os.environ.get("CC", "cc"))


def _cpu_has_amx() -> bool:
    return _torch_cpu_reports("_is_amx_tile_supported", False)


def matmul_has_amx() -> bool:
    """Whether PyTorch's bf16 matmuls run on AMX tiles here (oneDNN), and so whether the kernels' own
    AMX paths may run: on such CPUs tiles beat the pair dot-product instruction several times over.
    DOCANALYST_AMX=0 makes this False (to test the other paths), and so do the AVX2 builds
    (DOCANALYST_ISA=avx2 stands for a CPU without AVX-512, which has no AMX either)."""
    return os.environ.get("DOCANALYST_AMX", "1") != "0" and "avx512" in isa_order() and _cpu_has_amx()


def kernels_run() -> bool:
    """Whether some build of the kernels runs here (a compiler, a CPU with AVX2 or AVX-512, and
    DOCANALYST_NATIVE not 0): then bf16 models decode through them, in either build."""
    return os.environ.get("DOCANALYST_NATIVE", "1") != "0" and compiler() is not None and bool(isa_order())


def native_bf16_matmul() -> bool:
    """Whether bf16 matrix products run natively here (AVX-512 BF16, AMX): elsewhere PyTorch's bf16
    GEMM is an order of magnitude slower than its fp32 one, and bf16 weights are widened first."""
    return "avx512" in isa_order()


@functools.cache
def int4_pairs_preferred() -> bool:
    """Whether the few-token kernels multiply int4 weights with bf16 activations by the bf16 pair dot
    product (kernels/quant/quant_dot.h), in the AVX-512 build: AMD's CPUs run that instruction at the
    fp32 FMA's rate, two products per lane, and it needs half the conversions the 16-entry table
    does; Intel's run it at half that rate, where the table measured faster. DOCANALYST_INT4_PAIRS=0
    or 1 decides instead (to measure or test either way). Read once per ISA choice: every
    few-token call asks."""
    forced = os.environ.get("DOCANALYST_INT4_PAIRS")
    if forced in ("0", "1"):
        return forced == "1"
    return isa_order()[:1] == ("avx512",) and _cpu_vendor() == "AuthenticAMD"


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
    if not DENORMALS.available():
        return False
    DENORMALS(max(torch.get_num_threads(), os.cpu_count() or 1), int(enabled))
    return True


# glibc's mallopt parameters (malloc.h) and the values keep_freed_memory sets.
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD, _M_ARENA_MAX = -1, -2, -3, -8
HEAP_SETTINGS = {
    _M_MMAP_THRESHOLD: 32 << 20,  # blocks up to this size come from the heap (glibc's largest default)
    _M_TRIM_THRESHOLD: 256 << 20,  # freed memory at the heap's top kept for reuse, up to this much
    _M_TOP_PAD: 256 << 20,  # address space the heap grows by at a time (untouched pages cost nothing)
    _M_ARENA_MAX: 1,  # every thread allocates from that heap (others' arenas give memory back eagerly)
}


def keep_freed_memory() -> bool:
    """Have the C allocator keep freed work buffers for the next chunk instead of handing them back
    to the system, which maps fresh zeroed pages on the next call. A 2,048-token prefill chunk at
    the 80B's shapes frees and reallocates its activations layer after layer; with glibc's defaults
    (blocks above a threshold that adapts to the largest one freed are mapped apart, a thread's own
    arena shrinks as soon as it can) 4 layers took ~300,000 page faults, 0.7-0.9 s of system time
    on 2 cores, and ~2,000 with these settings. The app prefills in a worker thread, hence one
    arena. Returns whether the allocator took them (glibc does; others are left as they are)."""
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return all([mallopt(parameter, value) == 1 for parameter, value in HEAP_SETTINGS.items()])


# Linux's madvise() advice asking for transparent huge pages, and their size on x86-64.
_MADV_HUGEPAGE = 14
HUGE_PAGE_BYTES = 2 << 20


def back_with_huge_pages(tensor: torch.Tensor) -> bool:
    """Ask Linux to back a large CPU tensor's pages not yet touched with 2 MB pages (the whole
    2 MB-aligned pages inside it). Weights are streamed from memory at every token: on 4 KB pages a
    stream meets a page boundary every 4 KB, where the hardware prefetcher stops and the TLB misses
    (an expert's 1 MB rows span 256 pages). Systems whose transparent huge pages are in "madvise"
    mode (Ubuntu's default) give them only to memory advised so; "always" gives them anyway, "never"
    ignores the advice. Returns whether the advice was taken."""
    if not sys.platform.startswith("linux") or tensor.device.type != "cpu":
        return False
    if os.environ.get("DOCANALYST_HUGE_PAGES", "1") == "0":
        return False
    storage = tensor.untyped_storage()
    first = -(-storage.data_ptr() // HUGE_PAGE_BYTES) * HUGE_PAGE_BYTES
    last = (storage.data_ptr() + storage.nbytes()) // HUGE_PAGE_BYTES * HUGE_PAGE_BYTES
    if last <= first:
        return False
    madvise = _madvise()
    return madvise is not None and madvise(first, last - first, _MADV_HUGEPAGE) == 0


@functools.cache
def _madvise():
    try:
        madvise = ctypes.CDLL(None, use_errno=True).madvise
    except (OSError, AttributeError):
        return None
    madvise.argtypes, madvise.restype = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int], ctypes.c_int
    return madvise


@functools.cache
def numerics_identity() -> str:
    """Which arithmetic the CPU kernels do in this process: their C sources, whether they can run,
    whether they take the AMX tiles and how they multiply int4 weights. A model's fingerprint
    includes it, so model states computed by other kernels (an earlier build, another CPU) are not
    taken for this build's bits."""
    digest = hashlib.sha256()
    for source in sorted(Path(__file__).parent.rglob("*.[ch]")):
        digest.update(source.relative_to(Path(__file__).parent).as_posix().encode() + b"\0" + source.read_bytes())
    enabled = os.environ.get("DOCANALYST_NATIVE", "1") != "0" and compiler() is not None
    isas = isa_order() if enabled else ()
    flags = ";".join(" ".join(ISAS[isa].compiler_flags) for isa in isas)
    digest.update(f"isas={','.join(isas)}|amx={matmul_has_amx()}|int4_pairs={int4_pairs_preferred()}|flags={flags}"
                  .encode())
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
    return _build(source, cc, ISAS[isa].compiler_flags)


# Argument codes of a Kernel's signature and the ctypes type each passes as.
_ARGUMENT_TYPES = {"p": ctypes.c_void_p, "i": ctypes.c_int64, "n": ctypes.c_int, "f": ctypes.c_float}


@functools.cache
def _library(source: Path, isa: str) -> ctypes.CDLL | None:
    if os.environ.get("DOCANALYST_NATIVE", "1") == "0" or not cpu_runs(isa):
        return None
    cc = compiler()
    if cc is None:
        return None
    try:
        # torch is already imported, so the library's libgomp.so.1 resolves to the OpenMP runtime
        # torch loaded and both share one thread pool.
        return ctypes.CDLL(str(_build(source, cc, ISAS[isa].compiler_flags)))
    except (OSError, subprocess.CalledProcessError) as error:
        warnings.warn(f"native kernel {source.name} ({isa}) unavailable, using PyTorch's path: {error}", stacklevel=3)
        return None


class Kernel:
    """One C function of a kernel source, bound for each instruction set the source builds for.

    `signature` spells the C parameters, one code each: p a pointer (pass a tensor, whose data
    pointer goes, or None for NULL), i int64_t, n int, f float. `returns` is "n" for a function that
    returns an int status, else None (void). Calling the kernel runs the build of `isa()`:

        ROTARY = Kernel(HERE / "rotary_bf16.c", "rotary_bf16", "ppiiin", isas=("avx512", "avx2"))
        if ROTARY.available(): ROTARY(x, cos, rows, width, half, threads)
    """

    def __init__(self, source: Path, function: str, signature: str, *, isas: tuple[str, ...] = ("avx512",),
                 returns: str | None = None):
        unknown = set(signature) - set(_ARGUMENT_TYPES) or set(isas) - set(ISAS)
        if unknown:
            raise ValueError(f"unknown signature codes or instruction sets {sorted(unknown)}")
        self.source, self.function, self.signature, self.isas = Path(source), function, signature, tuple(isas)
        self._returns = _ARGUMENT_TYPES[returns] if returns else None
        self._entries: dict[str, object] = {}
        # (choice generation, the build this process runs, its bound function): resolved once per
        # ISA choice, since decode makes ~10 calls a layer.
        self._chosen: tuple[int, str | None, object] = (-1, None, None)
        self._pointers = tuple(i for i, code in enumerate(signature) if code == "p")

    def __repr__(self) -> str:
        return f"Kernel({self.source.name}:{self.function}, isas={self.isas})"

    def isa(self) -> str | None:
        """The build this process runs (the first of `isa_order()` the source has), or None."""
        return self._current()[1]

    def _current(self) -> tuple[int, str | None, object]:
        if self._chosen[0] != _choice_generation:
            chosen = next((isa for isa in isa_order() if isa in self.isas and self.entry(isa) is not None), None)
            self._chosen = (_choice_generation, chosen, self.entry(chosen) if chosen else None)
        return self._chosen

    def available(self) -> bool:
        return self.isa() is not None

    def isa_for(self, *widths: int) -> str | None:
        """The build to run over rows of these widths: `isa()`, but the AVX2 build where the avx512f
        one would run and a width is not a multiple of WIDE_FP32_CHANNELS. Decided by the shapes
        alone, so every call over them (decode, draft verification) takes the same build."""
        isa = self.isa()
        if isa == "avx512f" and any(width % WIDE_FP32_CHANNELS for width in widths):
            return "avx2"
        return isa

    def entry(self, isa: str):
        """The bound C function of the `isa` build, or None where it cannot run here."""
        if isa not in self._entries:
            library = _library(self.source, isa) if isa in self.isas else None
            entry = None
            if library is not None:
                entry = getattr(library, self.function)
                entry.argtypes = [_ARGUMENT_TYPES[code] for code in self.signature]
                entry.restype = self._returns
            self._entries[isa] = entry
        return self._entries[isa]

    def __call__(self, *args, isa: str | None = None):
        """Run the build of `isa` (default: `self.isa()`); tensors in pointer arguments pass their data
        pointers."""
        entry = self._current()[2] if isa is None else self.entry(isa)
        if entry is None:
            raise RuntimeError(f"{self!r} cannot run on this machine")
        if len(args) != len(self.signature):
            raise TypeError(f"{self.function} takes {len(self.signature)} arguments, got {len(args)}")
        values = list(args)
        for i in self._pointers:
            if isinstance(values[i], torch.Tensor):
                values[i] = values[i].data_ptr()
        return entry(*values)

    def build_all(self) -> dict[str, Path]:
        """Build every variant with the system compiler, whether or not this CPU runs it (a build
        check); raises as `build` does."""
        return {isa: build(self.source, isa) for isa in self.isas}


DENORMALS = Kernel(Path(__file__).with_name("denormals.c"), "set_flush_denormals", "nn", isas=("avx512", "avx2"))
