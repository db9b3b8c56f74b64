"""Loading a CPU model has the C allocator keep freed work buffers for reuse
(kernels.native.keep_freed_memory), so prefill chunks do not map fresh pages layer after layer."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# In a fresh process (the allocator's own state untouched by other tests): where blocks of a few
# sizes land once the settings are made. Without them glibc maps each apart from the heap.
PROBE = """
import ctypes, json, sys
sys.path.insert(0, sys.argv[1])
from kernels import native
kept = native.keep_freed_memory()
libc = ctypes.CDLL(None)
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
addresses = {mb: libc.malloc(mb << 20) for mb in (1, 8, 24, 31)}
heap = [line.split()[0] for line in open("/proc/self/maps") if line.rstrip().endswith("[heap]")]
low, high = (int(value, 16) for value in heap[0].split("-"))
print(json.dumps({"kept": kept, "in_heap": {mb: low <= at < high for mb, at in addresses.items()}}))
"""


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="needs Linux's /proc")
def test_blocks_up_to_32_mb_come_from_the_heap():
    result = json.loads(subprocess.run([sys.executable, "-c", PROBE, str(ROOT)], capture_output=True, text=True,
                                       check=True).stdout)
    if not result["kept"]:
        pytest.skip("the C library is not glibc")
    assert result["in_heap"] == {"1": True, "8": True, "24": True, "31": True}


def test_loading_a_cpu_model_keeps_freed_memory(monkeypatch, demo_checkpoint):
    import model.qwen3_next as qwen3_next
    from model import load_model

    calls = []
    monkeypatch.setattr(qwen3_next, "keep_freed_memory", lambda: calls.append(True) or True)
    load_model(demo_checkpoint)
    assert calls
