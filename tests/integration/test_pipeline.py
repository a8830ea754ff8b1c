"""The compute pipeline on both brokers: while one batch computes in the compute thread, the event loop keeps
receiving, buffering and answering; results are stored (and messages acknowledged) in the order of the batches."""

from __future__ import annotations

import signal
import uuid

import numpy as np
import pytest
import redis
from celery.result import AsyncResult

from agent_workers.errors import InputError
from agent_workers.models import make_spec
from tests import plugins_batching  # noqa: F401 - registers the test architectures here too
from tests.conftest import Pool, unique
from tests.integration.test_envelope import _headers, publish_raw
from tests.integration.test_faults import wait_until
from tests.plugins_batching import GATE, gate_keys

pytestmark = pytest.mark.integration

RESULT_TIMEOUT = 30


def test_event_loop_receives_and_answers_while_a_batch_computes(broker: str, start_pool) -> None:
    # max_wait far beyond any timeout: every flush below happens because the broker went idle
    pool: Pool = start_pool(
        broker, queues="inference", plugins="tests.plugins_batching", max_wait_ms=60_000, pipeline_depth=2
    )
    assert pool.settings.batch.pipeline_depth == 2
    model = unique("gated")
    pool.store.create(model, make_spec("held", in_features=2))
    gate = redis.Redis.from_url(pool.settings.params_url)
    entered, go = gate_keys(pool.settings.namespace)

    def send(row: list[float]) -> AsyncResult:
        return pool.client.app.send_task("agent_workers.predict", kwargs={"model": model, "inputs": row})

    try:
        a = send([GATE, 1.0])
        assert gate.blpop([entered], timeout=RESULT_TIMEOUT), "batch A never reached its forward pass"
        # A is held in its forward pass. B is received (on Redis handed to the compute thread behind A; on RabbitMQ
        # a short batch waits in the buffer for the one in flight); a refused request published after B is answered
        # by the event loop alone: the loop moves while A computes.
        b = send([2.0, 3.0])
        refused = str(uuid.uuid4())
        publish_raw(pool, [(_headers(refused, retries="x"), [[], {"model": model, "inputs": [1.0, 1.0]}, {}])])
        with pytest.raises(InputError, match="retries"):
            pool.client.wait(refused, RESULT_TIMEOUT)
        c = send([4.0, 5.0])  # two batches in flight (Redis), or B and C buffered (RabbitMQ)
        assert not any(AsyncResult(h.id, app=pool.client.app).ready() for h in (a, b, c))
    finally:
        gate.rpush(go, 1)
    outputs = [pool.client.wait(h, RESULT_TIMEOUT)["outputs"] for h in (a, b, c)]
    np.testing.assert_allclose(np.array(outputs).ravel(), [GATE + 1.0, 5.0, 9.0])
    done = [AsyncResult(h.id, app=pool.client.app).date_done for h in (a, b, c)]
    assert done == sorted(done), f"results stored out of batch order: {done}"
    # RabbitMQ: B and C form one batch once A is done (Intake._short_on_amqp)
    batches = 3 if broker == "redis" else 2
    assert pool.metric("agent_workers_batch_size_count", {"model": model}) == batches


def test_warm_shutdown_finishes_the_batches_in_flight_and_the_buffer(broker: str, start_pool) -> None:
    pool: Pool = start_pool(
        broker, queues="inference", plugins="tests.plugins_batching", max_wait_ms=60_000, pipeline_depth=2
    )
    model = unique("gated")
    pool.store.create(model, make_spec("held", in_features=2))
    gate = redis.Redis.from_url(pool.settings.params_url)
    entered, go = gate_keys(pool.settings.namespace)

    def send(row: list[float]) -> AsyncResult:
        return pool.client.app.send_task("agent_workers.predict", kwargs={"model": model, "inputs": row})

    try:
        a = send([GATE, 1.0])
        assert gate.blpop([entered], timeout=RESULT_TIMEOUT), "batch A never reached its forward pass"
        b, c = send([2.0, 3.0]), send([4.0, 5.0])  # B in flight behind A, C buffered
        refused = str(uuid.uuid4())  # answered once the loop has taken B and C (one queue, in order)
        publish_raw(pool, [(_headers(refused, retries="x"), [[], {"model": model, "inputs": [1.0, 1.0]}, {}])])
        with pytest.raises(InputError):
            pool.client.wait(refused, RESULT_TIMEOUT)
        assert pool.worker.proc is not None
        pool.worker.proc.send_signal(signal.SIGTERM)
        wait_until(lambda: "Warm shutdown" in pool.worker.log(), RESULT_TIMEOUT, "the worker to begin its shutdown")
    finally:
        gate.rpush(go, 1)
    assert pool.worker.stop(timeout=RESULT_TIMEOUT) == 0
    outputs = [pool.client.wait(h, 5)["outputs"] for h in (a, b, c)]
    np.testing.assert_allclose(np.array(outputs).ravel(), [GATE + 1.0, 5.0, 9.0])
