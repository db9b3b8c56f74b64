"""The extraction child process: ``python -m ingest.worker MEMORY_BYTES CPU_SECONDS``.

It caps its own address space and CPU time before reading anything, reads one pickled job
``(work, args, time_limit_s)`` from stdin, and answers on stdout with framed messages (see
:mod:`ingest.watchdog`): "ready", any "progress"/"extend", then "ok" or "error".
"""

from __future__ import annotations

import os
import pickle
import resource
import sys

from ingest.errors import IngestError
from ingest.watchdog import Deadline, limit, memory_error, write_frame


def main(argv: list[str]) -> int:
    memory_bytes, cpu_s = int(argv[0]), int(argv[1])
    limit(resource.RLIMIT_AS, memory_bytes)
    limit(resource.RLIMIT_CPU, cpu_s)
    # The protocol gets its own descriptor; anything a library prints goes to stderr instead.
    channel = os.dup(sys.stdout.fileno())
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
    work, args, time_limit_s = pickle.loads(sys.stdin.buffer.read())
    write_frame(channel, ("ready", None))
    deadline = Deadline(
        time_limit_s,
        report=lambda progress: write_frame(channel, ("progress", progress)),
        extend=lambda seconds: write_frame(channel, ("extend", seconds)),
    )
    try:
        result = ("ok", work(*args, deadline))
    except IngestError as exc:
        result = ("error", exc)
    except MemoryError:
        result = ("error", memory_error(memory_bytes))
    except Exception as exc:  # a programming error: keep its type and text for the caller's log
        result = ("error", RuntimeError(f"{type(exc).__name__}: {exc}"))
    try:
        write_frame(channel, result)
    except MemoryError:
        write_frame(channel, ("error", memory_error(memory_bytes)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
