"""Uploads read a few at a time, in the order they arrived, on worker threads.

Reading a document runs in its own capped child process (see ``ingest.watchdog``), and each one
can take gigabytes and minutes (OCR), so only ``workers`` run at once; the rest wait in a queue
whose positions the Library page shows. Jobs outlive the browser tab that submitted them.
"""

from __future__ import annotations

import itertools
import logging
import threading
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

log = logging.getLogger(__name__)

JobState = Literal["queued", "reading", "done"]
# Finished jobs are kept this long so a tab that reloads can still show what happened.
KEEP_FINISHED = 500


@dataclass(frozen=True, slots=True)
class JobStatus:
    """One look at a job: where it is in the queue, how far reading got, and its result."""

    job_id: int
    filename: str
    state: JobState
    position: int | None = None
    phase: str | None = None
    done: int = 0
    total: int = 0
    result: Any | None = None


class UploadJob:
    def __init__(self, job_id: int, filename: str, data: bytes, after: UploadJob | None = None) -> None:
        self.id = job_id
        self.filename = filename
        self.data: bytes | None = data
        self.after = after
        self.state: JobState = "queued"
        self.progress: Any | None = None
        self.result: Any | None = None
        self.finished = threading.Event()


Reader = Callable[[bytes, str, Callable[[Any], None]], Any]


class UploadQueue:
    """First come, first served, ``workers`` at a time; ``read(data, filename, on_progress)`` does the work."""

    def __init__(self, read: Reader, workers: int = 2) -> None:
        if workers < 1:
            raise ValueError("workers must be at least 1")
        self._read = read
        self._workers = workers
        self._lock = threading.Condition()
        self._waiting: deque[UploadJob] = deque()
        self._jobs: OrderedDict[int, UploadJob] = OrderedDict()
        self._ids = itertools.count(1)
        self._threads: list[threading.Thread] = []

    def submit(self, data: bytes, filename: str, after: int | None = None) -> int:
        """Queue a file; with ``after``, it is read only once that job has finished (same content)."""
        with self._lock:
            job = UploadJob(next(self._ids), filename, data, self._jobs.get(after) if after is not None else None)
            self._jobs[job.id] = job
            self._waiting.append(job)
            self._forget_old()
            if len(self._threads) < self._workers:
                thread = threading.Thread(target=self._work, name=f"upload-{len(self._threads) + 1}", daemon=True)
                self._threads.append(thread)
                thread.start()
            self._lock.notify()
            return job.id

    def finish_now(self, filename: str, result: Any) -> int:
        """Record a job that needs no reading (a duplicate), so callers treat every file alike."""
        with self._lock:
            job = UploadJob(next(self._ids), filename, b"")
            job.data, job.state, job.result = None, "done", result
            job.finished.set()
            self._jobs[job.id] = job
            return job.id

    def status(self, job_id: int) -> JobStatus | None:
        with self._lock:
            job = self._jobs.get(job_id)
            if job is None:
                return None
            position = next((i for i, w in enumerate(self._waiting, 1) if w is job), None)
            progress = job.progress
            return JobStatus(
                job_id=job.id, filename=job.filename, state=job.state, position=position,
                phase=getattr(progress, "phase", None), done=getattr(progress, "done", 0),
                total=getattr(progress, "total", 0), result=job.result,
            )

    def wait(self, job_id: int, timeout: float | None = None) -> JobStatus | None:
        with self._lock:
            job = self._jobs.get(job_id)
        if job is not None:
            job.finished.wait(timeout)
        return self.status(job_id)

    def running(self) -> list[JobStatus]:
        """Every job not finished yet, queued ones in queue order after those being read."""
        with self._lock:
            ids = [j.id for j in self._jobs.values() if j.state == "reading"] + [j.id for j in self._waiting]
        return [s for s in (self.status(i) for i in ids) if s is not None]

    def _work(self) -> None:
        while True:
            with self._lock:
                while not self._waiting:
                    self._lock.wait()
                job = self._waiting.popleft()
                job.state = "reading"
                data, job.data = job.data, None
            if job.after is not None:
                job.after.finished.wait()
                job.after = None
            try:
                result = self._read(data or b"", job.filename, lambda p, job=job: self._progress(job, p))
            except Exception as error:  # the reader reports bad files itself; this is a bug, keep serving
                log.exception("reading %s failed", job.filename)
                result = error
            with self._lock:
                job.result, job.state = result, "done"
                job.finished.set()

    def _progress(self, job: UploadJob, progress: Any) -> None:
        with self._lock:
            job.progress = progress

    def _forget_old(self) -> None:
        finished = [i for i, j in self._jobs.items() if j.state == "done"]
        for job_id in finished[: max(0, len(finished) - KEEP_FINISHED)]:
            del self._jobs[job_id]
