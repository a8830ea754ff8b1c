"""The dynamic batcher on both brokers: batches form, failures stay isolated, revoke/expires, version swaps."""

from __future__ import annotations

import threading
from datetime import UTC, datetime, timedelta

import numpy as np
import pytest
from kombu import Connection, Exchange, Producer

from agent_workers.errors import InputError
from agent_workers.models import make_spec
from tests.conftest import Pool, reference, unique

pytestmark = pytest.mark.integration


def test_batches_form_and_one_bad_input_among_63_fails_alone(broker: str, start_pool) -> None:
    # Queued before the worker starts, so the 64 requests are there together (an idle broker flushes at once).
    pool: Pool = start_pool(broker, queues="inference", max_wait_ms=500, max_batch_size=64, start=False)
    model = unique("mlp")
    pool.store.create(model, make_spec("mlp", in_features=8, hidden=[16], out_features=3))
    rows = np.random.default_rng(4).standard_normal((64, 8)).astype(np.float32)
    inputs: list[object] = rows.tolist()
    inputs[17] = [1.0] * 7  # the culprit: wrong length
    handles = [
        pool.client.app.send_task("agent_workers.predict", kwargs={"model": model, "inputs": row}) for row in inputs
    ]
    pool.worker.start()
    expected = reference(pool, model, rows)
    for i, handle in enumerate(handles):
        if i == 17:
            with pytest.raises(InputError, match="shape \\[8\\], got length 7"):
                pool.client.wait(handle, 30)
            continue
        np.testing.assert_allclose(pool.client.wait(handle, 30)["outputs"], expected[i], rtol=1e-5, atol=1e-6)
    batches = pool.metric("agent_workers_batch_size_count", {"model": model})
    served = pool.metric("agent_workers_batch_size_sum", {"model": model})
    assert served == 63
    assert served / batches > 1, f"{batches} batches for 63 requests: no batching happened"
    assert pool.metric("agent_workers_requests_total", {"model": model, "outcome": "failure"}) == 1


def test_model_that_raises_on_one_input_is_bisected(broker: str, start_pool) -> None:
    pool: Pool = start_pool(broker, queues="inference", max_wait_ms=300, plugins="tests.plugins_batching", start=False)
    model = unique("picky")
    from tests.plugins_batching import picky_spec

    pool.store.create(model, picky_spec())
    rows = [[float(i), 1.0] for i in range(16)]
    rows[5] = [-1.0, 1.0]  # the model raises on negative first features
    handles = [pool.client.app.send_task("agent_workers.predict", args=[model, row]) for row in rows]
    pool.worker.start()  # the 16 requests are queued before it consumes: they share a batch
    outcomes = []
    for handle in handles:
        try:
            outcomes.append(pool.client.wait(handle, 30)["outputs"])
        except Exception as exc:  # noqa: BLE001 - recording which failed
            outcomes.append(str(exc))
    assert "negative input" in outcomes[5]
    assert [o for i, o in enumerate(outcomes) if i != 5] == [[r[0] + r[1]] for i, r in enumerate(rows) if i != 5]


def test_expired_request_is_not_computed(pool: Pool) -> None:
    model = unique("lin")
    pool.store.create(model, make_spec("linear", in_features=2))
    past = datetime.now(UTC) - timedelta(seconds=5)
    handle = pool.client.app.send_task("agent_workers.predict", args=[model, [1.0, 2.0]], expires=past)
    handle.get(timeout=30, propagate=False)
    assert handle.state == "REVOKED"
    assert "expired" in str(handle.result)
    assert pool.client.predict(model, [1.0, 2.0], timeout=30)["version"] == 0


def test_revoked_request_is_not_computed(pool: Pool) -> None:
    model = unique("lin")
    pool.store.create(model, make_spec("linear", in_features=2))
    task_id = unique("revoked")
    replies = pool.client.app.control.revoke(task_id, reply=True, timeout=5)
    assert replies, "no worker acknowledged the revoke"
    handle = pool.client.app.send_task("agent_workers.predict", args=[model, [1.0, 2.0]], task_id=task_id)
    handle.get(timeout=30, propagate=False)
    assert handle.state == "REVOKED"
    assert pool.client.predict(model, [1.0, 2.0], timeout=30)["version"] == 0


def test_pickle_message_is_refused_and_the_worker_stays_up(pool: Pool) -> None:
    model = unique("lin")
    pool.store.create(model, make_spec("linear", in_features=2))
    task_id = unique("pickle")
    with Connection(pool.settings.broker_url) as conn:
        queue = pool.settings.inference_queue
        Producer(conn.default_channel).publish(
            ((model, [1.0, 2.0]), {}, {}),
            serializer="pickle",
            exchange=Exchange(queue, type="direct"),
            routing_key=queue,
            headers={"task": "agent_workers.predict", "id": task_id, "lang": "py"},
            declare=[],
            retry=True,
        )
    from celery.result import AsyncResult

    handle = AsyncResult(task_id, app=pool.client.app)
    with pytest.raises(InputError, match="pickle is never accepted"):
        pool.client.wait(handle, 30)
    assert pool.client.predict(model, [1.0, 2.0], timeout=30)["version"] == 0


def test_no_batch_mixes_parameter_versions_while_training_commits(pool: Pool) -> None:
    model = unique("lin")
    pool.store.create(model, make_spec("linear", in_features=4))
    rows = np.random.default_rng(5).standard_normal((300, 4)).astype(np.float32)
    stop = threading.Event()

    def commits() -> None:
        x = [[1.0, 0.0, 0.0, 0.0]]
        while not stop.is_set():
            pool.client.wait(pool.client.send_train_step(model, x=x, y=[[3.0]], hparams={"lr": 0.05}), 30)

    trainer = threading.Thread(target=commits)
    trainer.start()
    results: list[dict[str, object]] = []
    sent: list[np.ndarray] = []
    try:
        # Bulks of predictions until the commits have moved the version under them (a fast worker may drain one
        # bulk before the first commit lands), bounded so a stuck trainer fails the assertion below.
        for _ in range(30):
            results += pool.client.predict_bulk(model, rows.tolist(), timeout=60)
            sent.append(rows)
            if len({r["version"] for r in results}) > 1:
                break
    finally:
        stop.set()
        trainer.join(60)
    rows = np.concatenate(sent)
    versions = {r["version"] for r in results}
    assert len(versions) > 1, "the version never changed during the load; the test proved nothing"
    for version in versions:
        idx = [i for i, r in enumerate(results) if r["version"] == version]
        got = np.array([results[i]["outputs"] for i in idx])
        np.testing.assert_allclose(got, reference(pool, model, rows[idx], version), rtol=1e-5, atol=1e-6)


def test_countdown_is_honoured(pool: Pool) -> None:
    model = unique("lin")
    pool.store.create(model, make_spec("linear", in_features=2))
    sent = datetime.now(UTC)
    handle = pool.client.app.send_task("agent_workers.predict", args=[model, [1.0, 2.0]], countdown=1.5)
    assert pool.client.wait(handle, 30)["version"] == 0
    from celery.result import AsyncResult

    done = AsyncResult(handle.id, app=pool.client.app).date_done
    eta = sent + timedelta(seconds=1.5)  # served no earlier than its countdown (a semantic, not a speed, check)
    assert done is not None and done.replace(tzinfo=UTC) >= eta
