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

The child is a fresh interpreter (``python -m ingest.worker``), not a fork: it inherits none of
the web server's threads, locks or model memory, and does not re-import the caller's main
module as ``multiprocessing`` would (Streamlit's script runner and test runners replace it).
Starting it costs a fifth of a second or so, which the time limit does not count.
Inside the child, :class:`Deadline` is also checked between pages and content operators, so a
slow document usually stops itself cleanly before it is killed.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import resource
import select
import signal
import struct
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from .errors import CORRUPT, TIMEOUT, TOO_LARGE, IngestError

T = TypeVar("T")
# How long the parent waits for a killed child to be reaped; SIGKILL cannot be ignored.
REAP_TIMEOUT_S = 5.0
# CPU seconds above the wall-clock budget: the parent's kill normally comes first.
CPU_SLACK_S = 5
# Starting Python and importing the readers takes well under a second; this bounds a stuck start.
STARTUP_TIMEOUT_S = 60.0


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
    cpu_s = int(limits.time_limit_s + limits.max_extension_s) + CPU_SLACK_S
    child = subprocess.Popen(
        [sys.executable, "-m", "ingest.worker", str(limits.memory_bytes), str(cpu_s)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, start_new_session=True, env=_child_environment(),
    )
    try:
        try:
            child.stdin.write(pickle.dumps((work, args, limits.time_limit_s), protocol=pickle.HIGHEST_PROTOCOL))
            child.stdin.close()
        except OSError:  # it died before reading its job; what it left says why
            pass
        return _await(child, child.stdout.fileno(), limits, progress)
    finally:
        _kill_group(child)
        child.stdout.close()


def _child_environment() -> dict[str, str]:
    """The caller's environment, with its module search path so the child finds ``work``."""
    package_root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    paths = [package_root, *(os.path.abspath(p) for p in sys.path if p)]
    return dict(os.environ, PYTHONPATH=os.pathsep.join(paths), PYTHONSAFEPATH="1")


def _await(child: subprocess.Popen, fd: int, limits: ChildLimits, progress: ProgressCallback | None) -> Any:
    limit_s = limits.time_limit_s
    # The clock starts once the child has its readers imported and its job read.
    expires_at = time.monotonic() + STARTUP_TIMEOUT_S
    extension_left = limits.max_extension_s
    while True:
        remaining = expires_at - time.monotonic()
        if remaining <= 0:
            raise timeout_error(limit_s)
        readable, _, _ = select.select([fd], [], [], remaining)
        if not readable:
            continue
        message = read_frame(fd)
        if message is None:
            raise _died(child, limits)
        kind, payload = message
        if kind == "ready":
            expires_at = time.monotonic() + limit_s
        elif kind == "progress":
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


def _died(child: subprocess.Popen, limits: ChildLimits) -> IngestError:
    """The pipe closed without a result: the child was killed (out of memory, CPU) or crashed."""
    try:
        code = child.wait(REAP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        code = None
    if code == -signal.SIGXCPU:
        return timeout_error(limits.time_limit_s)
    if code == -signal.SIGKILL:  # the kernel's out-of-memory killer
        return memory_error(limits.memory_bytes)
    if code is not None and code < 0 and -code in (signal.SIGSEGV, signal.SIGABRT, signal.SIGBUS):
        # Native parsers abort when an allocation fails under the address-space cap.
        return IngestError(
            CORRUPT,
            "Reading the file stopped unexpectedly; it may be damaged, or need more memory than allowed "
            f"({limits.memory_bytes / 2**30:g} GB).",
        )
    return IngestError(CORRUPT, "Reading the file stopped unexpectedly; it may be damaged or malformed.")


def _kill_group(child: subprocess.Popen) -> None:
    """Kill the child and anything it started (it leads its own process group), then reap it."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(child.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        child.wait(REAP_TIMEOUT_S)


# Messages between the processes: an 8-byte length, then a pickle.
_LENGTH = struct.Struct(">Q")


def write_frame(fd: int, message: Any) -> None:
    body = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    view = memoryview(_LENGTH.pack(len(body)) + body)
    while view:
        view = view[os.write(fd, view):]


def read_frame(fd: int) -> Any | None:
    """The next message, or None when the other side has gone (mid-message included)."""
    header = _read_exactly(fd, _LENGTH.size)
    if header is None:
        return None
    body = _read_exactly(fd, _LENGTH.unpack(header)[0])
    return None if body is None else pickle.loads(body)


def _read_exactly(fd: int, count: int) -> bytes | None:
    chunks: list[bytes] = []
    while count:
        chunk = os.read(fd, min(count, 1 << 20))
        if not chunk:
            return None
        chunks.append(chunk)
        count -= len(chunk)
    return b"".join(chunks)


def limit(which: int, value: int) -> None:
    """Lower a resource limit of this process (never above its hard limit)."""
    _, hard = resource.getrlimit(which)
    if hard != resource.RLIM_INFINITY:
        value = min(value, hard)
    resource.setrlimit(which, (value, hard))
