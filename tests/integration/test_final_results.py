"""One task id, one final answer: stored results are never replaced, redelivered answered requests not recomputed."""

from __future__ import annotations

import json
import uuid

import pytest
from celery import states
from celery.result import AsyncResult

from agent_workers.models import make_spec
from agent_workers.worker.requests import Pending
from agent_workers.worker.results import Outcome, ResultWriter
from tests.conftest import Pool, unique
from tests.integration.test_restore import redeliver

pytestmark = pytest.mark.integration


def _outcome(task_id: str, state: str, result: object) -> Outcome:
    return Outcome(Pending(task_id, "agent_workers.predict", None, [], {}, {}, 0.0, None), state, result)


def test_a_final_result_is_never_replaced(pool: Pool) -> None:
    writer = ResultWriter(pool.client.app)
    task_id = str(uuid.uuid4())
    assert writer.write([_outcome(task_id, states.STARTED, {"pid": None})]) == [True]
    assert writer.write([_outcome(task_id, states.SUCCESS, {"outputs": [1.0]})]) == [True]
    later = [
        _outcome(task_id, states.RETRY, RuntimeError("late retry")),
        _outcome(task_id, states.FAILURE, RuntimeError("late failure")),
        _outcome(task_id, states.SUCCESS, {"outputs": [2.0]}),
    ]
    assert writer.write(later) == [False, False, False]
    result = AsyncResult(task_id, app=pool.client.app)
    assert result.state == states.SUCCESS and result.result == {"outputs": [1.0]}
    assert writer.final_states([task_id, str(uuid.uuid4())]) == {task_id: states.SUCCESS}


def test_redelivered_request_with_a_stored_answer_is_acknowledged_not_recomputed(broker: str, start_pool) -> None:
    pool: Pool = start_pool(broker, queues="inference", start=False, max_wait_ms=20)
    model = unique("lin")
    pool.store.create(model, make_spec("linear", in_features=2))
    task_id = str(uuid.uuid4())
    stored = {"model": model, "version": 0, "outputs": [42.0]}  # not what the model computes: recomputing shows
    ResultWriter(pool.client.app).write([_outcome(task_id, states.SUCCESS, stored)])
    # A real redelivery (the broker's flag, or our Redis restore's marker): a producer's header is not trusted.
    redeliver(
        pool,
        {"lang": "py", "task": "agent_workers.predict", "id": task_id, "retries": 0},
        [[model, [1.0, 2.0]], {}, {}],
    )
    pool.worker.start()
    # Two requests after it: the batcher serves flushes one at a time in one thread, so once the second is
    # answered, the flush that held the redelivered message has finished.
    for _ in range(2):
        assert pool.client.predict(model, [1.0, 2.0], timeout=30)["version"] == 0
    assert pool.client.wait(task_id, 30) == stored
    # Not recomputed: not counted as a solo attempt, and only the two follow-ups went through the model.
    assert not pool.store.client.exists(pool.store.keys.deliveries(task_id))
    assert pool.metric("agent_workers_batch_size_sum", {"model": model}) == 2
    raw = pool.client.app.backend.client.get(pool.client.app.backend.get_key_for_task(task_id))
    assert json.loads(raw)["result"] == stored


def test_one_failed_command_of_the_result_write_costs_only_its_own_outcome(pool: Pool) -> None:
    writer = ResultWriter(pool.client.app)
    backend = pool.client.app.backend
    ids = [str(uuid.uuid4()) for _ in range(3)]
    backend.client.rpush(backend.get_key_for_task(ids[1]), "not a result")  # its GET raises WRONGTYPE
    try:
        stored = writer.write([_outcome(t, states.SUCCESS, {"outputs": [1.0]}) for t in ids])
        assert stored == [True, None, True]  # None: not stored, tried again later; the others stand
        assert AsyncResult(ids[0], app=pool.client.app).state == states.SUCCESS
        assert AsyncResult(ids[2], app=pool.client.app).state == states.SUCCESS
    finally:
        backend.client.delete(*(backend.get_key_for_task(t) for t in ids))
