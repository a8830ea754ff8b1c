"""The Redis transport's wait between pops: a worker with several lists watches where traffic is and waits briefly
right after it (a windowed producer's next message is due within milliseconds), backing off while quiet.

Before, the watched list rotated blindly and every wait was a quarter second: a worker consuming both queues left a
windowed trainer (``Client.train``, the demo) waiting ~250 ms every few groups (38 steps/s with the CPU idle)."""

from __future__ import annotations

from agent_workers.worker.redis_wait import DEFAULT_WAKE_INTERVAL, MIN_WAKE_INTERVAL, WakePolicy

QUEUES = ["t.inference", "t.training"]
SEP = "\x06\x16"  # kombu's priority separator


def test_a_worker_on_two_queues_watches_the_queue_that_last_delivered_and_waits_briefly() -> None:
    ch = WakePolicy(SEP)
    ch.after_pop([("t.inference", b"a", False, "1"), ("t.training\x06\x163", b"b", False, "2")])  # a priority sub-list
    assert [ch.watched(QUEUES) for _ in range(3)] == ["t.training"] * 3
    assert ch.wait == MIN_WAKE_INTERVAL


def test_quiet_wake_ups_back_off_to_the_wake_interval_and_rotate_the_watched_queue() -> None:
    ch = WakePolicy(SEP)
    ch.after_pop([("t.training", b"a")])
    waits = []
    for _ in range(12):
        ch.after_pop([])
        waits.append(ch.wait)
    assert waits == sorted(waits) and waits[0] == 2 * MIN_WAKE_INTERVAL and waits[-1] == DEFAULT_WAKE_INTERVAL
    assert {ch.watched(QUEUES) for _ in range(2)} == set(QUEUES)
    ch.after_pop([("t.inference", b"c")])  # traffic again: brief waits on the queue it came from
    assert (ch.watched(QUEUES), ch.wait) == ("t.inference", MIN_WAKE_INTERVAL)


def test_the_wake_interval_option_still_caps_every_wait() -> None:
    ch = WakePolicy(SEP, ceiling=0.01)
    for _ in range(10):
        ch.after_pop([])
    assert ch.wait == 0.01
