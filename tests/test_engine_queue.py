"""The shared model's request queue: answers before reads, first come, first served among equals,
cancellable while waiting, a read asked to yield when an answer waits."""

from __future__ import annotations

import threading

import pytest

from app.services.engine import ANSWER, READ, Cancelled, ModelQueue


def test_turns_are_granted_in_arrival_order():
    lock = ModelQueue()
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
    lock = ModelQueue()
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
    lock = ModelQueue()
    with pytest.raises(RuntimeError), lock.turn():
        raise RuntimeError("boom")
    with lock.turn():
        pass


def hold(lock: ModelQueue, **turn):
    """A thread holding a turn until released; returns (started, release, turn box)."""
    started, release, box = threading.Event(), threading.Event(), []

    def holder():
        with lock.turn(**turn) as ticket:
            box.append(ticket)
            started.set()
            release.wait(5)

    thread = threading.Thread(target=holder)
    thread.start()
    assert started.wait(5)
    return thread, release, box[0]


def test_waiting_answers_go_before_waiting_reads_and_equals_keep_arrival_order():
    lock = ModelQueue()
    holder, release, _ = hold(lock)
    order, threads = [], []
    for name, priority in [("read1", READ), ("answer1", ANSWER), ("read2", READ), ("answer2", ANSWER)]:
        def waiter(name=name, priority=priority):
            with lock.turn(priority=priority, owner=name):
                order.append(name)

        thread = threading.Thread(target=waiter)
        thread.start()
        threads.append(thread)
        while lock.queued < len(threads):
            threading.Event().wait(0.005)
    assert [lock.position(n) for n in ("answer1", "answer2", "read1", "read2")] == [1, 2, 3, 4]
    assert [t.owner for t in lock.lineup()[1:]] == ["answer1", "answer2", "read1", "read2"]
    release.set()
    for thread in [holder, *threads]:
        thread.join(5)
    assert order == ["answer1", "answer2", "read1", "read2"]
    assert lock.position("read1") is None and lock.lineup() == []


def test_a_read_holding_the_model_is_asked_to_yield_only_when_an_answer_waits():
    lock = ModelQueue()
    holder, release, read = hold(lock, priority=READ, owner="read")
    assert lock.position("read") == 0
    cancel = threading.Event()

    def waiting_read():
        try:
            with lock.turn(cancel, priority=READ):
                pass
        except Cancelled:
            pass

    other_read = threading.Thread(target=waiting_read)
    other_read.start()
    while lock.queued < 1:
        threading.Event().wait(0.005)
    assert not read.yield_requested.is_set()
    answered = []
    def ask():
        with lock.turn(owner="answer"):
            answered.append(True)

    answer = threading.Thread(target=ask)
    answer.start()
    assert read.yield_requested.wait(5)
    release.set()
    answer.join(5)
    cancel.set()
    for thread in (holder, other_read):
        thread.join(5)
    assert answered == [True]


def test_an_answer_holding_the_model_is_never_asked_to_yield():
    lock = ModelQueue()
    holder, release, answer = hold(lock)
    done = []

    def ask():
        with lock.turn():
            done.append(True)

    second = threading.Thread(target=ask)
    second.start()
    while lock.queued < 1:
        threading.Event().wait(0.005)
    assert not answer.yield_requested.is_set()
    release.set()
    for thread in (holder, second):
        thread.join(5)
    assert done == [True]
