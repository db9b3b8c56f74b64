"""The decode loop of `Generation` and `SpeculativeGeneration`: plain decoding drafts nothing.

Each step feeds `[pending..., d_1..d_k]` through the main model once and emits the accepted
drafts plus the model's own next token (see `model.speculative` for the rule and the rollback).
Without drafts a step is `[token]`: one decode step, with the same calls as `LanguageModel.forward`.

The MTP cache (the drafter's, else the one the state carries) receives every pair (hidden at t,
token at t + 1) whose token is final. A drafter that drafts with the MTP block extends the cache
each step; otherwise the loop collects the pairs and extends the cache once, when the answer ends,
so plain decoding runs the block once per answer instead of once per token.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence

import torch

from kernels.linear import uses_native
from kernels.quant import QuantizedWeight

from .generation import Cancelled, Generation, TextDelta, prefill
from .mtp import MtpRunner, mtp_block, state_mtp
from .sampling import InvalidLogits, Sampler, argmax_index
from .speculative import LinearSnapshot, restore_linear_layers, snapshot_linear_layers, verify_sampled


class DecodeLoop:
    """One run of a `Generation` (or `SpeculativeGeneration`): prefill, then decode steps."""

    def __init__(self, generation: Generation):
        self.gen = generation
        self.lm, self.state, self.drafter = generation.lm, generation.state, generation.drafter
        self.k = generation.draft_tokens
        self.settings, self.result = generation.settings, generation.result
        self.stats = getattr(generation.result, "speculation", None)
        self.sampler = Sampler(self.settings.sampling, self.lm.device)
        self.penalize = self.settings.sampling.repetition_penalty != 1.0
        self.history = list(generation.prompt_ids)
        tokenizer = self.lm.tokenizer
        self.stop_ids = set(tokenizer.eos_ids) | set(self.lm.config.eos_token_id)
        self.think_start, self.think_end = tokenizer.think_start_id, tokenizer.think_end_id
        self.decoder = tokenizer.stream_decoder()
        self.channel = "reasoning" if self.settings.thinking else "answer"
        self.first_token_at: float | None = None
        # (rows `[T, H]`, tokens, position) for an MTP cache that no drafter extends as it goes.
        self.unrecorded: list[tuple[torch.Tensor, list[int], int]] = []

    # Model calls: the same embedding, norm and lm_head calls as `LanguageModel.forward`.

    @torch.inference_mode()
    def _feed(self, tokens: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Advance the state by `tokens`; returns (final-normed hidden `[T, H]`, pre-norm `[1, T, H]`)."""
        hidden = self.lm.hidden_states(torch.tensor([list(tokens)], dtype=torch.long), self.state)
        return self.lm.module.model.norm(hidden)[0], hidden

    def _step(self, tokens: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """A step without drafts, through `forward(last_only=True)` like any decode step: (logits
        `[1, V]` of the last token, final-normed hidden `[T, H]`, or None when nothing reads it)."""
        ids = torch.tensor([list(tokens)], dtype=torch.long)
        if self.mtp is None and self.drafter is None:
            return self.lm.forward(ids, self.state, last_only=True)[0], None
        logits, normed = self.lm.forward(ids, self.state, last_only=True, with_normed=True)
        return logits[0], normed[0]

    @torch.inference_mode()
    def _row_logits(self, normed: torch.Tensor) -> torch.Tensor:
        """Final-normed rows `[T, H]` -> logits `[T, V]`.

        The small-row kernels (bf16 on CPU; the quantized one for a quantized head) give each row
        the bits of a one-token step, as `head(normed)` does. Otherwise `W @ x.T` keeps the cost flat
        in T: on CPU, fp32 `linear` over 2-4 rows takes a path about three times slower than over
        one row, which would eat the gain of verifying at once.
        """
        head = self.lm.module.lm_head
        if isinstance(head.weight, QuantizedWeight) or uses_native(normed, head.weight):
            return head(normed)
        return (head.weight @ normed.T).T

    def _history(self, extra: Sequence[int] = ()) -> torch.Tensor | None:
        return torch.tensor(self.history + list(extra), dtype=torch.long) if self.penalize else None

    def _pick(self, logits: torch.Tensor, previous: list[int]) -> tuple[int, torch.Tensor | None]:
        history = self._history(previous)
        if self.sampler.params.greedy:
            try:
                return self.sampler.sample(logits, history), None
            except InvalidLogits:  # a draft only costs time: verification rejects whatever it is
                return argmax_index(logits), None
        q = self.sampler.probabilities(logits, history)
        return int(torch.multinomial(q, 1, generator=self.sampler.generator)), q

    def _verify(self, logits: torch.Tensor, drafts: list[int], draft_probs: torch.Tensor | None) -> tuple[int, int]:
        """logits `[k + 1, V]` of the verification rows -> (accepted drafts, the model's next token)."""
        if self.sampler.params.greedy or not drafts:
            for index, token in enumerate(drafts):
                target = self.sampler.sample(logits[index], self._history(drafts[:index]))
                if target != token:
                    return index, target
            return len(drafts), self.sampler.sample(logits[len(drafts)], self._history(drafts))
        return verify_sampled(
            drafts, lambda i: self.sampler.probabilities(logits[i], self._history(drafts[:i])), draft_probs,
            self.sampler.generator,
        )

    # The MTP cache and the drafter.

    def _advance(self, rows: torch.Tensor, tokens: list[int], position: int,
                 count: int) -> tuple[list[int], torch.Tensor | None]:
        """The pairs (rows `[T, H]` at `position...`, the tokens after them) are final: the MTP cache
        gets them, and the drafter proposes up to `count` tokens after the last one."""
        if self.mtp is not None and not self.drafter_extends:
            self.unrecorded.append((rows, list(tokens), position))
        if self.drafter is None:
            return [], None
        return self.drafter.draft(rows, tokens, position, count, self._pick)

    def _finish_mtp(self, hidden: torch.Tensor | None) -> None:
        """Bring the MTP cache in step with the state: pairs up to its last position, whose
        final-normed hidden `hidden` `[1, H]` waits for the next token."""
        cache = self.mtp
        if cache is None:
            return
        runner = MtpRunner(self.lm, mtp_block(self.lm))
        run: list[tuple[torch.Tensor, list[int], int]] = []
        for pairs in [*self.unrecorded, None]:
            # Consecutive pairs go through the block in one call.
            if run and (pairs is None or pairs[2] != run[-1][2] + len(run[-1][1])):
                rows = torch.cat([r for r, _, _ in run])[None]
                runner.record(cache, rows, torch.tensor([sum((t for _, t, _ in run), [])]), run[0][2])
                run = []
            if pairs is not None:
                run.append(pairs)
        self.unrecorded = []
        last = self.state.seen_tokens - 1
        cache.truncate_from(last)
        if hidden is not None:
            cache.keep_hidden(hidden, last)

    def _emit(self, token: int) -> Iterator[TextDelta]:
        """Record one generated token; sets `result.finish_reason` when the answer ends."""
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

    def run(self) -> Iterator[TextDelta]:
        result, state, k, lm = self.result, self.state, self.k, self.lm
        self.started = time.perf_counter()
        drafting = self.drafter.start(lm, state) if self.drafter is not None else None
        self.mtp, self.drafter_extends = drafting or state_mtp(lm, state), drafting is not None
        try:
            logits = prefill(lm, state, self.gen.prompt_ids, chunk_size=self.settings.prefill_chunk,
                             progress=self.gen.progress, cancel=self.gen.cancel, mtp=self.mtp)
        except Cancelled:
            result.finish_reason = "cancelled"
            return
        # After prefill the MTP cache holds the last prompt position's hidden.
        carry = None if self.mtp is None else self.mtp.hidden
        token = self.sampler.sample(logits, self._history())
        yield from self._emit(token)
        if result.finish_reason:
            self._set_rate()
            return
        base, model_layers = state.seen_tokens, lm.config.num_hidden_layers
        pending = [token]
        drafts, draft_probs = self._advance(carry, [token], base - 1, k)
        while True:
            seq, checked = pending + drafts, len(drafts)
            last_at = base + len(pending) - 1
            snapshot = snapshot_linear_layers(state, model_layers) if drafts else None
            if checked:
                normed, _ = self._feed(seq)
                logits = self._row_logits(normed[len(pending) - 1:])
            else:
                logits, normed = self._step(seq)
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
            rows = None if normed is None else normed[len(pending) - 1:len(pending) + accepted]
            drafts, draft_probs = self._advance(rows, new, last_at, k)
            if accepted == checked:
                base, pending = base + len(seq), [token]
                continue
            restore_linear_layers(state, snapshot, base)
            pending = pending + new
            if len(pending) + len(drafts) > self.gen.max_verify_tokens:
                self._feed(pending[:-1])
                base, pending = state.seen_tokens, [token]

    def _settle(self, snapshot: LinearSnapshot | None, base: int, seq: list[int], normed: torch.Tensor | None,
                last_at: int, before_final: list[int], fed_all: bool) -> None:
        """Leave the state holding everything but the final token, and the MTP cache in step with it.

        before_final: the tokens emitted in this step before the final one (positions
        `last_at + 1...`); `normed` `[len(seq), H]` are the step's hidden states (None when neither
        a drafter nor an MTP cache reads them).
        """
        state = self.state
        final_at = last_at + 1 + len(before_final)
        if not (fed_all and base + len(seq) == final_at):
            restore_linear_layers(state, snapshot, base)
            self._feed(seq[:final_at - base])
        if normed is None:
            return
        # The MTP cache has pairs up to last_at - 1; add the ones up to the final token's predecessor.
        offset = last_at - base
        if before_final:
            self._advance(normed[offset:offset + len(before_final)], before_final, last_at, 0)
        self._finish_mtp(normed[final_at - 1 - base:final_at - base])

    def _set_rate(self) -> None:
        generated = len(self.result.token_ids)
        decode_time = time.perf_counter() - (self.first_token_at or self.started)
        if generated > 1 and decode_time > 0:
            self.result.decode_tokens_per_s = (generated - 1) / decode_time
