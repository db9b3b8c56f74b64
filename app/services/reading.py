"""Reading documents ahead of the first question about them.

Adding a document queues a read of (system prompt + that document) whose model state is
cached under the chain key a question over that document alone looks up, so the first
question only prefills itself. Reads run one at a time on one worker thread, at the model
queue's lowest priority: an answer that starts waiting makes the running read stop at its
next prefill chunk boundary and give the model back.

A read that gave way resumes from its partial state rather than starting over: after k
whole chunks of a segment the state is exactly the state a single prefill has at that point,
and prefilling the rest of the segment with the same chunk size runs the same chunks at the
same positions, so the cached state equals one read in one go (tests check it bit for bit).
The cost is memory: the paused state is held until the read gets the model again.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict, deque
from dataclasses import dataclass
from typing import Literal

from model import PrefillProgress, prefill
from model.generation import Cancelled as PrefillCancelled

from .analysis import AnalysisService
from .engine import READ, Cancelled
from .prompting import Segment, chain_keys, system_segment

log = logging.getLogger(__name__)

ReadState = Literal["queued", "reading", "paused", "done", "skipped", "failed", "cancelled"]
ACTIVE: tuple[ReadState, ...] = ("queued", "reading", "paused")
# Finished reads are kept this long so the Library page can still say how they ended.
KEEP_FINISHED = 200


@dataclass(frozen=True, slots=True)
class ReadStatus:
    """One look at a read. ``done``/``total`` count the tokens still to prefill when it started
    (what the cache already held is not counted); ``position`` is its place among reads not
    started yet (None once it is next: waiting for the model or reading); ``eta_s`` is the time
    left at the measured prefill speed."""

    document_id: int
    title: str
    state: ReadState
    done: int = 0
    total: int = 0
    position: int | None = None
    eta_s: float | None = None
    tokens_per_s: float = 0.0
    yields: int = 0
    message: str = ""

    @property
    def active(self) -> bool:
        return self.state in ACTIVE


class _Either:
    """Set when either event is set: prefill takes one cancel event, a read stops for two reasons."""

    def __init__(self, *events: threading.Event) -> None:
        self.events = events

    def is_set(self) -> bool:
        return any(event.is_set() for event in self.events)


class _Read:
    def __init__(self, document_id: int, title: str, tokens: int) -> None:
        self.document_id, self.title = document_id, title
        self.state: ReadState = "queued"
        self.done, self.total = 0, tokens
        self.prefill_s = 0.0  # time spent prefilling, pauses excluded
        self.yields = 0
        self.message = ""
        self.cancel = threading.Event()
        self.finished = threading.Event()


class ReadAhead:
    """Background reads of added documents into ``analysis.cache``, one at a time."""

    def __init__(self, analysis: AnalysisService) -> None:
        self.analysis = analysis
        self._lock = threading.Lock()
        self._reads: OrderedDict[int, _Read] = OrderedDict()
        self._waiting: deque[_Read] = deque()
        self._wake = threading.Condition(self._lock)
        self._thread: threading.Thread | None = None
        self._rate = 0.0  # last measured prefill tokens/s, for the time left of reads not started

    def submit(self, document_id: int) -> ReadStatus:
        """Queue a read of the document; one already queued or running is left as it is."""
        info = self.analysis.documents.get_document(document_id)
        title = info.title if info is not None else f"document {document_id}"
        with self._lock:
            current = self._reads.get(document_id)
            if current is None or current.state not in ACTIVE:
                read = _Read(document_id, title, (info.token_count or 0) if info is not None else 0)
                self._reads.pop(document_id, None)
                self._reads[document_id] = read
                self._waiting.append(read)
                self._forget_old()
                if self._thread is None:
                    self._thread = threading.Thread(target=self._work, name="read-ahead", daemon=True)
                    self._thread.start()
                self._wake.notify()
        return self.status(document_id)

    def cancel(self, document_id: int) -> None:
        with self._lock:
            read = self._reads.get(document_id)
        if read is not None:
            read.cancel.set()

    def status(self, document_id: int) -> ReadStatus | None:
        with self._lock:
            read = self._reads.get(document_id)
            return None if read is None else self._status(read)

    def statuses(self) -> list[ReadStatus]:
        """Every read still known: running and paused first, then the queue in order, then finished."""
        with self._lock:
            reads = list(self._reads.values())
            rank = {"reading": 0, "paused": 0, "queued": 1}
            order = sorted(reads, key=lambda r: (rank.get(r.state, 2), self._place(r) or 0))
            return [self._status(r) for r in order]

    def active(self) -> list[ReadStatus]:
        return [s for s in self.statuses() if s.active]

    def wait(self, document_id: int, timeout: float | None = None) -> ReadStatus | None:
        with self._lock:
            read = self._reads.get(document_id)
        if read is not None:
            read.finished.wait(timeout)
        return self.status(document_id)

    def owns(self, owner) -> bool:
        """Whether a model queue entry belongs to a read (reads queue under this worker's thread id)."""
        thread = self._thread
        return thread is not None and thread.ident == owner

    def _place(self, read: _Read) -> int | None:
        return next((n for n, r in enumerate(self._waiting, 1) if r is read), None)

    def _status(self, read: _Read) -> ReadStatus:
        rate = read.done / read.prefill_s if read.prefill_s > 0 and read.done else self._rate
        left = max(read.total - read.done, 0)
        eta = left / rate if rate > 0 and read.state in ACTIVE else None
        return ReadStatus(read.document_id, read.title, read.state, read.done, read.total, self._place(read),
                          eta, rate, read.yields, read.message)

    def _forget_old(self) -> None:
        finished = [i for i, r in self._reads.items() if r.state not in ACTIVE]
        for document_id in finished[: max(0, len(finished) - KEEP_FINISHED)]:
            del self._reads[document_id]

    def _work(self) -> None:
        while True:
            with self._lock:
                while not self._waiting:
                    self._wake.wait()
                read = self._waiting.popleft()
            try:
                self._read(read)
            except Exception as error:  # keep reading the others; the page says this one failed
                log.exception("reading %s ahead failed", read.title)
                self._finish(read, "failed", f"{type(error).__name__}: {error}")

    def _finish(self, read: _Read, state: ReadState, message: str = "") -> None:
        with self._lock:
            read.state, read.message = state, message
        read.finished.set()

    def _read(self, read: _Read) -> None:
        analysis = self.analysis
        info = analysis.documents.get_document(read.document_id)
        if info is None or read.cancel.is_set():
            return self._finish(read, "cancelled", "No longer in the library.")
        segments = [system_segment(analysis.tokenizer), analysis.document_segment(read.document_id)]
        prompt = sum(len(s.ids) for s in segments) + len(analysis.tokenizer.generation_prompt())
        if prompt + analysis.answer_reserve > analysis.context_limit:
            return self._finish(read, "skipped", "Longer than the model's context; it cannot be asked about alone.")
        keys = chain_keys(analysis.lm.fingerprint, segments)
        depends_on = [(), (info.sha256,)]
        state, index, base = None, 0, 0  # base: state.seen_tokens where segments[index] starts
        while True:
            try:
                with analysis.queue.turn(read.cancel, priority=READ) as turn:
                    with self._lock:
                        read.state = "reading"
                    covered, cached = analysis.cache.longest_prefix(keys)
                    if state is None or covered > index:  # first turn, or an answer read this meanwhile
                        index, state = covered, cached or analysis.lm.new_state()
                        base = state.seen_tokens
                        with self._lock:
                            read.total = read.done + sum(len(s.ids) for s in segments[index:])
                    stop = _Either(read.cancel, turn.yield_requested)
                    while index < len(segments):
                        self._prefill_segment(read, state, segments[index], base, stop)
                        analysis.cache.put(keys[index], state, depends_on[index])
                        index, base = index + 1, state.seen_tokens
                return self._finish(read, "done")
            except (Cancelled, PrefillCancelled):
                if read.cancel.is_set():
                    return self._finish(read, "cancelled", "Stopped.")
                with self._lock:
                    read.state = "paused"
                    read.yields += 1

    def _prefill_segment(self, read: _Read, state, segment: Segment, base: int, stop: _Either) -> None:
        """Prefill what is left of ``segment`` (a resumed read starts where it stopped)."""
        skip = state.seen_tokens - base
        done_before = read.done
        started = time.perf_counter()

        def progress(p: PrefillProgress) -> None:
            with self._lock:
                read.done = done_before + p.done
                read.prefill_s = prefill_before + (time.perf_counter() - started)
                if read.prefill_s > 0:
                    self._rate = read.done / read.prefill_s

        prefill_before = read.prefill_s
        prefill(self.analysis.lm, state, segment.ids[skip:], chunk_size=self.analysis.prefill_chunk,
                progress=progress, cancel=stop)
