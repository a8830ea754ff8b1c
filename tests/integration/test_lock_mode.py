"""Lock mode against real workers (issue 22 finding 3): a commit lock left by a dead holder never holds up a worker's
event loop, and the lock a live holder keeps is renewed, so a dead one's lapses after ``AGENT_WORKERS_LOCK_TIMEOUT``."""

from __future__ import annotations

import time
from collections.abc import Callable

import pytest
import redis

from agent_workers.keys import Keys
from agent_workers.models import make_spec
from agent_workers.store.locks import CommitLock
from tests.conftest import REDIS, Pool, unique

pytestmark = pytest.mark.integration

TIMEOUT = 60.0


def wait_for_state(pool: Pool, task_id: str, state: str) -> None:
    deadline = time.monotonic() + TIMEOUT
    while pool.client.app.backend.get_task_meta(task_id).get("status") != state:
        assert time.monotonic() < deadline, f"{task_id} never reached {state}:\n{pool.worker.log()[-3000:]}"
        time.sleep(0.02)  # noqa: sleep-ok - a poll interval bounded by a deadline, not a synchronisation


def test_a_dead_holders_lock_does_not_delay_predictions_on_a_worker_of_both_queues(
    start_pool: Callable[..., Pool], broker: str
) -> None:
    pool = start_pool(broker, commit_mode="lock", track_started=1, max_wait_ms=1)
    trained, served = unique("locked"), unique("served")
    pool.store.create(trained, make_spec("linear", in_features=2))
    pool.store.create(served, make_spec("linear", in_features=2))
    # What a SIGKILLed trainer leaves behind: its token under the model's lock key, with a long expiry.
    lock_key = pool.store.keys.lock(trained)
    pool.store.client.set(lock_key, "token-of-a-dead-trainer", ex=600)
    step = pool.client.send_train_step(trained, x=[[0.1, 0.2]], y=[[1.0]])
    wait_for_state(pool, step.id, "STARTED")  # the group is waiting for the lock now
    answers = [pool.client.predict(served, [float(i), 1.0], timeout=TIMEOUT) for i in range(5)]
    assert [a["version"] for a in answers] == [0] * 5
    # Every prediction was answered while the step still waited for the lock: it has not committed.
    assert pool.client.app.backend.get_task_meta(step.id)["status"] == "STARTED"
    assert pool.store.head(trained).version == 0
    pool.store.client.delete(lock_key)  # the dead holder's lock lapses
    assert pool.client.wait(step, TIMEOUT)["version"] == 1


def test_a_live_holder_renews_its_lock_and_a_dead_ones_lapses(redis_up: None) -> None:
    client = redis.Redis.from_url(f"{REDIS}/2")
    keys = Keys("tlk" + unique("")[1:])
    lock = CommitLock(client, keys, timeout=1.0, wait=30)
    with lock.hold("m"):
        # Hold it for 2.5 lifetimes of the lock: the renewals (every third of it) keep it alive.
        for _ in range(10):
            time.sleep(0.25)  # noqa: sleep-ok - the holder doing slow work, not a synchronisation
            assert client.exists(keys.lock("m")) and 0 < client.pttl(keys.lock("m")) <= 1000
    assert not client.exists(keys.lock("m"))
    # A token left with the lock's own lifetime (as a holder killed mid-hold leaves it) lapses by itself.
    client.set(keys.lock("m"), "dead", px=300)
    with lock.hold("m"):
        assert client.get(keys.lock("m")) != b"dead"
