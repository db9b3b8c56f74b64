"""The shared model's request queue: first come, first served, cancellable while waiting."""

from __future__ import annotations

import threading

import pytest

from app.services.engine import Cancelled, FifoLock


def test_turns_are_granted_in_arrival_order():
    lock = FifoLock()
    order, arrived = [], []
    holder_started, release_holder = threading.Event(), threading.Event()

    def holder():
        with lock.turn():
            holder_started.set()
            release_holder.wait(5)

    def waiter(name):
        arrived.append(name)
        with lock.turn():
            order.append(name)

    first = threading.Thread(target=holder)
    first.start()
    holder_started.wait(5)
    threads = []
    for name in "abcde":
        thread = threading.Thread(target=waiter, args=(name,))
        thread.start()
        threads.append(thread)
        while lock.queued < len(threads):  # make arrival order deterministic
            threading.Event().wait(0.005)
    release_holder.set()
    for thread in [first, *threads]:
        thread.join(5)
    assert order == arrived == list("abcde")


def test_cancel_while_waiting_leaves_the_queue():
    lock = FifoLock()
    cancel = threading.Event()
    outcome = []
    with lock.turn():
        def waiter():
            try:
                with lock.turn(cancel):
                    outcome.append("ran")
            except Cancelled:
                outcome.append("cancelled")

        thread = threading.Thread(target=waiter)
        thread.start()
        while lock.queued < 1:
            threading.Event().wait(0.005)
        cancel.set()
        thread.join(5)
    assert outcome == ["cancelled"]
    assert lock.queued == 0
    with lock.turn():
        pass


def test_an_error_inside_a_turn_releases_it():
    lock = FifoLock()
    with pytest.raises(RuntimeError), lock.turn():
        raise RuntimeError("boom")
    with lock.turn():
        pass
