"""Optimistic trainers' turns on the real Redis: a held turn keeps a second trainer out until it is released, and a
turn nobody gives back (a dead holder, or a lock-mode holder) delays a trainer by one lease at most, never blocks it."""

from __future__ import annotations

import threading
import time

import pytest
import redis

from agent_workers.keys import Keys
from agent_workers.store.locks import CommitLock
from tests.conftest import REDIS, unique

pytestmark = pytest.mark.integration

DEADLINE = 10.0


def test_a_held_turn_keeps_the_next_trainer_out_until_it_is_given_back(redis_up: None) -> None:
    client = redis.Redis.from_url(f"{REDIS}/2")
    keys = Keys("ttn" + unique("")[1:])
    first, second = CommitLock(client, keys, timeout=5), CommitLock(client, keys, timeout=5)
    entered = threading.Event()
    seen: dict[str, float] = {}

    def take_turn() -> None:
        with second.turn("m", lease=DEADLINE):
            seen["entered"] = time.monotonic()
            entered.set()

    with first.turn("m", lease=DEADLINE):
        other = threading.Thread(target=take_turn)
        other.start()
        # A bounded wait for something that must NOT happen while the first turn is held.
        assert not entered.wait(0.3), "a second trainer walked while the first held its turn"
        released = time.monotonic()
    assert entered.wait(DEADLINE), "the second trainer never got its turn"
    other.join(DEADLINE)
    assert seen["entered"] >= released
    assert not client.exists(keys.lock("m"))  # each turn was given back


def test_a_turn_nobody_gives_back_delays_a_trainer_one_lease_and_is_left_alone(redis_up: None) -> None:
    client = redis.Redis.from_url(f"{REDIS}/2")
    keys = Keys("ttn" + unique("")[1:])
    client.set(keys.lock("m"), "token-of-a-dead-trainer", ex=600)
    started = time.monotonic()
    with CommitLock(client, keys, timeout=5).turn("m", lease=0.3):
        waited = time.monotonic() - started
    assert 0.25 <= waited < DEADLINE  # it went ahead without a turn after about one lease (redis-py polls)
    assert client.get(keys.lock("m")) == b"token-of-a-dead-trainer"  # and did not release what it never held
    client.delete(keys.lock("m"))


def test_a_shorter_wait_lets_a_mixed_worker_go_ahead_long_before_the_lease(redis_up: None) -> None:
    """A worker that also serves predictions waits for a turn on its event loop at most ``wait``, not a lease."""
    client = redis.Redis.from_url(f"{REDIS}/2")
    keys = Keys("ttn" + unique("")[1:])
    client.set(keys.lock("m"), "token-of-a-dead-trainer", ex=600)
    started = time.monotonic()
    with CommitLock(client, keys, timeout=5).turn("m", lease=DEADLINE, wait=0.05):
        waited = time.monotonic() - started
    assert waited < DEADLINE / 2  # went ahead after its wait: a whole lease would be DEADLINE
    assert client.get(keys.lock("m")) == b"token-of-a-dead-trainer"
    client.delete(keys.lock("m"))
