"""The Redis transport's wait between pops: a worker with several lists watches where traffic is and waits briefly
right after it (a windowed producer's next message is due within milliseconds), backing off while quiet.

Before, the watched list rotated blindly and every wait was a quarter second: a worker consuming both queues left a
windowed trainer (``Client.train``, the demo) waiting ~250 ms every few groups (38 steps/s with the CPU idle)."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

from agent_workers.worker.kombu_redis import DEFAULT_WAKE_INTERVAL, MIN_WAKE_INTERVAL, Channel

QUEUES = ["t.inference", "t.training"]


def channel(**options: Any) -> Any:
    """The attributes the wait policy reads off a kombu channel."""
    return SimpleNamespace(
        sep="\x06\x16", connection=SimpleNamespace(client=SimpleNamespace(transport_options=options))
    )


def test_a_worker_on_two_queues_watches_the_queue_that_last_delivered_and_waits_briefly() -> None:
    ch = channel()
    Channel._after_pop(
        ch, [("t.inference", b"a", False, "1"), ("t.training\x06\x163", b"b", False, "2")]
    )  # a priority sub-list
    assert [Channel._watched(ch, QUEUES) for _ in range(3)] == ["t.training"] * 3
    assert Channel._wake.fget(ch) == MIN_WAKE_INTERVAL


def test_quiet_wake_ups_back_off_to_the_wake_interval_and_rotate_the_watched_queue() -> None:
    ch = channel()
    Channel._after_pop(ch, [("t.training", b"a")])
    waits = []
    for _ in range(12):
        Channel._after_pop(ch, [])
        waits.append(Channel._wake.fget(ch))
    assert waits == sorted(waits) and waits[0] == 2 * MIN_WAKE_INTERVAL and waits[-1] == DEFAULT_WAKE_INTERVAL
    assert {Channel._watched(ch, QUEUES) for _ in range(2)} == set(QUEUES)
    Channel._after_pop(ch, [("t.inference", b"c")])  # traffic again: brief waits on the queue it came from
    assert (Channel._watched(ch, QUEUES), Channel._wake.fget(ch)) == ("t.inference", MIN_WAKE_INTERVAL)


def test_the_wake_interval_option_still_caps_every_wait() -> None:
    ch = channel(wake_interval=0.01)
    for _ in range(10):
        Channel._after_pop(ch, [])
    assert Channel._wake.fget(ch) == 0.01
