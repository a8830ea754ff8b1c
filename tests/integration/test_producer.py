"""The producer's smaller promises, on both brokers: an empty bulk, repeated ids, numpy rows, one deadline for fit,
a failing progress callback, fork, and every producer path against priority queues (one queue declaration)."""

from __future__ import annotations

import dataclasses
import json
import multiprocessing
import time
from pathlib import Path

import numpy as np
import pytest
import redis
from celery.exceptions import TaskRevokedError

from agent_workers.client import Client, ResultTimeout
from agent_workers.models import make_spec
from tests.conftest import Pool, unique
from tests.integration.test_cli import cli
from tests.plugins_batching import GATE, gate_keys

pytestmark = pytest.mark.integration

#: Seconds a call may take past its timeout (thread start-up, a loaded shared machine).
SLACK = 1.5


def test_empty_bulk_is_an_empty_answer(pool: Pool) -> None:
    assert pool.client.predict_bulk("no-such-model", [], timeout=5) == []
    assert pool.client.send_predict_bulk("no-such-model", []) == []


def test_collect_takes_an_id_twice_and_rows_of_numpy_scalars(pool: Pool) -> None:
    model = unique("lin")
    pool.store.create(model, make_spec("linear", in_features=2))
    row = [np.float32(0.5), np.float64(1.0)]  # a list of numpy scalars, not an array
    ids = pool.client.send_predict_bulk(model, [row, np.array([0.5, 1.0])])
    results = pool.client.collect([ids[0], ids[1], ids[0]], timeout=30)
    assert results[0] == results[2] and results[0]["outputs"] == results[1]["outputs"]


def test_fit_waits_one_deadline_and_a_raising_progress_callback_keeps_the_task_id(pool: Pool) -> None:
    model = unique("lin")
    pool.store.create(model, make_spec("linear", in_features=2))
    x = np.arange(40, dtype=np.float32).reshape(20, 2) / 40
    name = pool.client.upload_dataset(None, x, x[:, 0], ttl=600)

    def stop(_meta: dict) -> None:
        raise KeyboardInterrupt("the user pressed ^C")

    with pytest.raises(KeyboardInterrupt) as info:
        pool.client.fit(model, name, epochs=50, batch_size=2, on_progress=stop, timeout=60)
    task_id = info.value.task_id  # the job goes on: the caller can still wait for it (or revoke it)
    assert pool.client.wait(task_id, 60)["steps"] == 500

    # Nobody consumes this training queue: fit(timeout=T) with progress must give up at T, not 2T.
    lonely = Client(dataclasses.replace(pool.settings, training_queue=f"{pool.settings.namespace}.nobody"))
    try:
        started = time.monotonic()
        with pytest.raises(ResultTimeout) as timeout:
            lonely.fit(model, name, epochs=1, on_progress=lambda _m: None, timeout=2)
        assert time.monotonic() - started < 2 + SLACK
        assert len(timeout.value.ids) == 1 and timeout.value.pending == timeout.value.ids
    finally:
        lonely.close()


def _predict_in_child(client: Client, model: str, out: multiprocessing.Queue) -> None:
    out.put([client.predict(model, [float(i), 1.0], timeout=30)["outputs"] for i in range(5)])


def test_a_forked_child_gets_its_own_result_subscription(pool: Pool) -> None:
    model = unique("lin")
    pool.store.create(model, make_spec("linear", in_features=2))
    client = Client(pool.settings)
    try:
        want = [client.predict(model, [float(i), 1.0], timeout=30)["outputs"] for i in range(5)]  # subscribed here
        ctx = multiprocessing.get_context("fork")
        out = ctx.Queue()
        children = [ctx.Process(target=_predict_in_child, args=(client, model, out)) for _ in range(2)]
        for child in children:
            child.start()
        mine = [client.predict(model, [float(i), 1.0], timeout=30)["outputs"] for i in range(5)]
        got = [out.get(timeout=60) for _ in children]
        for child in children:
            child.join(30)
            assert child.exitcode == 0
        assert mine == want and got == [want, want]
    finally:
        client.close()


def test_every_producer_path_works_with_priority_queues(start_pool, tmp_path: Path) -> None:
    # The worker declares its queues with x-max-priority; every producer of ours must declare them identically
    # (RabbitMQ refuses a mismatch with PRECONDITION_FAILED) - one declaration, contract.queues.
    pool: Pool = start_pool("rabbitmq", queue_max_priority=10)
    client = pool.client
    model = unique("lin")
    pool.store.create(model, make_spec("linear", in_features=2))
    assert client.predict(model, [1.0, 0.0], timeout=60)["model"] == model
    assert len(client.predict_bulk(model, [[1.0, 0.0]] * 3, timeout=60)) == 3
    assert len(client.predict_many(model, [[1.0, 0.0]] * 3, timeout=60)["outputs"]) == 3
    x = np.arange(40, dtype=np.float32).reshape(20, 2) / 40
    name = client.upload_dataset(None, x, x[:, 0], ttl=600)
    assert client.train_step(model, dataset=name, rows=[0, 1], timeout=60)["version"] == 1
    assert len(client.train(model, name, 20, epochs=1, batch_size=10, timeout=60)) == 2
    assert client.fit(model, name, epochs=1, batch_size=10, timeout=60)["steps"] == 2
    rows = tmp_path / "rows.json"
    rows.write_text(json.dumps([[1.0, 0.0], [0.0, 1.0]]))
    done = cli("predict", model, str(rows), "--timeout", "60", env=pool.env)
    assert done.returncode == 0, done.stderr
    assert len(done.stdout.splitlines()) == 2


def test_cli_predict_prints_what_it_has_at_the_timeout_and_the_rest_expires(
    broker: str, start_pool, tmp_path: Path
) -> None:
    pool: Pool = start_pool(broker, queues="inference", max_batch_size=1, plugins="tests.plugins_batching")
    model = unique("held")
    pool.store.create(model, make_spec("held", in_features=2))
    rows = tmp_path / "rows.json"
    rows.write_text(json.dumps([[1.0, 0.0], [2.0, 0.0], [GATE, 0.0], [3.0, 0.0]]))  # row 2 holds the worker
    entered, go = gate_keys(pool.settings.namespace)
    gate = redis.Redis.from_url(pool.settings.params_url)
    try:
        done = cli("predict", model, str(rows), "--timeout", "4", env=pool.env)
        assert gate.llen(entered) == 1  # rows 0 and 1 were served before the held one
    finally:
        gate.rpush(go, 1)
    lines = [json.loads(line) for line in done.stdout.splitlines()]
    assert done.returncode == 1 and len(lines) == 4, done.stderr
    assert [line["outputs"] for line in lines[:2]] == [[1.0], [2.0]]
    assert all(line["error"].startswith("ResultTimeout") and line["task_id"] for line in lines[2:])
    assert "2 of 4 rows: no result within 4s" in done.stderr
    # The abandoned rows expired with the timeout: the worker drops the one still queued instead of computing it.
    with pytest.raises(TaskRevokedError):
        pool.client.wait(lines[3]["task_id"], 60)
    gate.delete(entered, go)
