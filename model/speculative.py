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

The MTP block keeps its own K/V (in the state, or a private cache for a state without one); it
is extended only with pairs whose tokens are final, so it never needs a rollback. The decode loop
itself (shared with plain decoding) is `model.decoding.DecodeLoop`.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from kernels.native import FEW_TOKENS

from .generation import Generation, GenerationResult, GenerationSettings, PrefillProgress
from .mtp import MtpCache, MtpRunner, mtp_block, state_mtp
from .qwen3_next import LanguageModel
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

    def start(self, lm: LanguageModel, state: ModelState) -> MtpCache | None:
        """Called before the prompt is fed; returns the MTP cache this drafter extends in `draft`
        (the decode loop then leaves it to the drafter), or None."""
        return None

    def draft(self, hidden: torch.Tensor | None, tokens: Sequence[int], position: int, count: int,
              pick: Pick) -> tuple[list[int], torch.Tensor | None]:
        """hidden `[T, H]` final-normed main hidden states at positions `position..position+T-1`
        (None only for the first pair of an answer when no MTP cache follows the state); tokens:
        the T tokens that followed them. Returns up to `count` drafts for the positions after
        `position + T` and their draft distributions `[n, V]` (None when chosen deterministically)."""
        return [], None


class MtpDrafter(Drafter):
    """Drafts with the checkpoint's MTP block; its K/V cache lives in the state when it can."""

    def __init__(self, lm: LanguageModel, block):
        self.runner = MtpRunner(lm, block)
        self.cache: MtpCache | None = None

    def start(self, lm: LanguageModel, state: ModelState) -> MtpCache:
        # A state without an MTP cache (saved by an older version) gets a private one from here on.
        self.cache = state_mtp(lm, state) or MtpCache.new(lm, state.batch_size, state.seen_tokens)
        return self.cache

    def draft(self, hidden: torch.Tensor, tokens: Sequence[int], position: int, count: int,
              pick: Pick) -> tuple[list[int], torch.Tensor | None]:
        cache, runner = self.cache, self.runner
        ids = torch.tensor([list(tokens)], dtype=torch.long)
        last = ids.shape[1] - 1
        if last:
            # Only the last pair's output drafts: the others need only their K/V.
            runner.record(cache, hidden[None, :last], ids[:, :last], position)
        out = runner.extend(cache, hidden[None, last:], ids[:, last:], position + last)
        committed = cache.next_position
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
        cache.move_to(committed)
        stacked = torch.stack(probs) if probs and probs[0] is not None else None
        return drafts, stacked


def default_drafter(lm: LanguageModel) -> Drafter | None:
    """The MTP drafter, or None when the checkpoint has no MTP block."""
    block = mtp_block(lm)
    return None if block is None else MtpDrafter(lm, block)


LinearSnapshot = list[tuple[LinearLayerState, torch.Tensor, torch.Tensor]]


def snapshot_linear_layers(state: ModelState, model_layers: int | None = None) -> LinearSnapshot:
    """Copies of every Gated DeltaNet layer's conv and recurrent state (attention K/V need none).

    model_layers: how many of `state.layers` are the model's; the MTP cache after them is left
    out (its drafter keeps it in step, and a rollback must not undo that).
    """
    return [(layer, layer.conv.clone(), layer.recurrent.clone())
            for layer in state.layers[:model_layers] if isinstance(layer, LinearLayerState)]


def restore_linear_layers(state: ModelState, snapshot: LinearSnapshot, seen_tokens: int) -> None:
    """Put a snapshot back and truncate attention to `seen_tokens` (the snapshot is used up)."""
    for layer, conv, recurrent in snapshot:
        layer.conv, layer.recurrent = conv, recurrent
    state.seen_tokens = seen_tokens


class SpeculativeGeneration(Generation):
    """`Generation` with speculative decoding; same iteration, stop handling and state contract.

    Iterate to stream `TextDelta`s; `result` (a `SpeculativeResult`) is complete once iteration
    ends and carries acceptance statistics. Without a drafter (a checkpoint without `mtp.*`
    tensors) or with `draft_tokens=0` it decodes exactly like `Generation`.

    States from `lm.new_state()` carry the MTP block's K/V, which every prefill extends, so the
    drafts see the whole context, also after a checkpoint or a saved state is restored; a state
    without it works too, with a private MTP cache starting at its current position.
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

