"""Decode tokens/s with and without MTP speculative decoding, on a random-weight checkpoint.

    python bench/mtp.py [--model demo|bench] [--dtype bf16|fp32] [--threads 1] [--draft-tokens 1 2 3]

Cases, all greedy from the same prompt and checked token for token against plain decoding:
plain `Generation`; the checkpoint's MTP block (random weights, so its drafts are almost never
accepted: this is the overhead of drafting and rolling back); an oracle drafter proposing the
tokens plain decoding produces (every draft accepted: the best case of the verification path);
and oracles that are right with a given probability per draft, with rollbacks deferred into the
next verification (default) or re-fed at once. Decode rates exclude the prompt. Each case runs
`--repeats` times, interleaved with the others; the median is reported. Prints JSON.
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from model import Generation, GenerationSettings, load_model  # noqa: E402
from model.demo import write_demo_checkpoint  # noqa: E402
from model.mtp import MtpRunner, mtp_block, new_mtp_cache  # noqa: E402
from model.speculative import Drafter, SpeculativeGeneration, snapshot_linear_layers  # noqa: E402

BENCH_CONFIG = ROOT.parent / "shared" / "reference" / "bench-config.json"
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


class OracleDrafter(Drafter):
    """Proposes the known answer's tokens (by absolute position); each draft is right with
    probability `accuracy`, otherwise replaced by a wrong token."""

    def __init__(self, sequence: list[int], accuracy: float = 1.0, seed: int = 0):
        self.sequence, self.accuracy = sequence, accuracy
        self.random = random.Random(seed)

    def draft(self, hidden, tokens, position, count, pick):
        first = position + len(tokens) + 1
        drafts = []
        for at in range(first, min(first + count, len(self.sequence))):
            token = self.sequence[at]
            drafts.append(token if self.random.random() < self.accuracy else (token + 1) % 151936)
        return drafts, None


def run_case(lm, prompt: list[int], settings: GenerationSettings, expected: list[int] | None,
             draft_tokens: int = 0, drafter: Drafter | None = None, max_verify_tokens: int | None = None) -> dict:
    state = lm.new_state()
    if draft_tokens:
        generation = SpeculativeGeneration(lm, state, prompt, settings, draft_tokens=draft_tokens, drafter=drafter,
                                           max_verify_tokens=max_verify_tokens)
    else:
        generation = Generation(lm, state, prompt, settings)
    result = generation.run()
    row = {"tokens_per_s": result.decode_tokens_per_s, "token_ids": result.token_ids}
    if expected is not None:
        row["same_tokens_as_plain"] = result.token_ids == expected
    speculation = getattr(result, "speculation", None)
    if speculation is not None:
        row["acceptance"] = speculation.as_dict()
    return row


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=("demo", "bench"), default="demo",
                        help="demo: the demo checkpoint; bench: ../shared/reference/bench-config.json")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--prompt-tokens", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=40)
    parser.add_argument("--draft-tokens", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--accuracies", type=float, nargs="+", default=[0.8, 0.5],
                        help="per-draft accuracy of the imperfect oracles (run with 2 drafts)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--context", type=int, default=2048, help="prompt length for the component timings")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    overrides = json.loads(BENCH_CONFIG.read_text()) if args.model == "bench" else None
    with tempfile.TemporaryDirectory() as tmp:
        folder = write_demo_checkpoint(Path(tmp) / "ckpt", config_overrides=overrides)
        report = measure(load_model(folder, dtype=DTYPES[args.dtype]), args)
    print(json.dumps(report, indent=2))
    return 0


def median_ms(fn, setup=None, repeats: int = 9) -> float:
    """Median wall time of `fn(setup())` in ms (setup untimed)."""
    times = []
    for _ in range(repeats):
        argument = setup() if setup is not None else None
        started = time.perf_counter()
        fn(argument)
        times.append(time.perf_counter() - started)
    return round(statistics.median(times) * 1000, 3)


@torch.inference_mode()
def components(lm, args: argparse.Namespace) -> dict:
    generator = torch.Generator().manual_seed(1)
    state = lm.new_state()
    lm.forward(torch.randint(0, 151000, (1, args.context), generator=generator), state, last_only=True)
    norm, head = lm.module.model.norm, lm.module.lm_head

    def step(tokens: int):
        ids = torch.randint(0, 151000, (1, tokens), generator=generator)

        def run(copy):
            hidden = norm(lm.hidden_states(ids, copy))[0]
            return head.weight @ hidden.T

        return run

    def plain_step(copy):
        lm.forward(torch.tensor([[7]]), copy, last_only=True)

    # Logits as the verification computes them (`W @ h.T`), for every T; plus a plain decode step.
    forward = {t: median_ms(step(t), state.clone) for t in range(1, 2 * max(args.draft_tokens) + 2)}
    plain_ms = median_ms(plain_step, state.clone)
    rows = torch.randn(3, lm.config.hidden_size, generator=generator).to(lm.dtype)
    result = {
        "context_tokens": args.context,
        "plain_decode_step_ms": plain_ms,
        "forward_with_logits_ms": forward,
        "lm_head_3_rows_linear_ms": median_ms(lambda _: torch.nn.functional.linear(rows, head.weight)),
        "lm_head_3_rows_weight_matmul_ms": median_ms(lambda _: head.weight @ rows.T),
        "rollback_point_linear_layers_copy_ms": median_ms(lambda _: snapshot_linear_layers(state)),
        "rollback_point_state_clone_ms": median_ms(lambda _: state.clone()),
        "state_bytes": state.nbytes(),
    }
    block = mtp_block(lm)
    if block is not None:
        runner = MtpRunner(lm, block)
        cache = new_mtp_cache(lm, position=args.context)
        hidden = torch.randn(1, 1, lm.config.hidden_size, generator=generator).to(lm.dtype)

        def draft(_):
            runner.logits(runner.extend(cache, hidden, torch.tensor([[7]]), args.context))

        result["mtp_draft_ms"] = median_ms(draft)
    return result


def measure(lm, args: argparse.Namespace) -> dict:
    generator = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, 151000, (args.prompt_tokens,), generator=generator).tolist()
    settings = GenerationSettings(max_new_tokens=args.new_tokens)

    expected = run_case(lm, prompt, settings, None)["token_ids"]
    oracle_sequence = prompt + expected
    cases: dict[str, dict] = {"plain": {}}
    for k in args.draft_tokens:
        cases[f"mtp_k{k}"] = {"draft_tokens": k}
        cases[f"oracle_k{k}"] = {"draft_tokens": k, "oracle": 1.0}
    for accuracy in args.accuracies:
        cases[f"oracle{accuracy}_k2_deferred"] = {"draft_tokens": 2, "oracle": accuracy}
        cases[f"oracle{accuracy}_k2_eager"] = {"draft_tokens": 2, "oracle": accuracy, "max_verify_tokens": 3}
    rows: dict[str, list[dict]] = {name: [] for name in cases}
    for repeat in range(args.repeats):
        for name, case in cases.items():
            drafter = OracleDrafter(oracle_sequence, case["oracle"], seed=repeat) if "oracle" in case else None
            row = run_case(lm, prompt, settings, expected, case.get("draft_tokens", 0), drafter,
                           case.get("max_verify_tokens"))
            rows[name].append(row)
            print(json.dumps({"case": name, "repeat": repeat, "tokens_per_s": round(row["tokens_per_s"], 2)}),
                  file=sys.stderr, flush=True)

    plain_rate = statistics.median(r["tokens_per_s"] for r in rows["plain"])
    report = {
        "machine": platform.processor() or platform.machine(), "threads": args.threads, "dtype": args.dtype,
        "model": args.model, "prompt_tokens": args.prompt_tokens, "new_tokens": args.new_tokens,
        "repeats": args.repeats, "cases": {},
    }
    for name, runs in rows.items():
        rate = statistics.median(r["tokens_per_s"] for r in runs)
        entry = {"tokens_per_s": round(rate, 2), "speedup": round(rate / plain_rate, 2),
                 "all_runs_tokens_per_s": [round(r["tokens_per_s"], 2) for r in runs]}
        if name != "plain":
            entry["same_tokens_as_plain"] = all(r["same_tokens_as_plain"] for r in runs)
            entry["acceptance"] = runs[-1].get("acceptance")
        report["cases"][name] = entry
    report["components"] = components(lm, args)
    return report


if __name__ == "__main__":
    raise SystemExit(main())
