"""Streaming model calls on worker threads, registered for the whole process.

A page run can be interrupted at any moment (a click reruns the script) and a browser tab can
close or reload, so a model call must live in neither: it runs on a :class:`StreamJob`'s
thread and is registered in the process-wide :class:`JobRegistry` under a key such as
``ask:<chat session id>``. Any tab finds it there, shows its place in the model queue and
follows its text; a Stop click only sets the job's cancel event. The service still saves
what it produced.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Protocol

from storage import MessageInfo, StorageError, SummaryInfo

from .engine import READ, ModelQueue

log = logging.getLogger(__name__)

# Finished jobs are kept this long so a tab can still show how they ended (an error, a summary).
KEEP_FINISHED = 200
# An answer this long or longer measures the writing speed well enough for estimates.
MEASURED_TOKENS = 8


class StreamEvent(Protocol):
    """The shape of ``AnswerEvent`` from the analysis service."""

    kind: str
    text: str
    channel: str
    message: MessageInfo | None
    summary: SummaryInfo | None


Progress = Callable[[Any], None]
Starter = Callable[[Progress, threading.Event], Iterator[StreamEvent]]


@dataclass(frozen=True, slots=True)
class JobSnapshot:
    answer: str
    reasoning: str
    progress: Any | None
    done: bool
    cancel_requested: bool
    error: str | None
    message: MessageInfo | None
    summary: SummaryInfo | None
    elapsed_s: float
    # Pieces of text generated so far (about one per token) and their rate.
    generated: int = 0
    tokens_per_s: float = 0.0
    # 0 while on the model, n while n-th in line for it, None otherwise (not queued yet, or done).
    position: int | None = None
    # Rough times: until it gets the model while waiting, until it ends while running (an upper
    # bound once writing: an answer may stop before its length limit). None when unknown.
    starts_in_s: float | None = None
    eta_s: float | None = None

    @property
    def writing(self) -> bool:
        return bool(self.answer or self.reasoning)


def describe_error(error: Exception) -> str:
    """Service and storage errors already speak to the user; anything else gets a plain prefix."""
    if isinstance(error, ValueError | StorageError):
        return str(error)
    return f"Generation failed ({type(error).__name__}: {error})."


class StreamJob:
    """One ask or summary call; ``label`` is what the user asked, shown while it runs.

    ``max_tokens`` (the generation limit) bounds the time-left estimate; ``registry`` (set by
    :meth:`JobRegistry.start`) supplies its place in the model queue."""

    def __init__(self, start: Starter, *, label: str = "", key: str = "", kind: str = "answer",
                 max_tokens: int = 0, registry: JobRegistry | None = None) -> None:
        self.id = uuid.uuid4().hex
        self.key, self.kind, self.label = key or self.id, kind, label
        self.max_tokens = max_tokens
        self.registry = registry
        self._start = start
        self._lock = threading.Lock()
        self._cancel = threading.Event()
        self._finished = threading.Event()
        self._started_at = time.monotonic()
        self._first_text_at: float | None = None
        self._last_text_at: float | None = None
        self._generated = 0
        self._answer: list[str] = []
        self._reasoning: list[str] = []
        self._progress: Any | None = None
        self._error: str | None = None
        self._message: MessageInfo | None = None
        self._summary: SummaryInfo | None = None
        self._thread = threading.Thread(target=self._run, name=f"stream-{self.id[:8]}", daemon=True)
        self._thread.start()

    @property
    def owner(self) -> int | None:
        """The id the model queue knows this job by: its thread's (the call runs there)."""
        return self._thread.ident

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def _run(self) -> None:
        try:
            for event in self._start(self._on_progress, self._cancel):
                self._on_event(event)
        except Exception as error:
            log.exception("streaming call failed")
            with self._lock:
                self._error = describe_error(error)
        finally:
            if self.registry is not None:
                self.registry.learn(self)
            self._finished.set()

    def _on_progress(self, progress: Any) -> None:
        with self._lock:
            self._progress = progress

    def _on_event(self, event: StreamEvent) -> None:
        with self._lock:
            if event.kind == "delta":
                (self._reasoning if event.channel == "reasoning" else self._answer).append(event.text)
                now = time.monotonic()
                self._first_text_at = self._first_text_at or now
                self._last_text_at = now
                self._generated += 1
            elif event.kind == "done":
                self._message = event.message
                self._summary = event.summary

    def cancel(self) -> None:
        self._cancel.set()

    @property
    def done(self) -> bool:
        return self._finished.is_set()

    def wait(self, timeout: float | None = None) -> bool:
        return self._finished.wait(timeout)

    @property
    def generated(self) -> int:
        with self._lock:
            return self._generated

    def tokens_per_s(self) -> float:
        with self._lock:
            return self._rate()

    def _rate(self) -> float:
        if self._generated < 2 or self._first_text_at is None or self._last_text_at is None:
            return 0.0
        span = self._last_text_at - self._first_text_at
        return (self._generated - 1) / span if span > 0 else 0.0

    def remaining_s(self, decode_rate: float = 0.0) -> float | None:
        """Time left if it ran now: the prompt still to read plus the rest of the length limit at
        its own writing speed (or ``decode_rate``, measured on earlier answers, before it writes)."""
        with self._lock:
            rate = self._rate() or decode_rate
            progress, generated = self._progress, self._generated
        if self.done:
            return 0.0
        writing = (self.max_tokens - generated) / rate if rate > 0 and self.max_tokens else None
        if generated:
            return None if writing is None else max(writing, 0.0)
        reading = getattr(progress, "eta_s", None) if progress is not None else None
        if reading is None or writing is None:
            return None
        return reading + writing

    def snapshot(self) -> JobSnapshot:
        position = starts_in = eta = None
        if self.registry is not None and not self.done:
            position, starts_in = self.registry.place(self)
            eta = self.remaining_s(self.registry.decode_rate) if position == 0 else None
        with self._lock:
            return JobSnapshot(
                answer="".join(self._answer),
                reasoning="".join(self._reasoning),
                progress=self._progress,
                done=self._finished.is_set(),
                cancel_requested=self._cancel.is_set(),
                error=self._error,
                message=self._message,
                summary=self._summary,
                elapsed_s=time.monotonic() - self._started_at,
                generated=self._generated,
                tokens_per_s=self._rate(),
                position=position,
                starts_in_s=starts_in,
                eta_s=eta,
            )


class Busy(ValueError):
    """A job is already running under this key (e.g. an answer in the same chat session)."""


class JobRegistry:
    """The answers and summaries of the whole process by key, whichever tab started them."""

    def __init__(self, queue: ModelQueue | None = None) -> None:
        self.queue = queue
        self._lock = threading.Lock()
        self._jobs: OrderedDict[str, StreamJob] = OrderedDict()
        self.decode_rate = 0.0  # tokens/s of the last answer that wrote more than a few tokens

    def start(self, key: str, start: Starter, *, kind: str = "answer", label: str = "", max_tokens: int = 0,
              busy: str = "This is already running.") -> StreamJob:
        with self._lock:
            current = self._jobs.get(key)
            if current is not None and not current.done:
                raise Busy(busy)
            job = StreamJob(start, key=key, kind=kind, label=label, max_tokens=max_tokens,
                            registry=self)
            self._jobs.pop(key, None)
            self._jobs[key] = job
            self._forget_old()
            return job

    def learn(self, job: StreamJob) -> None:
        """Keep the writing speed of a job that wrote enough to measure it, for the estimates of others."""
        rate = job.tokens_per_s()
        if rate > 0 and job.generated >= MEASURED_TOKENS:
            self.decode_rate = rate

    def get(self, key: str) -> StreamJob | None:
        """The latest job under ``key``, running or finished."""
        with self._lock:
            return self._jobs.get(key)

    def running(self, kind: str | None = None) -> list[StreamJob]:
        """Jobs not finished, in the order they will have the model (the one on it first)."""
        with self._lock:
            jobs = [j for j in self._jobs.values() if not j.done and (kind is None or j.kind == kind)]
        if self.queue is None:
            return jobs
        order = {t.owner: n for n, t in enumerate(self.queue.lineup())}
        return sorted(jobs, key=lambda j: order.get(j.owner, len(order)))

    def wait_all(self, timeout: float | None = None) -> bool:
        deadline = None if timeout is None else time.monotonic() + timeout
        for job in self.running():
            if not job.wait(None if deadline is None else max(deadline - time.monotonic(), 0)):
                return False
        return True

    def place(self, job: StreamJob) -> tuple[int | None, float | None]:
        """(position in the model queue, rough seconds until it gets the model).

        Reads ahead of it count for nothing: they give way at their next chunk boundary."""
        if self.queue is None or job.owner is None:
            return None, None
        position, ahead = self.queue.position(job.owner), self.queue.ahead_of(job.owner)
        if not position or ahead is None:
            return position, (0.0 if position == 0 else None)
        by_owner = {j.owner: j for j in self.running()}
        waits = [0.0 if t.priority == READ else
                 by_owner[t.owner].remaining_s(self.decode_rate) if t.owner in by_owner else None for t in ahead]
        return position, (None if None in waits else sum(waits))

    def _forget_old(self) -> None:
        finished = [k for k, j in self._jobs.items() if j.done]
        for key in finished[: max(0, len(finished) - KEEP_FINISHED)]:
            del self._jobs[key]
