"""One model shared by every browser tab: requests take turns in arrival order."""

from __future__ import annotations

import threading
from collections import deque
from contextlib import contextmanager


class FifoLock:
    """A lock granted strictly first come, first served (threading.Lock makes no promise)."""

    def __init__(self):
        self._condition = threading.Condition()
        self._waiting: deque[object] = deque()
        self._held = False

    @contextmanager
    def turn(self, cancel: threading.Event | None = None):
        ticket = object()
        with self._condition:
            self._waiting.append(ticket)
            while self._held or self._waiting[0] is not ticket:
                if cancel is not None and cancel.is_set():
                    self._waiting.remove(ticket)
                    self._condition.notify_all()
                    raise Cancelled()
                self._condition.wait(timeout=0.1)
            self._waiting.popleft()
            self._held = True
        try:
            yield
        finally:
            with self._condition:
                self._held = False
                self._condition.notify_all()

    @property
    def queued(self) -> int:
        with self._condition:
            return len(self._waiting)


class Cancelled(Exception):
    """The request was cancelled while waiting for its turn."""
