"""Chunked prefill and a streaming token iterator over a model state."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import torch

from .mtp import MtpCache, MtpRunner, mtp_block, state_mtp
from .qwen3_next import LanguageModel
from .sampling import SamplingParams
from .state import ModelState

DEFAULT_PREFILL_CHUNK = 2048
# Positions reserved past a prompt for the answer that follows it.
ANSWER_ROOM = 1024


@dataclass(frozen=True)
class PrefillProgress:
    done: int
    total: int
    elapsed_s: float

    @property
    def tokens_per_s(self) -> float:
        return self.done / self.elapsed_s if self.elapsed_s > 0 else 0.0

    @property
    def eta_s(self) -> float | None:
        rate = self.tokens_per_s
        return (self.total - self.done) / rate if rate > 0 else None


class Cancelled(Exception):
    """Raised inside prefill when the caller's cancel event is set."""


def prefill(lm: LanguageModel, state: ModelState, token_ids: Sequence[int] | torch.Tensor, *,
            chunk_size: int = DEFAULT_PREFILL_CHUNK,
            progress: Callable[[PrefillProgress], None] | None = None,
            cancel: threading.Event | None = None, mtp: MtpCache | None = None) -> torch.Tensor:
    """Feed a batch-1 prompt in chunks; returns the last position's logits `[vocab]`.

    Memory stays bounded by the chunk: logits exist only for one position and attention
    never sees more than `chunk_size` queries at once. The MTP cache (`mtp`, by default the one
    the state carries) follows every chunk, so after the prompt it holds what token-by-token
    processing would have put there, however the prompt was split or resumed.
    """
    ids = torch.as_tensor(token_ids, dtype=torch.long).reshape(1, -1)
    total = ids.shape[1]
    if total == 0:
        raise ValueError("prefill needs at least one token")
    # Room for the whole prompt and a typical answer up front: growing by doubling would copy the
    # K/V and hold old and new buffers at once, the peak of a long prefill. CPU states reserve
    # address space for the model's whole context once (pages cost memory only when written),
    # so neither this prompt nor any later one copies K/V to grow.
    state.reserve(state.seen_tokens + total + ANSWER_ROOM, address_space=lm.config.context_limit)
    started = time.perf_counter()
    mtp = mtp or state_mtp(lm, state)
    runner = MtpRunner(lm, mtp_block(lm)) if mtp is not None else None
    logits = None
    for start in range(0, total, chunk_size):
        if cancel is not None and cancel.is_set():
            raise Cancelled()
        chunk = ids[:, start:start + chunk_size]
        position, normed = state.seen_tokens, None
        if start + chunk_size < total:
            hidden = lm.hidden_states(chunk, state)  # only the last position's logits are wanted: no lm_head here
            if runner is not None:
                with torch.inference_mode():
                    normed = lm.module.model.norm(hidden)
        elif runner is not None:
            logits, normed = lm.forward(chunk, state, last_only=True, with_normed=True)
        else:
            logits = lm.forward(chunk, state, last_only=True)
        if runner is not None:
            runner.follow(mtp, normed, chunk, position)
        if progress is not None:
            progress(PrefillProgress(min(start + chunk_size, total), total, time.perf_counter() - started))
    return logits[0, -1]


@dataclass(frozen=True)
class TextDelta:
    """A piece of streamed text; `channel` is "answer" or "reasoning" (Thinking checkpoints)."""

    text: str
    channel: str
    token_id: int


@dataclass
class GenerationResult:
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    reasoning: str = ""
    finish_reason: str = ""
    prompt_tokens: int = 0
    time_to_first_token_s: float = 0.0
    decode_tokens_per_s: float = 0.0


@dataclass(frozen=True)
class GenerationSettings:
    sampling: SamplingParams = SamplingParams()
    max_new_tokens: int = 512
    stop_strings: tuple[str, ...] = ()
    thinking: bool = False
    prefill_chunk: int = DEFAULT_PREFILL_CHUNK


class Generation:
    """Iterate to stream `TextDelta`s; `result` is complete once iteration ends.

    The state is advanced in place by the prompt and by every generated token except the
    final stop token (which is sampled but never fed), so `state.seen_tokens` tells the
    caller exactly what the state contains; an MTP cache the state carries follows it too.
    """

    # Plain decoding is speculative decoding without drafts: one loop serves both.
    drafter = None
    draft_tokens = 0
    max_verify_tokens = 1

    def __init__(self, lm: LanguageModel, state: ModelState, prompt_ids: Sequence[int],
                 settings: GenerationSettings = GenerationSettings(), *,
                 progress: Callable[[PrefillProgress], None] | None = None,
                 cancel: threading.Event | None = None):
        self.lm, self.state, self.prompt_ids = lm, state, list(prompt_ids)
        self.settings, self.progress = settings, progress
        self.cancel = cancel or threading.Event()
        self.result = GenerationResult(prompt_tokens=len(self.prompt_ids))

    def __iter__(self) -> Iterator[TextDelta]:
        from .decoding import DecodeLoop  # builds on this module

        yield from DecodeLoop(self).run()

    def _append(self, text: str, channel: str, token: int) -> TextDelta | None:
        """Add streamed text to the result, cutting the answer at the first stop string."""
        result = self.result
        if channel == "reasoning":
            result.reasoning += text
            return TextDelta(text, channel, token)
        before = len(result.text)
        combined = result.text + text
        for stop in self.settings.stop_strings:
            at = combined.find(stop, max(0, before - len(stop) + 1))
            if at != -1:
                result.text = combined[:at]
                result.finish_reason = "stop"
                return TextDelta(result.text[before:], channel, token)
        result.text = combined
        return TextDelta(text, channel, token)

    def run(self) -> GenerationResult:
        for _ in self:
            pass
        return self.result
