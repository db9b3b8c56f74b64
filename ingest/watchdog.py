"""Running an extraction in a child process that cannot outlive its time or memory budget.

Hostile or just unusual files can make a parser allocate gigabytes or loop for minutes inside
one library call, where no deadline check is reached. So every extraction runs in a child
process:

* the child's address space and CPU time are capped with ``setrlimit`` before any file byte is
  parsed, so a parser that runs away fails with ``MemoryError`` (or is killed) in the child;
* the parent waits on a pipe until the deadline and then kills the child's whole process group
  (OCR runs tesseract as a grandchild), and reaps it, before telling anyone the work stopped;
* the child reports progress (pages read, pages recognised) through the same pipe, and may ask
  for more time once, for OCR, within a bound the parent computed itself.

Children are forked from a ``forkserver`` that has the readers imported already, so a child
starts in milliseconds and never inherits the web server's threads or the model's memory.
Inside the child, :class:`Deadline` is also checked between pages and content operators, so a
slow document usually stops itself cleanly before it is killed.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import resource
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any, TypeVar

from .errors import CORRUPT, TIMEOUT, TOO_LARGE, IngestError

T = TypeVar("T")
# How long the parent waits for a killed child to be reaped; SIGKILL cannot be ignored.
REAP_TIMEOUT_S = 5.0
# CPU seconds above the wall-clock budget: the parent's kill normally comes first.
CPU_SLACK_S = 5
PRELOAD = ["ingest.pipeline"]


@dataclass(frozen=True, slots=True)
class Progress:
    """Where an extraction is: ``phase`` is "reading" (text layer) or "ocr" (page images)."""

    phase: str
    done: int
    total: int


ProgressCallback = Callable[[Progress], None]


class Deadline:
    """A point in monotonic time after which :meth:`check` raises a ``timeout`` IngestError.

    It also carries the progress channel, since both are what a reader needs from its runner.
    """

    __slots__ = ("limit_s", "_expires_at", "_report", "_extend")

    def __init__(
        self,
        limit_s: float,
        report: ProgressCallback | None = None,
        extend: Callable[[float], None] | None = None,
    ) -> None:
        self.limit_s = limit_s
        self._expires_at = time.monotonic() + limit_s
        self._report = report
        self._extend = extend

    @property
    def expired(self) -> bool:
        return time.monotonic() >= self._expires_at

    @property
    def remaining_s(self) -> float:
        return max(0.0, self._expires_at - time.monotonic())

    def check(self) -> None:
        if self.expired:
            raise timeout_error(self.limit_s)

    def extend(self, seconds: float) -> None:
        """Allow ``seconds`` more (OCR of many pages); the runner is told so it waits as long."""
        if seconds <= 0:
            return
        self.limit_s += seconds
        self._expires_at += seconds
        if self._extend is not None:
            self._extend(seconds)

    def report(self, phase: str, done: int, total: int) -> None:
        if self._report is not None:
            self._report(Progress(phase, done, total))


def timeout_error(limit_s: float) -> IngestError:
    return IngestError(
        TIMEOUT,
        f"Reading the file took longer than {limit_s:g} s and was stopped; "
        "it may be unusually complex or malformed.",
    )


def memory_error(limit_bytes: int) -> IngestError:
    return IngestError(
        TOO_LARGE,
        f"Reading the file needed more than {limit_bytes / 2**30:g} GB of memory and was stopped; "
        "it may be unusually large or malformed.",
    )


@dataclass(frozen=True, slots=True)
class ChildLimits:
    """What one child may use: wall-clock seconds, address space, and extra time it may claim."""

    time_limit_s: float
    memory_bytes: int
    max_extension_s: float = 0.0


def run_isolated(
    work: Callable[..., T],
    args: tuple[Any, ...],
    limits: ChildLimits,
    progress: ProgressCallback | None = None,
) -> T:
    """Run ``work(*args, deadline)`` in a limited child process; return its result or raise its error.

    ``work`` must be a module-level function (it is sent to the child by name). Raises a
    ``timeout`` IngestError once the deadline passes, after the child and everything it started
    are gone; a ``too_large`` one when the child ran out of its memory.
    """
    context = _context()
    receiver, sender = context.Pipe(duplex=False)
    child = context.Process(
        target=_child_main, args=(work, args, limits, sender), name="ingest-extract", daemon=True
    )
    child.start()
    sender.close()
    try:
        return _await(child, receiver, limits, progress)
    finally:
        _kill_group(child)
        receiver.close()


def _await(child: Any, receiver: Connection, limits: ChildLimits, progress: ProgressCallback | None) -> Any:
    limit_s = limits.time_limit_s
    expires_at = time.monotonic() + limit_s
    extension_left = limits.max_extension_s
    while True:
        remaining = expires_at - time.monotonic()
        if remaining <= 0:
            raise timeout_error(limit_s)
        try:
            ready = receiver.poll(remaining)
            message = receiver.recv() if ready else None
        except (EOFError, OSError):
            raise _died(child, limits) from None
        if message is None:
            continue
        kind, payload = message
        if kind == "progress":
            if progress is not None:
                progress(payload)
        elif kind == "extend":
            granted = min(float(payload), extension_left)
            extension_left -= granted
            limit_s += granted
            expires_at += granted
        elif kind == "ok":
            return payload
        elif kind == "error":
            raise payload
        else:
            raise RuntimeError(f"unexpected message from the extraction process: {kind!r}")


def _died(child: Any, limits: ChildLimits) -> IngestError:
    """The pipe closed without a result: the child was killed (out of memory, CPU) or crashed."""
    child.join(REAP_TIMEOUT_S)
    code = child.exitcode
    if code in (-signal.SIGXCPU, -signal.SIGKILL):
        return timeout_error(limits.time_limit_s) if code == -signal.SIGXCPU else memory_error(limits.memory_bytes)
    if code is not None and code < 0 and -code in (signal.SIGSEGV, signal.SIGABRT, signal.SIGBUS):
        # Native parsers abort when an allocation fails under the address-space cap.
        return IngestError(
            CORRUPT,
            "Reading the file stopped unexpectedly; it may be damaged, or need more memory than allowed "
            f"({limits.memory_bytes / 2**30:g} GB).",
        )
    return IngestError(CORRUPT, "Reading the file stopped unexpectedly; it may be damaged or malformed.")


def _kill_group(child: Any) -> None:
    """Kill the child and anything it started (it leads its own process group), then reap it."""
    if child.pid is None:
        return
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(child.pid, signal.SIGKILL)
    if child.is_alive():  # killed before it had made its own group
        child.kill()
    child.join(REAP_TIMEOUT_S)


def _child_main(work: Callable[..., Any], args: tuple[Any, ...], limits: ChildLimits, sender: Connection) -> None:
    os.setpgid(0, 0)
    _limit(resource.RLIMIT_AS, limits.memory_bytes)
    _limit(resource.RLIMIT_CPU, int(limits.time_limit_s + limits.max_extension_s) + CPU_SLACK_S)
    deadline = Deadline(
        limits.time_limit_s,
        report=lambda p: sender.send(("progress", p)),
        extend=lambda s: sender.send(("extend", s)),
    )
    try:
        result = work(*args, deadline)
    except IngestError as exc:
        sender.send(("error", exc))
    except MemoryError:
        sender.send(("error", memory_error(limits.memory_bytes)))
    except BaseException as exc:  # anything else is a programming error: keep its type and text
        sender.send(("error", RuntimeError(f"{type(exc).__name__}: {exc}")))
    else:
        try:
            sender.send(("ok", result))
        except MemoryError:
            sender.send(("error", memory_error(limits.memory_bytes)))
    finally:
        sender.close()


def _limit(which: int, value: int) -> None:
    _, hard = resource.getrlimit(which)
    if hard != resource.RLIM_INFINITY:
        value = min(value, hard)
    resource.setrlimit(which, (value, hard))


_CONTEXT: Any = None


def _context() -> Any:
    """A forkserver context with the readers preloaded (created once per process)."""
    global _CONTEXT
    if _CONTEXT is None:
        context = multiprocessing.get_context("forkserver")
        context.set_forkserver_preload(PRELOAD)
        _CONTEXT = context
    return _CONTEXT
