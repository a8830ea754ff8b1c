"""Flower's HTTP API as another application uses it, on both brokers: send a task by name, read its result, and see
every request of a dynamically batched burst in ``/api/tasks`` with its state, runtime and arguments."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from agent_workers.models import make_spec
from tests.conftest import Pool, unique
from tests.e2e.conftest import Flower, wait_for, worker_node

pytestmark = pytest.mark.e2e

BATCH = 20


def test_send_task_through_flower_and_read_the_result(pool: Pool, flower: Flower) -> None:
    model = unique("lin")
    pool.store.create(model, make_spec("linear", in_features=3), seed=4)
    row = [0.5, -1.0, 2.0]
    expected = pool.client.predict(model, row, timeout=30)

    sent = flower.post(
        "/api/task/send-task/agent_workers.predict", {"args": [model, row], "queue": pool.settings.inference_queue}
    )
    assert sent.status_code == 200, sent.text
    task_id = sent.json()["task-id"]

    waited = flower.get(f"/api/task/result/{task_id}", timeout=30)
    assert waited.status_code == 200, waited.text
    # Flower reports the state read *before* its wait, so ask again for the settled one.
    final = wait_for("the result to read SUCCESS", lambda: _settled(flower, task_id), 30)
    assert final["result"] == expected == waited.json()["result"]


def test_flower_api_refuses_requests_without_credentials(flower: Flower) -> None:
    assert flower.get("/api/tasks", auth=False).status_code == 401
    assert flower.post("/api/task/send-task/agent_workers.predict", {"args": []}, auth=False).status_code == 401


def test_a_failed_request_shows_its_error_through_flower(pool: Pool, flower: Flower) -> None:
    model = unique("lin")
    pool.store.create(model, make_spec("linear", in_features=3))
    sent = flower.post(
        "/api/task/send-task/agent_workers.predict",
        {"args": [model, [1.0, 2.0]], "queue": pool.settings.inference_queue},
    )
    task_id = sent.json()["task-id"]
    final = wait_for("the request to fail", lambda: _settled(flower, task_id, "FAILURE"), 30)
    assert "InputError" in str(final["result"]) and "got length 2" in str(final["result"])


def test_flower_lists_every_request_of_a_batch_with_state_runtime_and_args(pool: Pool, flower: Flower) -> None:
    model = unique("lin")
    pool.store.create(model, make_spec("linear", in_features=4), seed=2)
    rows = np.random.default_rng(3).standard_normal((BATCH, 4)).round(3).tolist()
    ids = pool.client.send_predict_bulk(model, rows)  # one round trip: the worker serves them in one or few batches
    pool.client.collect(ids, timeout=60)

    def listed() -> dict[str, Any] | None:
        tasks = flower.get("/api/tasks", taskname="agent_workers.predict", limit=10_000).json()
        mine = {i: tasks.get(i) for i in ids}
        return mine if all(t and t["state"] == "SUCCESS" for t in mine.values()) else None

    tasks = wait_for(f"Flower to list all {BATCH} requests as SUCCESS", listed, 60, alive=flower.alive)
    node = worker_node(pool)
    for task_id, row in zip(ids, rows, strict=True):
        task = tasks[task_id]
        assert task["name"] == "agent_workers.predict"
        assert task["worker"] == node
        assert isinstance(task["runtime"], float) and task["runtime"] >= 0
        assert task["received"] is not None and task["started"] is not None
        assert model in task["kwargs"] and str(row[0]) in task["kwargs"]
        assert len(task["kwargs"]) <= 130  # a short repr, not the whole request
        assert model in task["result"]
    runtimes = {tasks[i]["runtime"] for i in ids}
    assert len(runtimes) < BATCH, "every request ran alone: the burst was not batched"


def _settled(flower: Flower, task_id: str, state: str = "SUCCESS") -> dict[str, Any] | None:
    body = flower.get(f"/api/task/result/{task_id}").json()
    return body if body.get("state") == state else None
