"""Serving features of contract 1.1 on both brokers: deadlines shed before compute, priority order inside a batch,
read-your-writes (``min_version``), identical requests computed once, and a result cache that never answers from an
older version."""

from __future__ import annotations

import time

import numpy as np
import pytest
from celery.result import AsyncResult

import tests.plugins_batching  # noqa: F401 - registers the sleepy and order architectures
from agent_workers.errors import ModelError
from agent_workers.models import make_spec
from tests.conftest import Pool, reference, unique

pytestmark = pytest.mark.integration

PLUGINS = "tests.plugins_batching"


def _computed(pool: Pool, model: str) -> float:
    """Rows the model's forward passes computed so far."""
    return pool.metric("agent_workers_batch_size_sum", {"model": model})


def _revoked_reason(handle: AsyncResult) -> str:
    handle.get(timeout=30, propagate=False)
    assert handle.state == "REVOKED", f"{handle.state}: {handle.result!r}"
    return str(handle.result)


def test_request_past_its_deadline_is_revoked_before_compute(pool: Pool) -> None:
    model = unique("lin")
    pool.store.create(model, make_spec("linear", in_features=2))
    past_ms = int((time.time() - 5) * 1000)
    handle = pool.client.app.send_task(
        "agent_workers.predict", args=[model, [1.0, 2.0]], kwargs={"deadline_ms": past_ms}
    )
    assert "deadline" in _revoked_reason(handle)
    assert pool.client.predict(model, [1.0, 2.0], timeout=30)["version"] == 0
    assert _computed(pool, model) == 1, "the revoked request was computed"


def test_deadline_the_cost_model_says_cannot_be_met_is_revoked_before_compute(broker: str, start_pool) -> None:
    pool: Pool = start_pool(broker, queues="inference", plugins=PLUGINS)
    model = unique("sleepy")
    pool.store.create(model, make_spec("sleepy", in_features=2))
    for _ in range(2):  # the first batch of a model is not counted (warm-up); the second teaches it: ~300 ms
        assert pool.client.predict(model, [1.0, 2.0], timeout=30)["outputs"] == [3.0]
    soon_ms = int((time.time() + 0.1) * 1000)  # 100 ms: less than one forward pass
    handle = pool.client.app.send_task("agent_workers.predict", args=[model, [1.0, 2.0], None, None, soon_ms])
    assert "deadline" in _revoked_reason(handle)  # "cannot be met", or "passed" if it arrived late
    later_ms = int((time.time() + 600) * 1000)
    served = pool.client.app.send_task(
        "agent_workers.predict", args=[model, [2.0, 2.0]], kwargs={"deadline_ms": later_ms}
    )
    assert pool.client.wait(served, 30)["outputs"] == [4.0]
    assert _computed(pool, model) == 3, "the request that could not meet its deadline was computed"
    assert pool.metric("agent_workers_shed_total", {"reason": "deadline"}) == 1


def test_one_slow_batch_does_not_revoke_deadline_traffic_for_ever(broker: str, start_pool) -> None:
    pool: Pool = start_pool(broker, queues="inference", plugins=PLUGINS)
    model = unique("drowsy")
    pool.store.create(model, make_spec("drowsy", in_features=2))
    assert pool.client.predict(model, [1.0, 0.0], timeout=30)["outputs"] == [1.0]  # warm-up: not counted
    assert pool.client.predict(model, [1.0, 2.0], timeout=30)["outputs"] == [3.0]  # one 2 s batch: the only sample

    def due_soon(x: float) -> AsyncResult:  # needs ~1 ms, due in 1 s: the slow sample alone predicts a miss
        return pool.client.app.send_task(
            "agent_workers.predict", args=[model, [x, 0.0]], kwargs={"deadline_ms": int((time.time() + 1.0) * 1000)}
        )

    # Deadline-only traffic: a probe now and then measures the model again, and serving resumes.
    give_up = time.monotonic() + 30
    while True:
        handle = due_soon(2.0)
        handle.get(timeout=30, propagate=False)
        if handle.state == "SUCCESS":
            break
        assert "cannot be met" in str(handle.result) or "passed" in str(handle.result), handle.result
        assert time.monotonic() < give_up, "every deadline request is still revoked on the slow batch's prediction"
    for _ in range(5):
        handle = due_soon(3.0)
        assert pool.client.wait(handle, 30)["outputs"] == [3.0]


def test_priority_orders_the_rows_of_a_batch(broker: str, start_pool) -> None:
    # Published before the worker starts, so they reach it together and share batches.
    pool: Pool = start_pool(
        broker, queues="inference", start=False, plugins=PLUGINS, max_batch_size=16, max_wait_ms=1000
    )
    model = unique("order")
    pool.store.create(model, make_spec("order", in_features=2))
    priorities = [3, 9, 0, 6, 9, 0, 3, 6, 0, 9, 6, 3]
    handles = [
        pool.client.app.send_task("agent_workers.predict", args=[model, [float(k), float(p)]], priority=p)
        for k, p in enumerate(priorities)
    ]
    pool.worker.start()
    # One meaning per broker, the broker's own: RabbitMQ serves a higher priority first, kombu's Redis a lower one.
    rank = {p: (p if broker == "redis" else -p) for p in priorities}
    batches: dict[float, list[tuple[float, int]]] = {}
    for handle, p in zip(handles, priorities, strict=True):
        position, signature = pool.client.wait(handle, 60)["outputs"]
        batches.setdefault(signature, []).append((position, rank[p]))
    mixed = 0
    for rows in batches.values():
        ranks = [r for _, r in sorted(rows)]
        assert ranks == sorted(ranks), f"rows of one batch out of priority order: {sorted(rows)}"
        mixed += len(set(ranks)) > 1
    assert mixed, f"no batch mixed priorities ({batches}); the test proved nothing"


def test_min_version_is_served_from_that_version(pool: Pool) -> None:
    model = unique("lin")
    pool.store.create(model, make_spec("linear", in_features=2))
    x = [1.0, 2.0]
    assert pool.client.predict(model, x, timeout=30)["version"] == 0  # the worker now holds v0
    step = pool.client.wait(pool.client.send_train_step(model, x=[x], y=[[7.0]], hparams={"lr": 0.1}), 30)
    new = step["version"]
    result = pool.client.wait(
        pool.client.app.send_task("agent_workers.predict", kwargs={"model": model, "inputs": x, "min_version": new}), 30
    )
    assert result["version"] >= new
    np.testing.assert_allclose(
        result["outputs"], reference(pool, model, np.array([x]), result["version"])[0], rtol=1e-5, atol=1e-6
    )
    many = pool.client.wait(
        pool.client.app.send_task("agent_workers.predict_many", args=[model, [x]], kwargs={"min_version": new}), 30
    )
    assert many["version"] >= new


def test_min_version_beyond_the_head_fails_clearly(pool: Pool) -> None:
    model = unique("lin")
    pool.store.create(model, make_spec("linear", in_features=2))
    handle = pool.client.app.send_task("agent_workers.predict", args=[model, [1.0, 2.0]], kwargs={"min_version": 5})
    with pytest.raises(ModelError, match="min_version 5 was not reached"):
        pool.client.wait(handle, 30)
    many = pool.client.app.send_task(
        "agent_workers.predict_many", args=[model, [[1.0, 2.0]]], kwargs={"min_version": 5}
    )
    with pytest.raises(ModelError, match="min_version 5 was not reached"):
        pool.client.wait(many, 30)
    assert _computed(pool, model) == 0


def test_identical_requests_in_a_batch_are_computed_once(broker: str, start_pool) -> None:
    pool: Pool = start_pool(broker, queues="inference", start=False, max_batch_size=16, max_wait_ms=1000)
    model = unique("lin")
    pool.store.create(model, make_spec("linear", in_features=2))
    handles = [pool.client.app.send_task("agent_workers.predict", args=[model, [1.0, 2.0]]) for _ in range(12)]
    pool.worker.start()
    results = [pool.client.wait(h, 60) for h in handles]
    assert len({h.id for h in handles}) == 12
    expected = reference(pool, model, np.array([[1.0, 2.0]]))[0]
    for result in results:
        np.testing.assert_allclose(result["outputs"], expected, rtol=1e-5, atol=1e-6)
    passes = pool.metric("agent_workers_batch_size_count", {"model": model})
    assert _computed(pool, model) == passes, "a forward pass computed the same input twice"
    assert passes < 12, "the 12 identical requests never shared a batch"


def test_result_cache_never_answers_from_an_older_version(broker: str, start_pool) -> None:
    pool: Pool = start_pool(broker, result_cache_size=64)
    model = unique("lin")
    pool.store.create(model, make_spec("linear", in_features=2))
    x = [1.0, 2.0]
    first = pool.client.predict(model, x, timeout=30)
    again = pool.client.predict(model, x, timeout=30)
    assert again == first and first["version"] == 0
    assert pool.metric("agent_workers_result_cache_lookups_total", {"model": model, "outcome": "hit"}) == 1
    assert _computed(pool, model) == 1, "the repeat was computed, not served from the cache"
    step = pool.client.wait(pool.client.send_train_step(model, x=[x], y=[[7.0]], hparams={"lr": 0.1}), 30)
    after = pool.client.predict(model, x, timeout=30)
    assert after["version"] == step["version"] == 1
    np.testing.assert_allclose(after["outputs"], reference(pool, model, np.array([x]), 1)[0], rtol=1e-5, atol=1e-6)
    assert not np.allclose(after["outputs"], first["outputs"]), "the commit did not change the output"
    assert _computed(pool, model) == 2


def test_rabbitmq_queue_max_priority_hands_urgent_messages_over_first(start_pool) -> None:
    # A queue declared with x-max-priority (by the client and the worker alike) is ordered by the broker itself.
    pool: Pool = start_pool("rabbitmq", queues="inference", start=False, max_batch_size=1, queue_max_priority=10)
    assert pool.settings.queue_max_priority == 10
    model = unique("lin")
    pool.store.create(model, make_spec("linear", in_features=2))
    low = [pool.client.app.send_task("agent_workers.predict", args=[model, [1.0, 0.0]], priority=0) for _ in range(6)]
    high = [pool.client.app.send_task("agent_workers.predict", args=[model, [0.0, 1.0]], priority=9) for _ in range(6)]
    pool.worker.start()  # everything queued first, lows before highs: FIFO would serve the lows first
    for handle in low + high:
        pool.client.wait(handle, 60)
    done = sorted(
        (AsyncResult(h.id, app=pool.client.app).date_done, p) for h, p in [(h, 0) for h in low] + [(h, 9) for h in high]
    )
    first = [p for _, p in done[:6]]
    # the prefetch window (2 x max_batch_size) may take two lows before the broker sees the rest
    assert first.count(9) >= 4, f"priorities served in arrival order: {[p for _, p in done]}"
