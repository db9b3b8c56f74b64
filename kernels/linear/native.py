"""Builds and loads `small_m_bf16.c` with the system C compiler, once per source version.

The library lands in a per-user cache folder named by the source's hash, written to a temporary
name and renamed so parallel processes never load a half-written file. Anything missing (no
compiler, no AVX-512 BF16, a failed build) leaves `kernel()` returning None and callers keep
PyTorch's path; set DOCANALYST_NATIVE=0 to force that.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import shutil
import subprocess
import tempfile
import warnings
from pathlib import Path

import torch

SOURCE = Path(__file__).with_name("small_m_bf16.c")
FLAGS = ["-O3", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512bf16", "-fopenmp", "-shared", "-fPIC"]


def _cpu_has_avx512_bf16() -> bool:
    try:
        return "avx512_bf16" in Path("/proc/cpuinfo").read_text()
    except OSError:
        return False


def _cache_dir() -> Path:
    root = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(root) / "docanalyst" / "native"


def _build(compiler: str) -> Path:
    digest = hashlib.sha256(SOURCE.read_bytes() + " ".join([compiler, *FLAGS]).encode()).hexdigest()[:16]
    target = _cache_dir() / f"small_m_bf16-{digest}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        partial = Path(tmp) / target.name
        subprocess.run([compiler, *FLAGS, "-o", str(partial), str(SOURCE)], check=True, capture_output=True)
        os.replace(partial, target)
    return target


@functools.cache
def kernel():
    """The C function `linear_small_m_bf16`, or None where it cannot run here."""
    if os.environ.get("DOCANALYST_NATIVE", "1") == "0" or not _cpu_has_avx512_bf16():
        return None
    compiler = shutil.which(os.environ.get("CC", "cc"))
    if compiler is None:
        return None
    try:
        # torch is imported first, so the library's libgomp.so.1 resolves to the OpenMP runtime
        # torch already loaded and both share one thread pool.
        library = ctypes.CDLL(str(_build(compiler)))
    except (OSError, subprocess.CalledProcessError) as error:
        warnings.warn(f"native bf16 linear kernel unavailable, using PyTorch's: {error}", stacklevel=2)
        return None
    function = library.linear_small_m_bf16
    i64 = ctypes.c_int64
    function.argtypes = [ctypes.c_void_p, i64, i64, ctypes.c_void_p, i64, i64, i64, ctypes.c_void_p, i64,
                         ctypes.c_int, ctypes.c_int]
    function.restype = None
    return function


def linear_small_m(x: torch.Tensor, weight: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    """x `[M, K]` bf16 with unit column stride, weight `[N, K]` bf16 contiguous -> `[M, N]` out_dtype
    (bf16 or fp32). The caller checks `kernel()` is not None."""
    rows, depth = x.shape
    out = torch.empty(rows, weight.shape[0], dtype=out_dtype)
    kernel()(x.data_ptr(), x.stride(0), rows, weight.data_ptr(), weight.stride(0), weight.shape[0], depth,
             out.data_ptr(), out.shape[1], int(out_dtype == torch.float32), torch.get_num_threads())
    return out
