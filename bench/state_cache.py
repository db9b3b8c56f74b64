"""State cache at the published 80B model's scale, without weights: restore and persistence costs.

    python bench/state_cache.py [--tokens 32768 131072 262144] [--quick] [--folder DIR]

Builds synthetic states with Qwen3-Next-80B-A3B's state shapes (36 Gated DeltaNet layers with
conv `[1, 8192, 3]` bf16 and recurrent `[1, 32, 128, 128]` fp32; 12 attention layers with K/V
`[1, 2, T, 256]` bf16: 24 KiB per token) and measures, per document length:

- memory_hit_s: a question's arrival to a state ready for its tokens, from the memory tier;
- disk_hit_s: the same from the disk tier with the files' pages dropped from the page cache
  (posix_fadvise DONTNEED), beside file_read_s, the time to read the files once, cold;
- disk_first_read_s / _gbps: touching every K/V byte of that restored state once (page-in);
- verify_s: until the background block check of the files has passed;
- turn_bytes_written vs turn_own_bytes: one finished turn (question + answer) on disk, against
  its own tokens' K/V plus the recurrent states;
- peak memory: the most anonymous + shared memory (memfds) held at once (`Peak`).

Prints JSON. `--quick` runs 2K and 8K tokens. A document is cut to leave room for the turn in the
262,144-token context (as the app requires). Run the 262K case alone: it holds ~6.4 GB.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import mmap
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from app.services.state_cache import StateCache  # noqa: E402
from model.state import AttentionLayerState, LinearLayerState, ModelState, empty_kv  # noqa: E402
from storage.repository import Storage  # noqa: E402

LAYERS = 48
ATTENTION_EVERY = 4  # layer i is full attention when (i + 1) % 4 == 0
KV_HEADS, HEAD_DIM = 2, 256
CONV_DIM, CONV_TAIL = 2 * 16 * 128 + 32 * 128, 3
VALUE_HEADS, KEY_DIM, VALUE_DIM = 32, 128, 128
CONTEXT = 262144
QUESTION_TOKENS, ANSWER_TOKENS = 64, 400
FINGERPRINT = "b" * 64
REPEATS = 5


class Peak:
    """Largest memory that cannot be reclaimed seen at the points `sample` is called: this
    process's anonymous pages plus the growth of the machine's shared memory (memfds are shared
    memory, resident whether mapped or not). Page cache of checkpoint files is not counted."""

    def __init__(self):
        self.shmem_base = _field(Path("/proc/meminfo"), "Shmem")
        self.bytes = 0

    def sample(self) -> None:
        anon = _field(Path("/proc/self/status"), "RssAnon")
        shmem = max(0, _field(Path("/proc/meminfo"), "Shmem") - self.shmem_base)
        self.bytes = max(self.bytes, anon + shmem)


def _field(path: Path, name: str) -> int:
    for line in path.read_text().splitlines():
        key, _, value = line.partition(":")
        if key == name:
            return int(value.split()[0]) * 1024
    return 0


def synthetic_state(tokens: int) -> ModelState:
    layers = []
    for index in range(LAYERS):
        if (index + 1) % ATTENTION_EVERY:
            layers.append(LinearLayerState(torch.full((1, CONV_DIM, CONV_TAIL), 0.5, dtype=torch.bfloat16),
                                           torch.full((1, VALUE_HEADS, KEY_DIM, VALUE_DIM), float(index))))
        else:
            layers.append(empty_kv(1, KV_HEADS, HEAD_DIM, torch.bfloat16, "cpu"))
    state = ModelState(layers, FINGERPRINT)
    state.reserve(tokens, address_space=CONTEXT)
    append(state, tokens, 0.0)
    return state


def append(state: ModelState, tokens: int, value: float) -> None:
    """Write `tokens` positions of K/V (a pattern per layer, cheap to make) as a forward would."""
    past = state.seen_tokens
    row = torch.linspace(-1, 1, HEAD_DIM, dtype=torch.bfloat16)
    for index, layer in enumerate(state.layers):
        if isinstance(layer, AttentionLayerState):
            layer.ensure_capacity(past + tokens)
            for tensor in (layer.key, layer.value):
                tensor[:, :, past:past + tokens] = row + (value + index)
        else:
            layer.recurrent.add_(1.0)
    state.seen_tokens = past + tokens


def kv_bytes_per_token() -> int:
    return (LAYERS // ATTENTION_EVERY) * 2 * KV_HEADS * HEAD_DIM * 2


def linear_bytes() -> int:
    per_layer = CONV_DIM * CONV_TAIL * 2 + VALUE_HEADS * KEY_DIM * VALUE_DIM * 4
    return (LAYERS - LAYERS // ATTENTION_EVERY) * per_layer


def drop_pages(paths: list[Path]) -> None:
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def resident_share(paths: list[Path]) -> float:
    """Share of the files' pages in the page cache (mincore), to show a cold start is cold."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p]
    resident = total = 0
    for path in paths:
        size = path.stat().st_size
        fd = os.open(path, os.O_RDONLY)
        try:
            address = libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
            pages = -(-size // mmap.PAGESIZE)
            vector = ctypes.create_string_buffer(pages)
            libc.mincore(address, size, vector)
            resident += sum(byte & 1 for byte in vector.raw)
            total += pages
            libc.munmap(address, size)
        finally:
            os.close(fd)
    return resident / total


def read_once(paths: list[Path]) -> float:
    """Seconds to read the files once from disk (pages dropped first)."""
    drop_pages(paths)
    buffer = bytearray(16 << 20)
    started = time.perf_counter()
    for path in paths:
        with path.open("rb", buffering=0) as handle:
            while handle.readinto(buffer):
                pass
    return time.perf_counter() - started


def touch_kv(state: ModelState) -> None:
    """Read every page of the live K/V once (one value per page: this times paging in, not math)."""
    used = state.seen_tokens
    per_page = 4096 // 2
    for layer in state.layers:
        if isinstance(layer, AttentionLayerState):
            for tensor in (layer.key, layer.value):
                for head in range(KV_HEADS):
                    tensor[0, head, :used].reshape(-1)[::per_page].float().sum()


def bench_length(requested: int, folder: Path, peak: Peak) -> dict:
    # The document and one turn after it must fit the model's context, as the app ensures.
    tokens = min(requested, CONTEXT - QUESTION_TOKENS - ANSWER_TOKENS)
    storage = Storage.open(folder / f"data-{tokens}", blob_budget_bytes=1 << 40)
    lm = SimpleNamespace(fingerprint=FINGERPRINT, device="cpu")
    cache = StateCache(lm, storage.blobs, memory_budget_bytes=1 << 40)
    try:
        state = synthetic_state(tokens)
        peak.sample()
        started = time.perf_counter()
        cache.put("document", state)
        checkpoint_s = time.perf_counter() - started
        del state
        gc.collect()
        peak.sample()

        memory_hits = []
        for _ in range(REPEATS):
            started = time.perf_counter()
            restored = cache.restore(["document", "question"])
            memory_hits.append(time.perf_counter() - started)
            assert restored.covered == 1 and restored.state.seen_tokens == tokens
            fork = restored.state
        peak.sample()

        # One finished turn: the question and the answer appended to the fork, then cached.
        append(fork, QUESTION_TOKENS + ANSWER_TOKENS, 0.25)
        cache.put("turn", fork)
        started = time.perf_counter()
        assert cache.flush()
        write_wait_s = time.perf_counter() - started
        peak.sample()
        infos = {info.key: info for info in storage.blobs.list_checkpoints()}
        paths = [infos["document"].path, infos["turn"].path]
        file_bytes = sum(info.size_bytes for info in infos.values())
        del fork, restored
        cache.clear_memory()
        gc.collect()

        file_read_s = read_once(paths)
        disk_hits, first_reads, verifies, cold = [], [], [], []
        for _ in range(3):
            fresh = StateCache(lm, storage.blobs, memory_budget_bytes=1 << 40)
            drop_pages(paths)
            cold.append(round(resident_share(paths), 4))
            started = time.perf_counter()
            restored = fresh.restore(["turn", "next question"])
            disk_hits.append(time.perf_counter() - started)
            assert restored.covered == 1 and restored.state.seen_tokens == tokens + QUESTION_TOKENS + ANSWER_TOKENS
            touch_kv(restored.state)
            first_reads.append(time.perf_counter() - started - disk_hits[-1])
            assert restored.verified()
            verifies.append(time.perf_counter() - started)
            peak.sample()
            del restored, fresh
            gc.collect()
        turn_tokens = QUESTION_TOKENS + ANSWER_TOKENS
        kv_file_bytes = (tokens + turn_tokens) * kv_bytes_per_token()
        return {
            "requested_tokens": requested,
            "tokens": tokens,
            "kv_gb": round(tokens * kv_bytes_per_token() / 1e9, 3),
            "checkpoint_put_s": round(checkpoint_s, 3),
            "memory_hit_s": round(statistics.median(memory_hits), 4),
            "memory_hit_max_s": round(max(memory_hits), 4),
            "background_write_wait_s": round(write_wait_s, 2),
            "file_bytes": file_bytes,
            "file_read_s": round(file_read_s, 3),
            "file_read_gbps": round(file_bytes / file_read_s / 1e9, 3),
            "disk_hit_s": round(statistics.median(disk_hits), 4),
            "disk_hit_max_s": round(max(disk_hits), 4),
            "disk_hit_resident_share_before": cold,
            "disk_first_read_runs_s": [round(t, 3) for t in first_reads],
            "disk_first_read_s": round(statistics.median(first_reads), 3),
            "disk_first_read_gbps": round(kv_file_bytes / statistics.median(first_reads) / 1e9, 3),
            "verify_s": round(statistics.median(verifies), 2),
            "turn_tokens": turn_tokens,
            "turn_bytes_written": infos["turn"].size_bytes,
            "turn_own_bytes": turn_tokens * kv_bytes_per_token() + linear_bytes(),
        }
    finally:
        storage.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, nargs="+", default=[32768, 131072, 262144])
    parser.add_argument("--quick", action="store_true", help="2K and 8K tokens")
    parser.add_argument("--folder", type=Path, help="where to write checkpoint files (default: a temporary folder)")
    args = parser.parse_args(argv)
    lengths = [2048, 8192] if args.quick else args.tokens
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    peak = Peak()
    results = []
    with tempfile.TemporaryDirectory(dir=args.folder) as folder:
        for tokens in lengths:
            results.append(bench_length(tokens, Path(folder), peak))
            print(json.dumps(results[-1]), file=sys.stderr, flush=True)
    print(json.dumps({"machine": f"{os.cpu_count()} CPUs", "lengths": results,
                      "peak_anon_shmem_gb": round(peak.bytes / 1e9, 2)}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
