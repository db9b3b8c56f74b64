"""One model shared by every browser tab: requests take turns, the most urgent first.

Answers and summaries (someone is watching) go before reads ahead of time (nobody waits for
them yet); requests of equal urgency go in arrival order. A read holding the model is asked
to yield when an answer starts waiting: it stops at its next prefill chunk boundary, gives
the turn back and queues again (see ``services.reading``).
"""

from __future__ import annotations

import itertools
import threading
from collections.abc import Hashable
from contextlib import contextmanager
from dataclasses import dataclass, field

# Lower goes first.
ANSWER = 0
READ = 1


@dataclass(eq=False)
class Turn:
    """One request's place: ``owner`` names who asked (by default the calling thread's id, so a
    job running on its own thread can look up its place); ``yield_requested`` is set while it
    holds the model and a more urgent request waits."""

    priority: int
    order: int
    owner: Hashable
    yield_requested: threading.Event = field(default_factory=threading.Event)


class ModelQueue:
    """A lock granted to the most urgent waiting request, ties first come, first served
    (threading.Lock makes no promise about order)."""

    def __init__(self):
        self._condition = threading.Condition()
        self._waiting: list[Turn] = []  # kept in grant order
        self._holder: Turn | None = None
        self._orders = itertools.count()

    @contextmanager
    def turn(self, cancel: threading.Event | None = None, *, priority: int = ANSWER, owner: Hashable | None = None):
        """Wait for the model, then hold it for the ``with`` block, which gets the :class:`Turn`.

        Raises :class:`Cancelled` when ``cancel`` is set while still waiting."""
        ticket = Turn(priority, next(self._orders), threading.get_ident() if owner is None else owner)
        with self._condition:
            self._waiting.append(ticket)
            self._waiting.sort(key=lambda t: (t.priority, t.order))
            self._ask_holder_to_yield()
            while self._holder is not None or self._waiting[0] is not ticket:
                if cancel is not None and cancel.is_set():
                    self._waiting.remove(ticket)
                    self._condition.notify_all()
                    raise Cancelled()
                self._condition.wait(timeout=0.1)
            self._waiting.pop(0)
            self._holder = ticket
            self._ask_holder_to_yield()
        try:
            yield ticket
        finally:
            with self._condition:
                self._holder = None
                self._condition.notify_all()

    def _ask_holder_to_yield(self) -> None:
        if self._holder is not None and self._waiting and self._waiting[0].priority < self._holder.priority:
            self._holder.yield_requested.set()

    def position(self, owner: Hashable) -> int | None:
        """0 while ``owner`` holds the model, n when it is n-th in line, None when it is in neither."""
        with self._condition:
            if self._holder is not None and self._holder.owner == owner:
                return 0
            return next((n for n, t in enumerate(self._waiting, 1) if t.owner == owner), None)

    def lineup(self) -> list[Turn]:
        """The holder (if any) followed by the waiting requests in the order they will run."""
        with self._condition:
            return ([self._holder] if self._holder is not None else []) + list(self._waiting)

    def ahead_of(self, owner: Hashable) -> list[Turn] | None:
        """The requests that will have the model before ``owner``'s (the holder first), None when
        ``owner`` is not waiting."""
        with self._condition:
            index = next((i for i, t in enumerate(self._waiting) if t.owner == owner), None)
            if index is None:
                return None
            return ([self._holder] if self._holder is not None else []) + self._waiting[:index]

    @property
    def queued(self) -> int:
        with self._condition:
            return len(self._waiting)


class Cancelled(Exception):
    """The request was cancelled while waiting for its turn."""
