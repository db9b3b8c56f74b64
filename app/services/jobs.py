"""Streaming model calls on a worker thread.

A page run can be interrupted at any moment (a click reruns the script), so the model
call must not live inside it: the page polls a :class:`StreamJob` instead, and a Stop
click only sets the job's cancel event. The service still saves what it produced.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Protocol

from storage import MessageInfo, StorageError, SummaryInfo

log = logging.getLogger(__name__)


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


def describe_error(error: Exception) -> str:
    """Service and storage errors already speak to the user; anything else gets a plain prefix."""
    if isinstance(error, ValueError | StorageError):
        return str(error)
    return f"Generation failed ({type(error).__name__}: {error})."


class StreamJob:
    """One ask or summary call; ``label`` is what the user asked, shown while it runs."""

    def __init__(self, start: Starter, *, label: str = "") -> None:
        self.id = uuid.uuid4().hex
        self.label = label
        self._start = start
        self._lock = threading.Lock()
        self._cancel = threading.Event()
        self._finished = threading.Event()
        self._started_at = time.monotonic()
        self._answer: list[str] = []
        self._reasoning: list[str] = []
        self._progress: Any | None = None
        self._error: str | None = None
        self._message: MessageInfo | None = None
        self._summary: SummaryInfo | None = None
        self._thread = threading.Thread(target=self._run, name=f"stream-{self.id[:8]}", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            for event in self._start(self._on_progress, self._cancel):
                self._on_event(event)
        except Exception as error:
            log.exception("streaming call failed")
            with self._lock:
                self._error = describe_error(error)
        finally:
            self._finished.set()

    def _on_progress(self, progress: Any) -> None:
        with self._lock:
            self._progress = progress

    def _on_event(self, event: StreamEvent) -> None:
        with self._lock:
            if event.kind == "delta":
                (self._reasoning if event.channel == "reasoning" else self._answer).append(event.text)
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

    def snapshot(self) -> JobSnapshot:
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
            )
