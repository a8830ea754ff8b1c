"""Faults on both brokers: SIGKILL mid-batch, SIGTERM with a half-filled batch, a poison request."""

from __future__ import annotations

import time

import pytest
import redis
from celery.result import AsyncResult
from kombu import Connection

from agent_workers.errors import ModelError
from agent_workers.models import make_spec
from tests import plugins_batching  # noqa: F401 - registers the test architectures here too
from tests.conftest import Pool, unique

pytestmark = pytest.mark.integration

# Redis redelivers an unacknowledged message only after the visibility timeout; keep it short here.
FAST_REDELIVERY = {"visibility_timeout": 4, "task_time_limit": 2}


def stored(pool: Pool, ids: list[str]) -> int:
    """How many of ``ids`` have a result in the backend right now."""
    backend = pool.client.app.backend
    client = redis.Redis.from_url(pool.settings.result_backend)
    keys = [backend.get_key_for_task(i) for i in ids]
    return sum(client.exists(*keys[i : i + 500]) for i in range(0, len(keys), 500))


def queue_depth(pool: Pool) -> int:
    """Messages still waiting in the broker (not yet delivered to a worker)."""
    with Connection(pool.settings.broker_url) as conn:
        if pool.settings.broker_is_redis:
            return int(conn.default_channel.client.llen(pool.settings.inference_queue))
        return int(conn.default_channel.queue_declare(pool.settings.inference_queue, passive=True).message_count)


def wait_until(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.05)  # noqa: sleep-ok - poll interval of a deadline-bounded wait


def test_sigkill_mid_load_loses_nothing(broker: str, start_pool) -> None:
    # 8 requests per batch at 20 ms a batch: ~2 s of work, so the kill lands mid-load.
    pool: Pool = start_pool(
        broker,
        queues="inference",
        max_wait_ms=20,
        max_batch_size=8,
        plugins="tests.plugins_batching",
        **FAST_REDELIVERY,
    )
    model = unique("slow")
    pool.store.create(model, make_spec("slow", in_features=2))
    ids = [pool.client.app.send_task("agent_workers.predict", args=[model, [float(i), 1.0]]).id for i in range(800)]
    wait_until(lambda: stored(pool, ids) >= 50, 60, "the first results")
    pool.worker.kill()
    pool.worker.proc.wait(10)
    done_before = stored(pool, ids)
    assert done_before < len(ids), "the worker finished everything before the kill; the test proved nothing"
    pool.worker.start()  # the replacement (as systemd or Kubernetes would start it)
    results = [AsyncResult(i, app=pool.client.app).get(timeout=90) for i in ids]
    assert [r["outputs"] for r in results] == [[float(i) + 1.0] for i in range(800)]
    served_after = pool.metric("agent_workers_requests_total", {"model": model, "outcome": "success"})
    redelivered = served_after - (len(ids) - done_before)
    assert redelivered >= 0
    print(
        f"\n[{broker}] SIGKILL with {done_before}/800 stored: the replacement served {served_after:.0f}, "
        f"of which {redelivered:.0f} had been computed before the kill but not acknowledged (delivered twice)"
    )


def test_sigterm_serves_the_half_filled_batch(broker: str, start_pool) -> None:
    # A batch that would wait a minute to fill: only the shutdown flush can finish it in time.
    pool: Pool = start_pool(broker, queues="inference", max_wait_ms=60000, max_batch_size=64, flush_when_idle="false")
    model = unique("lin")
    pool.store.create(model, make_spec("linear", in_features=2))
    handles = [pool.client.app.send_task("agent_workers.predict", args=[model, [float(i), 0.0]]) for i in range(10)]
    wait_until(lambda: queue_depth(pool) == 0, 30, "the worker to take all 10 messages")
    assert all(h.state == "PENDING" for h in handles), "a request finished before the shutdown"
    assert pool.worker.stop(timeout=30) == 0
    for handle in handles:
        assert handle.get(timeout=5)["version"] == 0


def test_poison_request_fails_alone_after_bounded_attempts(broker: str, start_pool) -> None:
    pool: Pool = start_pool(
        broker, queues="inference", max_wait_ms=200, plugins="tests.plugins_batching", **FAST_REDELIVERY
    )
    from tests.plugins_batching import crashy_spec

    model = unique("crashy")
    pool.store.create(model, crashy_spec())
    rows = [[float(i), 1.0] for i in range(20)]
    rows[7] = [666.0, 1.0]
    handles = [pool.client.app.send_task("agent_workers.predict", args=[model, row]) for row in rows]
    restarts = 0
    deadline = time.monotonic() + 120
    while not all(h.ready() for h in handles):
        assert time.monotonic() < deadline, f"not done after {restarts} restarts"
        if pool.worker.proc.poll() is not None:  # the poison took it down: restart it, as systemd/k8s would
            assert pool.worker.proc.returncode == 17
            restarts += 1
            assert restarts <= 3, "the poison request keeps crashing workers: a redelivery loop"
            pool.worker.start(wait=False)  # it may take the poison again before it is ready: the loop sees it
        time.sleep(0.05)  # noqa: sleep-ok - poll interval of a deadline-bounded wait
    with pytest.raises(ModelError, match="poison message"):
        pool.client.wait(handles[7], 5)
    for i, handle in enumerate(handles):
        if i != 7:
            assert pool.client.wait(handle, 5)["outputs"] == [rows[i][0] + 1.0]
    assert restarts == 3  # once in its first batch, then alone twice; the fourth delivery is refused
