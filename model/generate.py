"""Command line: stream a completion from a checkpoint folder.

    python -m model.generate --model DIR --prompt-file F [--weights int8|int4] [--max-new-tokens N] [--temperature T]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from .demo import DEMO_NOTICE, is_demo_checkpoint
from .generation import Generation, GenerationSettings
from .loader import LoadError, load_model
from .quantization import WEIGHT_CHOICES
from .sampling import SamplingParams

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Stream a Qwen3-Next completion for a prompt file.")
    parser.add_argument("--model", type=Path, required=True, help="Hugging Face checkpoint folder")
    parser.add_argument("--prompt-file", type=Path, required=True, help="UTF-8 text; '-' reads stdin")
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--top-k", type=int, default=0)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--raw", action="store_true", help="feed the text as is, without the chat template")
    parser.add_argument("--thinking", action="store_true", help="the checkpoint is a Thinking variant")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="compute precision")
    parser.add_argument("--weights", choices=WEIGHT_CHOICES, default=None,
                        help="hold weights in bf16, or quantize them to int8/int4 while loading "
                             "(default: as the checkpoint stores them; FP8 stays FP8)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    text = sys.stdin.read() if str(args.prompt_file) == "-" else args.prompt_file.read_text(encoding="utf-8")
    try:
        lm = load_model(args.model, device=args.device, dtype=DTYPES.get(args.dtype), weights=args.weights)
    except LoadError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if is_demo_checkpoint(args.model):
        print(DEMO_NOTICE, file=sys.stderr)
    tok = lm.tokenizer
    ids = tok.encode(text) if args.raw else tok.turn("user", text) + tok.generation_prompt()
    sampling = SamplingParams(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, seed=args.seed)
    settings = GenerationSettings(sampling=sampling, max_new_tokens=args.max_new_tokens, thinking=args.thinking)
    started = time.perf_counter()
    generation = Generation(lm, lm.new_state(), ids, settings)
    try:
        for delta in generation:
            print(delta.text, end="", flush=True)
    except KeyboardInterrupt:
        generation.cancel.set()
    result = generation.result
    print(file=sys.stderr)
    print(
        f"[{len(ids)} prompt tokens, {len(result.token_ids)} generated, time to first token "
        f"{result.time_to_first_token_s:.2f} s, {result.decode_tokens_per_s:.1f} tokens/s, "
        f"total {time.perf_counter() - started:.1f} s, finish: {result.finish_reason}]",
        file=sys.stderr,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
