"""Questions and summaries over documents, reusing cached model states for every prefix."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

from model import Generation, GenerationSettings, ModelState, PrefillProgress, SamplingParams, prefill
from model.checkpoint import Checkpoint
from model.demo import demo_notice, is_demo_checkpoint
from model.generation import DEFAULT_PREFILL_CHUNK
from model.generation import Cancelled as PrefillCancelled
from model.speculative import SpeculativeGeneration
from storage.dto import MessageInfo, MessageStats, SummaryInfo

from .citations import parse_and_verify
from .engine import Cancelled, ModelQueue
from .prompting import (
    SUMMARY_REQUEST,
    DocumentForPrompt,
    Segment,
    answer_segment,
    chain_keys,
    document_segment,
    question_segment,
    system_segment,
    unit_marker,
)
from .state_cache import CacheStats, StateCache


class ContextTooLong(ValueError):
    """The prompt and the room kept for the answer would not fit the model's context; raised
    before any prefill."""

    def __init__(self, tokens: int, limit: int, reserved: int = 0, *, what: str = "documents and conversation",
                 hint: str = "Select fewer or shorter documents, or start a new chat session."):
        self.tokens, self.limit, self.reserved = tokens, limit, reserved
        super().__init__(
            f"The selected {what} take {tokens:,} tokens, plus {reserved:,} reserved for the answer: "
            f"{tokens + reserved:,}, more than the model's context of {limit:,}. {hint}"
        )


@dataclass(frozen=True)
class ModelInfo:
    path: str
    is_demo: bool
    notice: str
    device: str
    dtype: str
    parameter_bytes: int
    context_limit: int
    fingerprint: str
    weight_formats: tuple[str, ...] = ()
    family: str = ""


@dataclass(frozen=True)
class AnswerEvent:
    kind: str  # "delta" | "done"
    text: str = ""
    channel: str = "answer"
    message: MessageInfo | None = None
    summary: SummaryInfo | None = None


@dataclass
class RunReport:
    """What one answer cost: tokens reused from cache, tokens prefilled, timings."""

    cached_tokens: int = 0
    prefill_tokens: int = 0
    time_to_first_token_s: float = 0.0
    tokens_per_s: float = 0.0
    status: str = "error"
    answer_ids: list[int] = field(default_factory=list)


class AnalysisService:
    def __init__(self, lm, documents, sessions, summaries, blobs=None, *, context_limit: int = 0,
                 memory_budget_bytes: int | None = None, prefill_chunk: int = DEFAULT_PREFILL_CHUNK,
                 max_new_tokens: int = 1024,
                 sampling: SamplingParams | None = None, draft_tokens: int = 0):
        self.lm, self.documents, self.sessions, self.summaries = lm, documents, sessions, summaries
        self.tokenizer = lm.tokenizer
        self.cache = StateCache(lm, blobs, memory_budget_bytes)
        self.context_limit = context_limit or lm.config.context_limit
        self.prefill_chunk, self.max_new_tokens = prefill_chunk, max_new_tokens
        self.sampling = sampling or SamplingParams()
        self.draft_tokens = draft_tokens
        self.queue = ModelQueue()
        self._segments: dict[str, Segment] = {}
        self._segments_lock = threading.Lock()

    @property
    def model_name(self) -> str:
        return self.lm.path.name if self.lm.path is not None else "model"

    def model_info(self) -> ModelInfo:
        demo = self.lm.path is not None and is_demo_checkpoint(self.lm.path)
        return ModelInfo(str(self.lm.path), demo, demo_notice(self.lm.path) if demo else "", str(self.lm.device),
                         str(self.lm.dtype).removeprefix("torch."), self.lm.parameter_bytes(), self.context_limit,
                         self.lm.fingerprint, self.lm.weight_formats, self.lm.config.family_name)

    def cache_stats(self) -> CacheStats:
        return self.cache.stats()

    def count_tokens(self, text: str) -> int:
        return len(self.tokenizer.encode(text))

    def document_segment(self, document_id: int) -> Segment:
        """The document's prompt segment, cached by content hash (ids can be reused after a delete)."""
        info = self.documents.get_document(document_id)
        if info is None:
            raise ValueError(f"Document {document_id} is no longer in the library.")
        with self._segments_lock:
            cached = self._segments.get(info.sha256)
        if cached is not None and cached.document_id == document_id:
            return cached
        units = [(unit_marker(info.kind, u.number, u.label), u.text) for u in self.documents.get_units(document_id)]
        segment = document_segment(self.tokenizer, DocumentForPrompt(document_id, info.title, units))
        with self._segments_lock:
            self._segments[info.sha256] = segment
        return segment

    def selection_tokens(self, document_ids: Sequence[int]) -> int:
        return sum(len(self.document_segment(d).ids) for d in document_ids)

    def _conversation_segments(self, session_id: int) -> tuple[list[int], list[Segment]]:
        selection = [d.document_id for d in self.sessions.get_documents(session_id) if d.document_id is not None]
        segments = [system_segment(self.tokenizer)] + [self.document_segment(d) for d in selection]
        for message in self.sessions.list_messages(session_id):
            if message.role == "user":
                segments.append(question_segment(self.tokenizer, message.text))
            elif message.role == "assistant" and message.status != "streaming":
                segments.append(answer_segment(self.tokenizer, message.text))
        return selection, segments

    def ask(self, session_id: int, question: str, *, progress: Callable[[PrefillProgress], None] | None = None,
            cancel: threading.Event | None = None) -> Iterator[AnswerEvent]:
        """Stream an answer to `question` in a chat session; saves both messages."""
        selection, segments = self._conversation_segments(session_id)
        segments.append(question_segment(self.tokenizer, question))
        self._check_fits(segments)
        self.sessions.append_message(session_id, "user", question)
        reply = self.sessions.append_message(session_id, "assistant", "", status="streaming")
        report, text, reasoning, status = RunReport(), "", "", "error"
        try:
            for delta in self._answer(segments, self._depends_on(selection), report, progress, cancel):
                if delta.channel == "reasoning":
                    reasoning += delta.text
                else:
                    text += delta.text
                yield AnswerEvent("delta", delta.text, delta.channel)
            status = report.status
        except GeneratorExit:
            status = "cancelled"
            raise
        finally:
            citations = parse_and_verify(text, self._units_by_title(selection))
            message = self.sessions.update_message(
                reply.id, text=text, reasoning=reasoning or None, citations=citations, status=status,
                stats=MessageStats(report.prefill_tokens, report.cached_tokens, report.time_to_first_token_s,
                                   report.tokens_per_s),
            )
        yield AnswerEvent("done", message=message)

    def summarize(self, document_ids: Sequence[int], *, progress=None, cancel=None) -> Iterator[AnswerEvent]:
        segments = [system_segment(self.tokenizer)] + [self.document_segment(d) for d in document_ids]
        segments.append(question_segment(self.tokenizer, SUMMARY_REQUEST))
        self._check_fits(segments, what="documents", hint="Select fewer or shorter documents.")
        report, text = RunReport(), ""
        for delta in self._answer(segments, self._depends_on(document_ids), report, progress, cancel):
            if delta.channel == "answer":
                text += delta.text
                yield AnswerEvent("delta", delta.text)
        citations = parse_and_verify(text, self._units_by_title(document_ids))
        infos = [self.documents.get_document(d) for d in document_ids]
        summary = self.summaries.add_summary([i for i in infos if i is not None], text, citations=citations,
                                             model_name=self.model_name)
        yield AnswerEvent("done", summary=summary)

    @property
    def answer_reserve(self) -> int:
        """Tokens kept free for the answer (reasoning included): the most it may generate."""
        return max(self.max_new_tokens, 1)

    def _check_fits(self, segments: list[Segment], **message) -> None:
        total = sum(len(s.ids) for s in segments) + len(self.tokenizer.generation_prompt())
        if total + self.answer_reserve > self.context_limit:
            raise ContextTooLong(total, self.context_limit, self.answer_reserve, **message)

    def _depends_on(self, document_ids: Sequence[int]) -> tuple[str, ...]:
        infos = [self.documents.get_document(d) for d in document_ids]
        return tuple(i.sha256 for i in infos if i is not None)

    def _units_by_title(self, document_ids: Sequence[int]) -> dict:
        result = {}
        for document_id in document_ids:
            info = self.documents.get_document(document_id)
            if info is not None:
                result[info.title] = (document_id, self.documents.get_units(document_id))
        return result

    def _answer(self, segments, depends_on, report, progress, cancel):
        """Restore the longest cached prefix, prefill the rest segment by segment, generate.

        Prefill always stops at segment boundaries, so an answer computed from a restored
        checkpoint runs exactly the same operations as one computed from scratch.
        """
        cancel = cancel or threading.Event()
        keys = chain_keys(self.lm.fingerprint, segments)
        try:
            with self.queue.turn(cancel):
                yield from self._answer_locked(segments, keys, depends_on, report, progress, cancel)
        except (Cancelled, PrefillCancelled):
            report.status = "cancelled"

    def _answer_locked(self, segments, keys, depends_on, report, progress, cancel):
        started = time.perf_counter()
        restored = self.cache.restore(keys)
        # Checkpoints made on top of a disk checkpoint still being verified wait for its check.
        held: list | None = None if restored.trusted else []
        state = self._prefill_segments(segments, keys, restored.covered, restored.state, depends_on, report,
                                       progress, cancel, held)
        if not restored.verified():
            # A block of a restored file was damaged: nothing computed from it is shown or kept.
            held = None
            state = self._prefill_segments(segments, keys, 0, None, depends_on, report, progress, cancel, held)
        for key, checkpoint in held or ():
            self.cache.put(key, checkpoint, depends_on)
        before_answer = state.checkpoint()
        settings = GenerationSettings(sampling=self.sampling, max_new_tokens=self.max_new_tokens,
                                      prefill_chunk=self.prefill_chunk)
        if self.draft_tokens:
            generation = SpeculativeGeneration(self.lm, state, self.tokenizer.generation_prompt(), settings,
                                               draft_tokens=self.draft_tokens, cancel=cancel)
        else:
            generation = Generation(self.lm, state, self.tokenizer.generation_prompt(), settings, cancel=cancel)
        generation_started = time.perf_counter()
        yield from generation
        result = generation.result
        report.time_to_first_token_s = generation_started - started + result.time_to_first_token_s
        report.tokens_per_s = result.decode_tokens_per_s
        report.status = "complete" if result.finish_reason in ("stop", "length") else result.finish_reason
        report.answer_ids = result.token_ids
        self._checkpoint_turn(segments, before_answer, depends_on, result.text)

    def _prefill_segments(self, segments, keys, covered: int, state: ModelState | None, depends_on, report,
                          progress, cancel, held: list | None) -> ModelState:
        """Prefill `segments[covered:]` onto `state` (a new one if None), segment by segment.

        The state after every segment but a final question is cached under its key, at once or,
        with `held`, appended there as (key, checkpoint) for the caller to cache later.
        """
        state = state or self.lm.new_state()
        report.cached_tokens = state.seen_tokens
        remaining = sum(len(s.ids) for s in segments[covered:])
        report.prefill_tokens = remaining
        done_before = 0
        for index in range(covered, len(segments)):
            segment = segments[index]

            def segment_progress(p: PrefillProgress, offset=done_before):
                if progress is not None:
                    progress(PrefillProgress(offset + p.done, remaining, p.elapsed_s))

            prefill(self.lm, state, segment.ids, chunk_size=self.prefill_chunk, progress=segment_progress,
                    cancel=cancel)
            done_before += len(segment.ids)
            if segment.kind != "question" or index < len(segments) - 1:
                if held is None:
                    self.cache.put(keys[index], state, depends_on)
                else:
                    held.append((keys[index], state.checkpoint()))
        return state

    def _checkpoint_turn(self, segments, before_answer: Checkpoint, depends_on, answer_text: str):
        """Cache the state after this turn in its canonical form, so a follow-up starts from it.

        The answer segment is prefilled onto a fork of the state before the answer, exactly as
        a from-scratch run would, rather than continued from the decode steps: decode and
        chunked prefill round differently, and a cached state must equal a recomputed one. The
        fork shares the earlier K/V; the disk copy (written in the background) holds only this
        turn's question and answer.
        """
        canonical = answer_segment(self.tokenizer, answer_text)
        state = before_answer.fork(self.lm.device)
        prefill(self.lm, state, canonical.ids, chunk_size=self.prefill_chunk)
        self.cache.put(chain_keys(self.lm.fingerprint, [*segments, canonical])[-1], state, depends_on)
