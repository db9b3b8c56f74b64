"""Cold versus cached time to first token for a follow-up question over a long document.

    python bench/followup.py [--tokens 8192 32768] [--model DIR]

Uses the CPU benchmark model (../shared/reference/bench-config.json, random weights) unless a
model folder is given. For each document length it asks a question cold (empty cache), then a
follow-up in the same chat session (restored from the checkpoint after the first turn), and checks
that the follow-up answer equals the one computed from scratch. Prints JSON.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from app.services.analysis import AnalysisService  # noqa: E402
from model import load_model  # noqa: E402
from model.demo import write_demo_checkpoint  # noqa: E402
from storage.repository import Storage  # noqa: E402

BENCH_CONFIG = ROOT.parent / "shared" / "reference" / "bench-config.json"
WORDS = ("agreement supplier delivery invoice payment clause party term notice liability warranty revenue "
         "dividend board quarter report schedule obligation penalty month year amount units price").split()


def synthetic_document(tokenizer, target_tokens: int, seed: int) -> SimpleNamespace:
    rng = random.Random(seed)
    pages, tokens = [], 0
    while tokens < target_tokens:
        sentences = [" ".join(rng.choice(WORDS) for _ in range(12)).capitalize() + f" {rng.randint(1, 9999)}."
                     for _ in range(40)]
        page = " ".join(sentences)
        pages.append(page)
        tokens += len(tokenizer.encode(page)) + 5
    units, text, offset = [], "", 0
    for number, page in enumerate(pages, start=1):
        if text:
            text, offset = text + "\n\n", offset + 2
        units.append(SimpleNamespace(number=number, label=f"page {number}", text=page, start=offset,
                                     end=offset + len(page)))
        text, offset = text + page, offset + len(page)
    sha = f"{seed:064x}"
    return SimpleNamespace(title=f"Report {seed}", kind="pdf", units=tuple(units), text=text, sha256=sha,
                           size=len(text), metadata={})


def timed_answer(service, session_id, question):
    started = time.perf_counter()
    first = None
    for event in service.ask(session_id, question):
        if event.kind == "delta" and first is None:
            first = time.perf_counter() - started
        if event.kind == "done":
            return event.message, first if first is not None else time.perf_counter() - started


def measure(lm, data_dir: Path, target_tokens: int, max_new_tokens: int) -> dict:
    storage = Storage.open(data_dir / f"t{target_tokens}")
    try:
        document = synthetic_document(lm.tokenizer, target_tokens, seed=target_tokens)
        info, _ = storage.documents.add_document(document, "report.pdf")
        cached = AnalysisService(lm, storage.documents, storage.chats, storage.summaries, storage.blobs,
                                 max_new_tokens=max_new_tokens)
        session = storage.chats.create_session("bench", [info.id]).id
        cold_message, cold_ttft = timed_answer(cached, session, "What does the report say about payment?")
        follow_message, follow_ttft = timed_answer(cached, session, "And about the dividend?")

        scratch = AnalysisService(lm, storage.documents, storage.chats, storage.summaries, None,
                                  memory_budget_bytes=0, max_new_tokens=max_new_tokens)
        reference_session = storage.chats.create_session("reference", [info.id]).id
        reference_first, _ = timed_answer(scratch, reference_session, "What does the report say about payment?")
        reference_follow, _ = timed_answer(scratch, reference_session, "And about the dividend?")
        return {
            "document_tokens": cached.selection_tokens([info.id]),
            "cold_ttft_s": round(cold_ttft, 3),
            "cached_followup_ttft_s": round(follow_ttft, 4),
            "speedup": round(cold_ttft / follow_ttft, 1),
            "followup_cached_tokens": follow_message.stats.cached_tokens,
            "followup_prefill_tokens": follow_message.stats.prefill_tokens,
            "answers_identical": (cold_message.text, follow_message.text)
            == (reference_first.text, reference_follow.text),
        }
    finally:
        storage.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, nargs="+", default=[8192, 32768])
    parser.add_argument("--model", type=Path, default=None)
    parser.add_argument("--max-new-tokens", type=int, default=8)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        folder = args.model
        if folder is None:
            folder = Path(tmp) / "bench-model"
            write_demo_checkpoint(folder, config_overrides=json.loads(BENCH_CONFIG.read_text()))
        lm = load_model(folder)
        results = [measure(lm, Path(tmp), n, args.max_new_tokens) for n in args.tokens]
    print(json.dumps({"model": "bench-config (random weights)" if args.model is None else str(args.model),
                      "dtype": str(lm.dtype), "threads": torch.get_num_threads(), "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
