"""Time limits for extraction.

Two mechanisms work together:

* a :class:`Deadline` that readers check between pages, blocks and even between PDF content
  operators, so a slow document stops itself promptly and releases its memory;
* :func:`run_with_time_limit`, which runs the extraction in a daemon thread and stops waiting
  when the limit passes, so the caller is never left hanging even if a single library call
  (decompressing one huge stream, say) does not return to a checkpoint in time.

Threads were chosen over a process pool: a worker process would have to re-import the readers
and copy up to hundreds of megabytes per upload, and fork-based pools are fragile inside a web
server with its own threads. Signals are no option because ``signal.alarm`` only works in the
main thread, which is not where a Streamlit script runs. The cost of a thread is that an
abandoned worker keeps running until its next deadline check; it is a daemon, so it never
blocks interpreter shutdown.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import TypeVar

from .errors import TIMEOUT, IngestError

T = TypeVar("T")


class Deadline:
    """A point in monotonic time after which :meth:`check` raises a ``timeout`` IngestError."""

    __slots__ = ("limit_s", "_expires_at")

    def __init__(self, limit_s: float) -> None:
        self.limit_s = limit_s
        self._expires_at = time.monotonic() + limit_s

    @property
    def expired(self) -> bool:
        return time.monotonic() >= self._expires_at

    def check(self) -> None:
        if self.expired:
            raise timeout_error(self.limit_s)


def timeout_error(limit_s: float) -> IngestError:
    return IngestError(
        TIMEOUT,
        f"Reading the file took longer than {limit_s:g} s and was stopped; "
        "it may be unusually complex or malformed.",
    )


def run_with_time_limit(work: Callable[[Deadline], T], limit_s: float) -> T:
    """Run ``work(deadline)`` in a daemon thread and return its result or re-raise its exception.

    Raises a ``timeout`` IngestError if the thread has not finished after ``limit_s`` seconds.
    """
    deadline = Deadline(limit_s)
    results: list[T] = []
    errors: list[BaseException] = []

    def target() -> None:
        try:
            results.append(work(deadline))
        except BaseException as exc:
            errors.append(exc)

    worker = threading.Thread(target=target, name="ingest-extract", daemon=True)
    worker.start()
    worker.join(limit_s)
    if errors:
        raise errors[0]
    if worker.is_alive() or not results:
        raise timeout_error(limit_s)
    return results[0]
