"""The end-to-end slice on both brokers: producers, training, bad input, predict_many."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from celery.exceptions import TimeoutError as CeleryTimeout

from agent_workers.errors import InputError, ModelError
from agent_workers.models import make_spec
from tests.conftest import Pool, reference, unique

pytestmark = pytest.mark.integration


BARE_PRODUCER = textwrap.dedent(
    """
    import json, sys
    from celery import Celery
    broker, backend, queue, model, rows = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4], json.loads(sys.argv[5])
    app = Celery("outsider", broker=broker, backend=backend)
    app.conf.update(task_serializer="json", accept_content=["json"], result_accept_content=["json"])
    handles = [app.send_task("agent_workers.predict", args=[model, row], queue=queue) for row in rows]
    print(json.dumps([h.get(timeout=60) for h in handles]))
    assert "agent_workers" not in sys.modules
    """
)


def test_bare_celery_producer_gets_the_numbers_torch_computes(pool: Pool) -> None:
    model = unique("lin")
    pool.store.create(model, make_spec("linear", in_features=10), seed=3)
    rows = np.random.default_rng(0).standard_normal((5, 10)).astype(np.float32)
    s = pool.settings
    out = subprocess.run(
        [
            sys.executable,
            "-c",
            BARE_PRODUCER,
            s.broker_url,
            s.result_backend,
            s.inference_queue,
            model,
            json.dumps(rows.tolist()),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    results = json.loads(out.stdout)
    got = np.array([r["outputs"] for r in results])
    np.testing.assert_allclose(got, reference(pool, model, rows), rtol=1e-5, atol=1e-6)
    assert {r["version"] for r in results} == {0}


def test_train_step_advances_version_and_prediction_uses_new_parameters(pool: Pool) -> None:
    model = unique("lin")
    pool.store.create(model, make_spec("linear", in_features=3), seed=1)
    row = [1.0, -2.0, 0.5]
    before = pool.client.predict(model, row)
    step = pool.client.wait(
        pool.client.send_train_step(model, x=[row, [0.0, 1.0, 1.0]], y=[[5.0], [-1.0]], hparams={"lr": 0.1})
    )
    assert step["version"] == 1 and not step["duplicate"]
    after = pool.client.predict(model, row)
    assert after["version"] == 1
    assert after["outputs"] != before["outputs"]
    np.testing.assert_allclose(after["outputs"], reference(pool, model, np.array([row]), 1)[0], rtol=1e-5)


def _strict_json(raw: bytes) -> object:
    def refuse(token: str) -> None:
        raise AssertionError(f"{token} is not JSON")

    return json.loads(raw, parse_constant=refuse)


def test_a_step_whose_loss_overflows_fails_alone_and_its_group_commits(pool: Pool) -> None:
    model = unique("lin")
    pool.store.create(model, make_spec("linear", in_features=3), seed=1)
    x = [[1.0, -2.0, 0.5], [0.0, 1.0, 1.0]]
    # mse with y = 1e30: the loss overflows float32 to infinity while the gradient (~1e30) stays finite. Sent back to
    # back with innocent steps, so the worker's group commit (AGENT_WORKERS_TRAIN_GROUP) holds them together.
    ys = {"good-0": [[5.0], [-1.0]], "bad": [[1e30], [1e30]], "good-1": [[1.0], [2.0]], "good-2": [[0.0], [3.0]]}
    ids = {u: unique(u) for u in ys}
    handles = {
        u: pool.client.send_train_step(model, x=x, y=y, hparams={"lr": 0.1}, update_id=ids[u]) for u, y in ys.items()
    }
    got = pool.client.collect([h.id for h in handles.values()], 60, return_exceptions=True)
    answers = dict(zip(handles, got, strict=True))
    assert isinstance(answers.pop("bad"), InputError)
    with pytest.raises(InputError, match="mse loss of this mini-batch is not finite"):
        pool.client.wait(handles["bad"], 5)
    assert handles["bad"].state == "FAILURE"
    assert all(isinstance(a, dict) and not a["duplicate"] for a in answers.values()), answers
    head = pool.store.head(model)
    assert head.version == max(a["version"] for a in answers.values())
    assert pool.store.applied(model, ids["bad"]) is None
    assert all(pool.store.applied(model, ids[u]) is not None for u in answers)
    # The model stays sane and its history is strict JSON (no Infinity / NaN tokens).
    out = pool.client.predict(model, x[0], timeout=30)
    assert out["version"] == head.version and all(abs(v) < 1e3 for v in out["outputs"])
    for raw in pool.store.client.lrange(pool.store.keys.history(model), 0, -1):
        _strict_json(raw)


@pytest.mark.parametrize(
    ("inputs", "model", "message"),
    [
        ([1.0, 2.0], None, "shape [3], got length 2"),
        ("not numbers", None, "got str"),
        ([1.0, "x", 3.0], None, "must be numbers"),
        ([1.0, float("nan"), 3.0], None, "NaN"),
        ([1.0, float("-inf"), 3.0], None, "NaN or infinity"),
        ([], None, "got length 0"),
        ({"a": [1, 2, 3]}, None, "a binary tensor is {dtype, shape, b64} or {dtype, shape, data}, got keys ['a']"),
        ([[1.0], [2.0], [3.0]], None, "got [3, 1]"),
        ([1.0, None, 3.0], None, "inputs contain null"),
        ([1.0, 2.0, 3.0], "no-such-model", "unknown model 'no-such-model'"),
    ],
    ids=[
        "wrong-length",
        "string",
        "string-inside",
        "nan",
        "inf",
        "empty",
        "nested-junk",
        "wrong-shape",
        "null",
        "unknown-model",
    ],
)
def test_bad_input_fails_alone_and_the_next_request_succeeds(
    pool: Pool, inputs: object, model: str | None, message: str
) -> None:
    name = unique("lin")
    pool.store.create(name, make_spec("linear", in_features=3))
    bad = pool.client.app.send_task("agent_workers.predict", kwargs={"model": model or name, "inputs": inputs})
    with pytest.raises((InputError, ModelError)) as info:
        pool.client.wait(bad, timeout=30)
    assert message in str(info.value)
    assert bad.state == "FAILURE"
    good = pool.client.predict(name, [1.0, 2.0, 3.0], timeout=30)
    assert good["version"] == 0 and len(good["outputs"]) == 1


def test_predict_many_returns_outputs_in_input_order(pool: Pool) -> None:
    model = unique("mlp")
    pool.store.create(model, make_spec("mlp", in_features=8, hidden=[16], out_features=4))
    rows = np.random.default_rng(1).standard_normal((150, 8)).astype(np.float32)  # > one batch of 64
    result = pool.client.predict_many(model, rows.tolist(), timeout=60)
    np.testing.assert_allclose(np.array(result["outputs"]), reference(pool, model, rows), rtol=1e-4, atol=1e-5)


def test_predict_many_names_the_bad_example(pool: Pool) -> None:
    model = unique("lin")
    pool.store.create(model, make_spec("linear", in_features=2))
    with pytest.raises(InputError, match="example 1"):
        pool.client.predict_many(model, [[1, 2], [1, 2, 3]], timeout=30)


def test_fit_job_trains_and_reports_progress(pool: Pool) -> None:
    from agent_workers.training.datasets import DatasetStore

    model = unique("lin")
    pool.store.create(model, make_spec("linear", in_features=2))
    x = np.random.default_rng(2).standard_normal((200, 2)).astype(np.float32)
    y = (x @ np.array([[2.0], [-1.0]], dtype=np.float32)) + 0.5
    dataset = DatasetStore.from_settings(pool.settings).upload(x, y)
    handle = pool.client.send_fit(model, dataset, epochs=5, batch_size=20, hparams={"lr": 0.1})
    try:
        result = pool.client.wait(handle, timeout=120)
    except CeleryTimeout:
        pytest.fail(f"fit did not finish; state {handle.state}")
    assert result["steps"] == 50 and result["version"] == 50
    assert result["history"][-1]["loss"] < result["history"][0]["loss"] / 10
    params = pool.store.read(model).parameters()
    np.testing.assert_allclose(params["weight"].numpy(), [[2.0, -1.0]], atol=0.05)


def test_unknown_version_and_oversized_message_fail_alone(pool: Pool) -> None:
    model = unique("lin")
    pool.store.create(model, make_spec("linear", in_features=3))
    with pytest.raises(ModelError, match="has no version 7"):
        pool.client.wait(pool.client.app.send_task("agent_workers.predict", args=[model, [1.0, 2.0, 3.0], 7]), 30)
    huge = [0.5] * (pool.settings.max_message_bytes // 4)  # > the byte limit once JSON-encoded
    with pytest.raises(InputError, match="the limit is"):
        pool.client.wait(pool.client.app.send_task("agent_workers.predict", args=[model, huge]), 60)
    assert pool.client.predict(model, [1.0, 2.0, 3.0], timeout=30)["version"] == 0


def test_malformed_json_from_a_raw_kombu_producer_fails_alone(pool: Pool) -> None:
    from celery.result import AsyncResult
    from kombu import Connection, Exchange, Producer

    model = unique("lin")
    pool.store.create(model, make_spec("linear", in_features=3))
    task_id = unique("raw")
    queue = pool.settings.inference_queue
    with Connection(pool.settings.broker_url) as conn:
        Producer(conn.default_channel).publish(
            b'[["m", [1, 2, 3]], {"oops": ',
            content_type="application/json",
            content_encoding="utf-8",
            exchange=Exchange(queue, type="direct"),
            routing_key=queue,
            declare=[],
            retry=True,
            headers={"task": "agent_workers.predict", "id": task_id, "lang": "py"},
        )
    with pytest.raises(InputError, match="cannot decode message"):
        pool.client.wait(AsyncResult(task_id, app=pool.client.app), 30)
    assert pool.client.predict(model, [1.0, 2.0, 3.0], timeout=30)["version"] == 0


def test_queue_depth_is_exported(pool: Pool) -> None:
    import time

    import requests

    wanted = f'agent_workers_queue_depth{{queue="{pool.settings.inference_queue}"}}'
    deadline = time.monotonic() + 30
    while wanted not in requests.get(f"http://127.0.0.1:{pool.metrics_port}/metrics", timeout=5).text:
        if time.monotonic() > deadline:
            pytest.fail(f"{wanted} never appeared")
        time.sleep(0.2)  # noqa: sleep-ok - poll interval of a deadline-bounded wait
