"""Turning last-position logits into the next token. Kept outside the model on purpose."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


class InvalidLogits(ValueError):
    """The model's scores for the next token are not numbers, so no token can be chosen."""

    def __init__(self) -> None:
        super().__init__("The model's scores for the next token came out as NaN or infinite, so no token could be "
                         "chosen and the answer stops here. Its weights may be damaged: check the checkpoint, or "
                         "try it in another weight format.")


@dataclass(frozen=True)
class SamplingParams:
    """temperature 0 means greedy; the filters apply in the order top-k, top-p, min-p."""

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    seed: int | None = None

    def __post_init__(self):
        if self.temperature < 0:
            raise ValueError("temperature must be >= 0")
        if not 0 < self.top_p <= 1:
            raise ValueError("top_p must be in (0, 1]")
        if self.top_k < 0 or not 0 <= self.min_p < 1 or self.repetition_penalty <= 0:
            raise ValueError("top_k >= 0, 0 <= min_p < 1 and repetition_penalty > 0 are required")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def argmax_index(values: torch.Tensor) -> int:
    """The index of the largest of `values` `[V]`: the first among equals, and the first NaN where
    there is one, as `torch.argmax`. On the CPU NumPy's runs it: over a vocabulary's logits it takes
    ~10 us where PyTorch's takes ~150 us in fp32 and ~550 us in bf16 (2 threads), a few percent of a
    decode step."""
    if values.device.type != "cpu":
        return int(values.argmax())
    return int(values.detach().float().numpy().argmax())


def checked_argmax(logits: torch.Tensor) -> int:
    """argmax_index, raising InvalidLogits where the winner is NaN or infinite: argmax_index returns
    the first NaN where there is one, so one look at the winner covers the whole row."""
    index = argmax_index(logits)
    if not math.isfinite(float(logits[index])):
        raise InvalidLogits()
    return index


class Sampler:
    """Stateful only through its random generator, so a seed reproduces a whole answer."""

    def __init__(self, params: SamplingParams, device: torch.device | str = "cpu"):
        self.params = params
        self.generator = torch.Generator(device=device)
        if params.seed is not None:
            self.generator.manual_seed(params.seed)
        else:
            self.generator.seed()

    def probabilities(self, logits: torch.Tensor, history: torch.Tensor | None = None) -> torch.Tensor:
        """logits `[V]` -> the distribution sampling draws from `[V]` (fp32); one-hot when greedy."""
        logits = logits.float()
        if self.params.repetition_penalty != 1.0 and history is not None and history.numel():
            logits = apply_repetition_penalty(logits, history, self.params.repetition_penalty)
        if self.params.greedy:
            return torch.nn.functional.one_hot(torch.tensor(checked_argmax(logits)), logits.shape[-1]).float()
        return filtered_probabilities(logits / self.params.temperature, self.params)

    def sample(self, logits: torch.Tensor, history: torch.Tensor | None = None) -> int:
        if self.params.greedy:
            if self.params.repetition_penalty != 1.0 and history is not None and history.numel():
                logits = apply_repetition_penalty(logits.float(), history, self.params.repetition_penalty)
            return checked_argmax(logits)
        probs = self.probabilities(logits, history)
        return int(torch.multinomial(probs, 1, generator=self.generator))


def apply_repetition_penalty(logits: torch.Tensor, history: torch.Tensor, penalty: float) -> torch.Tensor:
    """CTRL-style: divide positive logits of seen tokens by the penalty, multiply negative ones."""
    seen = torch.unique(history.to(logits.device))
    picked = logits[seen]
    logits = logits.clone()
    logits[seen] = torch.where(picked > 0, picked / penalty, picked * penalty)
    return logits


def filtered_probabilities(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    if params.top_k and params.top_k < logits.shape[-1]:
        threshold = logits.topk(params.top_k).values[-1]
        logits = logits.masked_fill(logits < threshold, float("-inf"))
    probs = logits.softmax(dim=-1)
    if params.top_p < 1.0:
        sorted_probs, order = probs.sort(descending=True)
        before = sorted_probs.cumsum(dim=-1) - sorted_probs
        drop_sorted = before >= params.top_p
        drop = torch.zeros_like(drop_sorted).scatter(0, order, drop_sorted)
        probs = probs.masked_fill(drop, 0.0)
    if params.min_p > 0:
        probs = probs.masked_fill(probs < params.min_p * probs.max(), 0.0)
    total = probs.sum()
    if not math.isfinite(float(total)) or total <= 0:  # NaN or infinite logits: softmax gives NaN
        raise InvalidLogits()
    return probs / total
