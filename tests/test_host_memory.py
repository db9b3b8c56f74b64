"""How a CPU model's memory is held: the C allocator keeps freed work buffers for reuse
(kernels.native.keep_freed_memory), so prefill chunks do not map fresh pages layer after layer, and
the weights' buffers ask for huge pages (kernels.native.back_with_huge_pages)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from kernels import native

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
@pytest.mark.host_process
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


def vm_flags(address: int) -> list[str]:
    """The flags /proc/self/smaps lists for the mapping holding `address`."""
    inside = False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        fields = line.split()
        if "-" in fields[0] and len(fields) >= 5:
            low, high = (int(value, 16) for value in fields[0].split("-"))
            inside = low <= address < high
        elif inside and fields[0] == "VmFlags:":
            return fields[1:]
    raise AssertionError(f"no mapping holds {address:#x}")


def huge_pages_advisable() -> bool:
    return Path("/proc/self/smaps").exists() and Path("/sys/kernel/mm/transparent_hugepage/enabled").exists()


@pytest.mark.host_process
@pytest.mark.skipif(not huge_pages_advisable(), reason="needs Linux with transparent huge pages")
def test_a_large_buffer_is_advised_over_its_whole_huge_pages(monkeypatch):
    monkeypatch.delenv("DOCANALYST_HUGE_PAGES", raising=False)
    buffer = torch.empty(5 * native.HUGE_PAGE_BYTES + 12_345, dtype=torch.uint8)
    assert native.back_with_huge_pages(buffer)
    start = buffer.data_ptr()
    first = -(-start // native.HUGE_PAGE_BYTES) * native.HUGE_PAGE_BYTES
    last = (start + buffer.numel()) // native.HUGE_PAGE_BYTES * native.HUGE_PAGE_BYTES
    assert "hg" in vm_flags(first) and "hg" in vm_flags(last - 1)
    buffer.fill_(7)  # the memory stays ordinary memory
    assert int(buffer[first - start]) == 7 and int(buffer[-1]) == 7


@pytest.mark.parametrize("size", [0, 1, 100_000, native.HUGE_PAGE_BYTES - 1], ids=lambda s: f"{s}B")
def test_a_buffer_without_a_whole_huge_page_is_left_alone(size):
    assert not native.back_with_huge_pages(torch.empty(size, dtype=torch.uint8)[:size])


def test_huge_pages_can_be_switched_off(monkeypatch):
    monkeypatch.setenv("DOCANALYST_HUGE_PAGES", "0")
    assert not native.back_with_huge_pages(torch.empty(5 * native.HUGE_PAGE_BYTES, dtype=torch.uint8))


def assert_every_weight_advised(lm, advised: set[int]) -> None:
    """Every tensor of the model (the MTP block's before and after it is built) lies in a buffer that
    back_with_huge_pages was asked about: the loader's own copies, not views of the file."""
    from kernels.quant import QuantizedRows, QuantizedWeight
    from model.mtp import mtp_block
    from model.quantization import quantized_weights

    def held(values) -> list[torch.Tensor]:
        parts = [p for v in values for p in (v.parts if isinstance(v, QuantizedRows) else (v,))]
        return [t for p in parts for t in ((p.data, p.scale) if isinstance(p, QuantizedWeight) else (p,))]

    tensors = held(lm.extra_tensors.values())
    assert tensors
    for module in (lm.module, mtp_block(lm)):
        tensors += held([*module.parameters(), *quantized_weights(module)])
    assert all(t.untyped_storage().data_ptr() in advised for t in tensors)


@pytest.fixture
def advised(monkeypatch) -> set[int]:
    import model.loader as loader

    seen: set[int] = set()
    monkeypatch.setattr(loader.native_kernels, "back_with_huge_pages",
                        lambda tensor: seen.add(tensor.untyped_storage().data_ptr()) or True)
    return seen


@pytest.mark.parametrize("family,weights", [("qwen3_next", None), ("qwen3_next", "int4"), ("qwen3_5", "int8")])
def test_every_weight_of_a_loaded_model_lies_in_an_advised_buffer(advised, tmp_path, family, weights):
    from model import load_model
    from model.demo import write_demo_checkpoint

    folder = write_demo_checkpoint(tmp_path / "ckpt", seed=0, family=family)
    assert_every_weight_advised(load_model(folder, weights=weights), advised)


@pytest.mark.parametrize("weights", ["int8", "int4"])
def test_a_quantized_folder_is_copied_out_of_its_files(advised, demo_checkpoint, tmp_path, weights):
    from model import load_model
    from model.quantize import quantize_checkpoint

    quantize_checkpoint(demo_checkpoint, tmp_path / "q", weights)
    assert_every_weight_advised(load_model(tmp_path / "q"), advised)
