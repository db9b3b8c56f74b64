"""Speculative decoding: draft k tokens with the MTP block, verify them with one main-model forward.

Each step feeds `[pending..., d_1..d_k]` through the main model once (`pending` ends with the
last emitted token; it holds more only after a rollback, see below). Verification row i gives the
model's distribution for the token after it. Greedy decoding accepts drafts while they equal the
model's argmax; sampling uses the speculative-sampling rule (accept d with probability
min(1, p(d)/q(d)), otherwise draw from norm(max(0, p - q))), so the output distribution is the
model's own. The model's token after the last accepted draft is always emitted too.

Rollback after a rejection: attention layers only need `seen_tokens` reset (K/V past it are
ignored and overwritten). Gated DeltaNet layers fold every token into a fixed-size state, so the
conv and recurrent tensors of the linear layers (not the attention K/V) are copied before
verification and put back. The accepted tokens are then not re-fed at once: they stay in
`pending` and lead the next verification forward, which is nearly free on a memory-bound decode;
when `pending` would make a verification longer than `max_verify_tokens`, they are fed at once.

The MTP block keeps its own K/V (in `SpeculativeState.mtp`, or a private cache for a plain
state); it is extended only with pairs whose tokens are final, so it never needs a rollback.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import torch

from kernels.linear import uses_native
from kernels.native import FEW_TOKENS

from .generation import (
    Cancelled,
    Generation,
    GenerationResult,
    GenerationSettings,
    PrefillProgress,
    TextDelta,
)
from .mtp import MtpCache, MtpRunner, SpeculativeState, mtp_block, new_mtp_cache
from .qwen3_next import LanguageModel
from .sampling import Sampler
from .state import LinearLayerState, ModelState

# A forward over at most this many tokens rounds each row as a one-token step does, where the
# row-independent kernels run (bf16 on CPU): linear layers, attention and the recurrent delta rule.
EXACT_VERIFY_ROWS = FEW_TOKENS

DEFAULT_DRAFT_TOKENS = 2
_DEFAULT_SETTINGS = GenerationSettings()

# (logits `[V]`, drafts chosen so far in this chain) -> (token, its draft distribution `[V]` or None).
Pick = Callable[[torch.Tensor, list[int]], tuple[int, torch.Tensor | None]]


@dataclass
class AcceptanceStats:
    """Per answer: how many drafts were proposed and accepted, overall and by draft position."""

    draft_tokens: int
    steps: int = 0
    proposed: int = 0
    accepted: int = 0
    proposed_at: list[int] = field(default_factory=list)
    accepted_at: list[int] = field(default_factory=list)

    def __post_init__(self):
        self.proposed_at = self.proposed_at or [0] * self.draft_tokens
        self.accepted_at = self.accepted_at or [0] * self.draft_tokens

    def record(self, proposed: int, accepted: int) -> None:
        """One verification step that checked `proposed` drafts and accepted the first `accepted`."""
        self.steps += 1
        self.proposed += proposed
        self.accepted += accepted
        for position in range(proposed):
            self.proposed_at[position] += 1
            self.accepted_at[position] += position < accepted

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.proposed if self.proposed else 0.0

    @property
    def mean_accepted_per_step(self) -> float:
        """Accepted drafts per verification step."""
        return self.accepted / self.steps if self.steps else 0.0

    @property
    def mean_tokens_per_step(self) -> float:
        """Tokens each verification forward produced: accepted drafts plus the model's own token."""
        return (self.accepted + self.steps) / self.steps if self.steps else 0.0

    @property
    def acceptance_rate_at(self) -> list[float]:
        """Per draft position: accepted / proposed (position 0 is the first draft)."""
        return [a / p if p else 0.0 for a, p in zip(self.accepted_at, self.proposed_at, strict=True)]

    def as_dict(self) -> dict:
        return {
            "draft_tokens": self.draft_tokens, "steps": self.steps, "proposed": self.proposed,
            "accepted": self.accepted, "acceptance_rate": round(self.acceptance_rate, 4),
            "mean_accepted_per_step": round(self.mean_accepted_per_step, 4),
            "mean_tokens_per_step": round(self.mean_tokens_per_step, 4),
            "acceptance_rate_at": [round(r, 4) for r in self.acceptance_rate_at],
        }


@dataclass
class SpeculativeResult(GenerationResult):
    """`GenerationResult` plus acceptance statistics (None when speculation was off)."""

    speculation: AcceptanceStats | None = None


def accept_draft(p: torch.Tensor, q: torch.Tensor | None, token: int, generator: torch.Generator) -> bool:
    """Accept `token` (drawn from q) with probability min(1, p(token) / q(token)).

    p, q: `[V]` probabilities; q None means the draft was deterministic (q is one-hot on token).
    """
    p_x = float(p[token])
    q_x = 1.0 if q is None else float(q[token])
    if p_x >= q_x:
        return True
    if p_x <= 0.0:
        return False
    return float(torch.rand((), generator=generator, device=p.device)) * q_x < p_x


def residual_distribution(p: torch.Tensor, q: torch.Tensor | None, token: int) -> torch.Tensor:
    """norm(max(0, p - q)) `[V]`: what to draw from after rejecting `token`."""
    if q is None:
        residual = p.clone()
        residual[token] = 0.0
    else:
        residual = (p - q).clamp_min(0.0)
    total = residual.sum()
    # Only rounding can empty it (a rejection needs p(token) < q(token), so p != q).
    return residual / total if total > 0 else p


def verify_sampled(drafts: Sequence[int], target: Callable[[int], torch.Tensor], draft_probs: torch.Tensor | None,
                   generator: torch.Generator) -> tuple[int, int]:
    """Speculative sampling over a chain of drafts.

    drafts: k tokens; target(i): the model's distribution `[V]` after draft i-1 (i = 0..k), asked
    for lazily; draft_probs: `[k, V]` distributions the drafts were drawn from (None: one-hot).
    Returns (number of drafts accepted, the token emitted after them).
    """
    for index, token in enumerate(drafts):
        p = target(index)
        q = None if draft_probs is None else draft_probs[index]
        if not accept_draft(p, q, token, generator):
            return index, int(torch.multinomial(residual_distribution(p, q, token), 1, generator=generator))
    return len(drafts), int(torch.multinomial(target(len(drafts)), 1, generator=generator))


class Drafter:
    """Proposes draft tokens. This base class proposes none; subclasses override `draft`.

    Positions are absolute. A pair (hidden at position t, token at t + 1) is what the MTP block
    consumes; `draft` gets the pairs whose tokens are final, in order and without gaps within one
    answer, then proposes tokens for the positions after the newest token.
    """

    def start(self, lm: LanguageModel, state: ModelState) -> torch.Tensor | None:
        """Called before the prompt is fed; returns the final-normed hidden `[B, H]` at position
        `state.seen_tokens - 1` if the state kept it (the first pair then includes it)."""
        return None

    def draft(self, hidden: torch.Tensor, tokens: Sequence[int], position: int, count: int,
              pick: Pick) -> tuple[list[int], torch.Tensor | None]:
        """hidden `[T, H]` final-normed main hidden states at positions `position..position+T-1`;
        tokens: the T tokens that followed them. Returns up to `count` drafts for the positions after
        `position + T` and their draft distributions `[n, V]` (None when chosen deterministically)."""
        return [], None

    def finish(self, state: ModelState, hidden: torch.Tensor | None) -> None:
        """The answer is over and `state` holds exactly what it should; `hidden` `[B, H]` is the
        final-normed hidden at position `state.seen_tokens - 1`."""


class MtpDrafter(Drafter):
    """Drafts with the checkpoint's MTP block; its K/V cache lives in the state when it can."""

    def __init__(self, lm: LanguageModel, block):
        self.runner = MtpRunner(lm, block)
        self.cache: MtpCache | None = None

    def start(self, lm: LanguageModel, state: ModelState) -> torch.Tensor | None:
        seen = state.seen_tokens
        cache = state.mtp if isinstance(state, SpeculativeState) else None
        if cache is None:
            cache = new_mtp_cache(lm, state.batch_size, seen)
            if isinstance(state, SpeculativeState):
                state.mtp = cache
        self.cache = cache
        if cache.hidden is not None and cache.hidden_position == seen - 1:
            return cache.hidden
        return None

    def draft(self, hidden: torch.Tensor, tokens: Sequence[int], position: int, count: int,
              pick: Pick) -> tuple[list[int], torch.Tensor | None]:
        cache, runner = self.cache, self.runner
        ids = torch.tensor([list(tokens)], dtype=torch.long)
        out = runner.extend(cache, hidden[None], ids, position)[:, -1:]
        committed = cache.length, cache.next_position
        drafts: list[int] = []
        probs: list[torch.Tensor | None] = []
        for index in range(count):
            token, q = pick(runner.logits(out)[0, -1], drafts)
            drafts.append(token)
            probs.append(q)
            if index + 1 < count:
                # Later drafts feed the block's own output back, one position further on.
                out = runner.extend(cache, out, torch.tensor([[token]]), cache.next_position)
        # Entries written for the drafts are speculative; the next call overwrites them.
        cache.length, cache.next_position = committed
        stacked = torch.stack(probs) if probs and probs[0] is not None else None
        return drafts, stacked

    def finish(self, state: ModelState, hidden: torch.Tensor | None) -> None:
        cache = self.cache
        cache.truncate_from(state.seen_tokens - 1)
        cache.hidden = None if hidden is None else hidden.clone()
        cache.hidden_position = state.seen_tokens - 1 if hidden is not None else -1


def default_drafter(lm: LanguageModel) -> Drafter | None:
    """The MTP drafter, or None when the checkpoint has no MTP block."""
    block = mtp_block(lm)
    return None if block is None else MtpDrafter(lm, block)


def snapshot_linear_layers(state: ModelState) -> list[tuple[LinearLayerState, torch.Tensor, torch.Tensor]]:
    """Copies of every Gated DeltaNet layer's conv and recurrent state (attention K/V need none)."""
    return [(layer, layer.conv.clone(), layer.recurrent.clone())
            for layer in state.layers if isinstance(layer, LinearLayerState)]


def restore_linear_layers(state: ModelState, snapshot: list[tuple[LinearLayerState, torch.Tensor, torch.Tensor]],
                          seen_tokens: int) -> None:
    """Put a snapshot back and truncate attention to `seen_tokens` (the snapshot is used up)."""
    for layer, conv, recurrent in snapshot:
        layer.conv, layer.recurrent = conv, recurrent
    state.seen_tokens = seen_tokens


class SpeculativeGeneration(Generation):
    """`Generation` with speculative decoding; same iteration, stop handling and state contract.

    Iterate to stream `TextDelta`s; `result` (a `SpeculativeResult`) is complete once iteration
    ends and carries acceptance statistics. Without a drafter (a checkpoint without `mtp.*`
    tensors) or with `draft_tokens=0` it decodes exactly like `Generation`.

    Pass a `SpeculativeState` to keep the MTP layer's K/V with the state (so a saved and
    restored conversation drafts with full context); a plain `ModelState` works too, with the MTP
    cache starting at its current position.
    """

    def __init__(self, lm: LanguageModel, state: ModelState, prompt_ids: Sequence[int],
                 settings: GenerationSettings = _DEFAULT_SETTINGS, *,
                 draft_tokens: int = DEFAULT_DRAFT_TOKENS, drafter: Drafter | None = None,
                 max_verify_tokens: int | None = None,
                 progress: Callable[[PrefillProgress], None] | None = None,
                 cancel: threading.Event | None = None):
        super().__init__(lm, state, prompt_ids, settings, progress=progress, cancel=cancel)
        if draft_tokens < 0:
            raise ValueError("draft_tokens must be >= 0")
        self.drafter = (drafter or default_drafter(lm)) if draft_tokens else None
        self.draft_tokens = draft_tokens if self.drafter is not None else 0
        # One deferred rollback fits by default: pending (<= k + 1) plus k drafts, kept within the
        # rows for which a forward reproduces one-token steps bit for bit (bf16 on CPU).
        self.max_verify_tokens = max_verify_tokens or max(
            min(2 * self.draft_tokens + 1, EXACT_VERIFY_ROWS), self.draft_tokens + 1)
        if self.max_verify_tokens < self.draft_tokens + 1:
            raise ValueError("max_verify_tokens must be at least draft_tokens + 1")
        self.result = SpeculativeResult(
            prompt_tokens=len(self.prompt_ids),
            speculation=AcceptanceStats(self.draft_tokens) if self.drafter is not None else None,
        )

    def __iter__(self) -> Iterator[TextDelta]:
        if self.drafter is None:
            yield from super().__iter__()
            return
        yield from _SpeculativeRun(self).run()


class _SpeculativeRun:
    """The decode loop of one `SpeculativeGeneration` (kept apart to keep its bookkeeping local)."""

    def __init__(self, generation: SpeculativeGeneration):
        self.gen = generation
        self.lm, self.state, self.drafter = generation.lm, generation.state, generation.drafter
        self.k = generation.draft_tokens
        self.settings, self.result = generation.settings, generation.result
        self.stats: AcceptanceStats = generation.result.speculation
        self.sampler = Sampler(self.settings.sampling, self.lm.device)
        self.penalize = self.settings.sampling.repetition_penalty != 1.0
        self.history = list(generation.prompt_ids)
        tokenizer = self.lm.tokenizer
        self.stop_ids = set(tokenizer.eos_ids) | set(self.lm.config.eos_token_id)
        self.think_start, self.think_end = tokenizer.think_start_id, tokenizer.think_end_id
        self.decoder = tokenizer.stream_decoder()
        self.channel = "reasoning" if self.settings.thinking else "answer"
        self.first_token_at: float | None = None

    # Model calls: the same embedding, norm and lm_head calls as `LanguageModel.forward`.

    @torch.inference_mode()
    def _feed(self, tokens: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Advance the state by `tokens`; returns (final-normed hidden `[T, H]`, pre-norm `[1, T, H]`)."""
        hidden = self.lm.hidden_states(torch.tensor([list(tokens)], dtype=torch.long), self.state)
        return self.lm.module.model.norm(hidden)[0], hidden

    @torch.inference_mode()
    def _last_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Pre-norm hidden `[1, T, H]` -> logits `[V]` of the last position, as `forward(last_only=True)`."""
        return self.lm.module.lm_head(self.lm.module.model.norm(hidden[:, -1:]))[0, -1]

    @torch.inference_mode()
    def _row_logits(self, normed: torch.Tensor) -> torch.Tensor:
        """Final-normed rows `[T, H]` -> logits `[T, V]`.

        The small-row kernel (bf16 on CPU) gives each row the bits of a one-token step. Otherwise
        `W @ x.T` keeps the cost flat in T: on CPU, fp32 `linear` over 2-4 rows takes a path about
        three times slower than over one row, which would eat the gain of verifying at once.
        """
        head = self.lm.module.lm_head
        if uses_native(normed, head.weight):
            return head(normed)
        return (head.weight @ normed.T).T

    def _history(self, extra: Sequence[int] = ()) -> torch.Tensor | None:
        return torch.tensor(self.history + list(extra), dtype=torch.long) if self.penalize else None

    def _pick(self, logits: torch.Tensor, previous: list[int]) -> tuple[int, torch.Tensor | None]:
        history = self._history(previous)
        if self.sampler.params.greedy:
            return self.sampler.sample(logits, history), None
        q = self.sampler.probabilities(logits, history)
        return int(torch.multinomial(q, 1, generator=self.sampler.generator)), q

    def _verify(self, logits: torch.Tensor, drafts: list[int], draft_probs: torch.Tensor | None) -> tuple[int, int]:
        """logits `[k + 1, V]` of the verification rows -> (accepted drafts, the model's next token)."""
        if self.sampler.params.greedy:
            for index, token in enumerate(drafts):
                target = self.sampler.sample(logits[index], self._history(drafts[:index]))
                if target != token:
                    return index, target
            return len(drafts), self.sampler.sample(logits[len(drafts)], self._history(drafts))
        return verify_sampled(
            drafts, lambda i: self.sampler.probabilities(logits[i], self._history(drafts[:i])), draft_probs,
            self.sampler.generator,
        )

    def _emit(self, token: int) -> Iterator[TextDelta]:
        """Record one generated token exactly as `Generation` does; sets `result.finish_reason` to end."""
        result, settings = self.result, self.settings
        if self.first_token_at is None:
            self.first_token_at = time.perf_counter()
            result.time_to_first_token_s = self.first_token_at - self.started
        result.token_ids.append(token)
        self.history.append(token)
        if token in self.stop_ids:
            result.finish_reason = "stop"
            return
        if token == self.think_start:
            self.channel = "reasoning"
        elif token == self.think_end:
            self.channel = "answer"
        else:
            text = self.decoder.push(token)
            if text:
                delta = self.gen._append(text, self.channel, token)
                if delta is not None and delta.text:
                    yield delta
                if result.finish_reason:
                    return
        if len(result.token_ids) >= settings.max_new_tokens:
            result.finish_reason = "length"
        elif self.gen.cancel.is_set():
            result.finish_reason = "cancelled"

    def _prefill(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Feed the prompt in chunks, giving the MTP block every (hidden, next token) pair.

        Returns (logits `[V]` at the last prompt position, its final-normed hidden `[B, H]`).
        """
        lm, state, prompt = self.lm, self.state, self.gen.prompt_ids
        if not prompt:
            raise ValueError("prefill needs at least one token")
        chunk_size = self.settings.prefill_chunk
        carry = self.drafter.start(lm, state)
        total, started = len(prompt), time.perf_counter()
        for start in range(0, total, chunk_size):
            if self.gen.cancel.is_set():
                raise Cancelled(carry)
            chunk = prompt[start:start + chunk_size]
            first = state.seen_tokens
            normed, hidden = self._feed(chunk)
            if carry is not None:
                pairs, tokens, position = torch.cat([carry, normed[:-1]]), chunk, first - 1
            else:
                pairs, tokens, position = normed[:-1], chunk[1:], first
            if tokens:
                self.drafter.draft(pairs, tokens, position, 0, self._pick)
            carry = normed[-1:]
            if self.gen.progress is not None:
                self.gen.progress(PrefillProgress(min(start + chunk_size, total), total, time.perf_counter() - started))
        return self._last_logits(hidden), carry

    def run(self) -> Iterator[TextDelta]:
        result, state, k = self.result, self.state, self.k
        self.started = time.perf_counter()
        try:
            logits, carry = self._prefill()
        except Cancelled as stop:
            result.finish_reason = "cancelled"
            self.drafter.finish(state, stop.args[0] if stop.args else None)
            return
        token = self.sampler.sample(logits, self._history())
        yield from self._emit(token)
        if result.finish_reason:
            self.drafter.finish(state, carry)
            self._set_rate()
            return
        base = state.seen_tokens
        pending = [token]
        drafts, draft_probs = self.drafter.draft(carry, [token], base - 1, k, self._pick)
        while True:
            seq, checked = pending + drafts, len(drafts)
            last_at = base + len(pending) - 1
            snapshot = snapshot_linear_layers(state) if drafts else None
            normed, hidden = self._feed(seq)
            # A lone token is a plain decode step: same logits call as `Generation`.
            logits = self._row_logits(normed[len(pending) - 1:]) if checked else self._last_logits(hidden)[None]
            accepted, token = self._verify(logits, drafts, draft_probs)
            if checked:
                self.stats.record(checked, accepted)
            new = drafts[:accepted] + [token]
            for index, emitted in enumerate(new):
                yield from self._emit(emitted)
                if result.finish_reason:
                    self._settle(snapshot, base, seq, normed, last_at, new[:index], fed_all=accepted == checked)
                    self._set_rate()
                    return
            rows = normed[len(pending) - 1:len(pending) + accepted]
            drafts, draft_probs = self.drafter.draft(rows, new, last_at, k, self._pick)
            if accepted == checked:
                base, pending = base + len(seq), [token]
                continue
            restore_linear_layers(state, snapshot, base)
            pending = pending + new
            if len(pending) + len(drafts) > self.gen.max_verify_tokens:
                self._feed(pending[:-1])
                base, pending = state.seen_tokens, [token]

    def _settle(self, snapshot: list[tuple[LinearLayerState, torch.Tensor, torch.Tensor]] | None, base: int,
                seq: list[int], normed: torch.Tensor, last_at: int, before_final: list[int], fed_all: bool) -> None:
        """Leave the state holding everything but the final token, and the MTP cache in step with it.

        before_final: the tokens emitted in this step before the final one (positions
        `last_at + 1...`); `normed` `[len(seq), H]` are the verification's hidden states.
        """
        state = self.state
        final_at = last_at + 1 + len(before_final)
        if not (fed_all and base + len(seq) == final_at):
            restore_linear_layers(state, snapshot, base)
            self._feed(seq[:final_at - base])
        # The MTP cache has pairs up to last_at - 1; add the ones up to the final token's predecessor.
        offset = last_at - base
        if before_final:
            self.drafter.draft(normed[offset:offset + len(before_final)], before_final, last_at, 0, self._pick)
        self.drafter.finish(state, normed[final_at - 1 - base:final_at - base])

    def _set_rate(self) -> None:
        generated = len(self.result.token_ids)
        decode_time = time.perf_counter() - (self.first_token_at or self.started)
        if generated > 1 and decode_time > 0:
            self.result.decode_tokens_per_s = (generated - 1) / decode_time
