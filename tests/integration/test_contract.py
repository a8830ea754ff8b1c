"""docs/tasks.md is executable: its JSON Schemas and example requests are read from the page and checked against real
workers on both brokers, as are the client's hand-built messages and the ``inspect models`` command."""

from __future__ import annotations

import asyncio
import functools
import json
import re
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import redis
from jsonschema import Draft202012Validator
from referencing import Registry, Resource

from agent_workers.client import ResultTimeout
from agent_workers.contract import FIT, PREDICT, PREDICT_MANY, TRAIN_STEP
from agent_workers.errors import InputError, ModelError
from agent_workers.models import make_spec
from agent_workers.tools.producer_bench import bench
from agent_workers.training.datasets import DatasetStore
from agent_workers.worker.control import inspect_models
from agent_workers.worker.launch import settings_env
from tests.conftest import Pool, unique

pytestmark = pytest.mark.integration

DOC = Path(__file__).resolve().parents[2] / "docs" / "tasks.md"
TASKS = (PREDICT, PREDICT_MANY, TRAIN_STEP, FIT)
URN = "urn:agent-workers:"
EXAMPLE_MODEL, EXAMPLE_DATASET = "house", "house-2026"  # the names the examples in docs/tasks.md use


@functools.cache
def contract() -> tuple[dict[str, dict[str, Any]], list[Any]]:
    """Every ```json block of docs/tasks.md: the schemas by ``$id``, and the other blocks (examples)."""
    blocks = [json.loads(b) for b in re.findall(r"```json\n(.*?)```", DOC.read_text(), re.S)]
    schemas = {b["$id"]: b for b in blocks if isinstance(b, dict) and "$schema" in b}
    return schemas, [b for b in blocks if not (isinstance(b, dict) and "$schema" in b)]


@functools.cache
def _registry() -> Registry:
    schemas, _ = contract()
    return Registry().with_resources((i, Resource.from_contents(s)) for i, s in schemas.items())


def validator(name: str) -> Draft202012Validator:
    """The validator of schema ``urn:agent-workers:<name>``."""
    return Draft202012Validator(contract()[0][URN + name], registry=_registry())


def check(name: str, instance: Any) -> None:
    errors = [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator(name).iter_errors(instance)]
    assert not errors, f"{name} does not validate {json.dumps(instance)[:300]}: {errors}"


def record(pool: Pool, task_id: str) -> dict[str, Any]:
    """The raw result record of ``task_id`` in the Redis result backend."""
    raw = redis.Redis.from_url(pool.settings.result_backend).get(f"celery-task-meta-{task_id}")
    assert raw is not None, f"no result record for {task_id}"
    return json.loads(raw)


def queue_for(pool: Pool, task: str) -> str:
    return pool.settings.inference_queue if task in (PREDICT, PREDICT_MANY) else pool.settings.training_queue


# -- the page itself (no services) ------------------------------------------------------------------------------------


def test_every_schema_is_valid_and_every_documented_example_validates() -> None:
    schemas, others = contract()
    assert schemas, "no schemas found in docs/tasks.md"
    for schema_id, schema in schemas.items():
        Draft202012Validator.check_schema(schema)
        assert schema_id.startswith(URN)
        for example in schema.get("examples", []):
            check(schema_id.removeprefix(URN), example)
    for example in others:  # loose examples on the page are error payloads
        check("error", example)


def test_every_task_has_a_request_and_a_result_schema_with_examples() -> None:
    schemas, _ = contract()
    for task in TASKS:
        for part in ("request", "result"):
            assert f"{URN}{task}:{part}" in schemas, f"docs/tasks.md lacks the {part} schema of {task}"
            assert schemas[f"{URN}{task}:{part}"].get("examples"), f"no examples for {task} {part}"
    assert re.search(r"\*\*Contract version: \d+\.\d+\*\*", DOC.read_text())


@pytest.mark.parametrize(
    ("task", "request_"),
    [
        (PREDICT, {"args": ["house"]}),
        (PREDICT, {"args": ["house", "not a list"]}),
        (PREDICT, {"kwargs": {"model": "house", "inputs": [1.0], "temperature": 0.5}}),
        (PREDICT_MANY, {"args": ["house", [1.0, 2.0]]}),
        (TRAIN_STEP, {"kwargs": {"model": "house", "x": [[1.0]]}}),
        (TRAIN_STEP, {"kwargs": {"model": "house", "x": [[1.0]], "y": [1.0], "hparams": {"lr": -1}}}),
        (FIT, {"args": ["house"], "kwargs": {"epochs": 0}}),
    ],
)
def test_schemas_refuse_requests_that_workers_refuse(task: str, request_: dict[str, Any]) -> None:
    assert not validator(f"{task}:request").is_valid(request_)


# -- against real workers ---------------------------------------------------------------------------------------------


def test_documented_example_requests_are_served_and_results_validate(pool: Pool) -> None:
    pool.store.create(EXAMPLE_MODEL, make_spec("linear", in_features=3), seed=11, replace=True)
    rng = np.random.default_rng(0)
    DatasetStore.from_settings(pool.settings).upload(
        rng.standard_normal((8, 3)), rng.standard_normal((8, 1)), dataset_id=EXAMPLE_DATASET
    )
    schemas, _ = contract()
    for task in TASKS:  # inference first: the examples pin version 0, before training moves the model on
        for example in schemas[f"{URN}{task}:request"]["examples"]:
            options = {k: v for k, v in example.items() if k not in ("args", "kwargs")}
            options["queue"] = queue_for(pool, task)  # the deployment's queue name, as the page says
            handle = pool.client.app.send_task(task, args=example.get("args"), kwargs=example.get("kwargs"), **options)
            result = pool.client.wait(handle, timeout=60)
            check(f"{task}:result", result)
            stored = record(pool, handle.id)
            check("result-record", stored)
            assert stored["status"] == "SUCCESS" and stored["result"] == result


def test_fit_progress_meta_follows_its_schema(pool: Pool) -> None:
    model = unique("lin")
    pool.store.create(model, make_spec("linear", in_features=2))
    dataset = DatasetStore.from_settings(pool.settings).upload(np.ones((40, 2)), np.ones((40, 1)))
    task_id = str(uuid.uuid4())
    seen: list[dict[str, Any]] = []
    pubsub = redis.Redis.from_url(pool.settings.result_backend).pubsub()
    pubsub.subscribe(f"celery-task-meta-{task_id}")  # before sending: every record it publishes is seen
    try:
        handle = pool.client.app.send_task(
            FIT,
            args=[model, dataset],
            kwargs={"epochs": 3, "batch_size": 4},
            task_id=task_id,
            queue=pool.settings.training_queue,
        )  # 30 steps
        pool.client.wait(handle, timeout=120)
        for message in iter(lambda: pubsub.get_message(timeout=0.5), None):
            if message["type"] == "message":
                seen.append(json.loads(message["data"]))
    finally:
        pubsub.close()
    progress = [r["result"] for r in seen if r["status"] == "PROGRESS"]
    assert progress, f"no PROGRESS record published; saw {[r['status'] for r in seen]}"
    for meta in progress:
        check(f"{FIT}:progress", meta)


@pytest.mark.parametrize(
    ("inputs", "model", "exc_type"),
    [
        ([1.0, 2.0], None, "InputError"),
        ([1.0, 2.0, 3.0], "no-such-model", "ModelError"),
    ],
)
def test_failures_are_stored_in_the_documented_error_format(
    pool: Pool, inputs: list[float], model: str | None, exc_type: str
) -> None:
    name = unique("lin")
    pool.store.create(name, make_spec("linear", in_features=3))
    handle = pool.client.app.send_task(PREDICT, args=[model or name, inputs], queue=pool.settings.inference_queue)
    with pytest.raises((InputError, ModelError)):
        pool.client.wait(handle, timeout=30)
    stored = record(pool, handle.id)
    check("result-record", stored)
    assert stored["status"] == "FAILURE"
    check("error", stored["result"])
    assert stored["result"]["exc_type"] == exc_type
    assert stored["result"]["exc_module"] == "agent_workers.errors"


# -- the client's own messages ----------------------------------------------------------------------------------------


def test_client_bulk_messages_are_served_like_celery_messages(pool: Pool) -> None:
    model = unique("lin")
    pool.store.create(model, make_spec("linear", in_features=4), seed=5)
    rows = np.random.default_rng(9).standard_normal((20, 4)).astype(np.float32)
    bulk = pool.client.predict_bulk(model, rows)  # numpy rows: the client turns them into JSON lists
    single = pool.client.predict(model, rows[0].tolist())
    celery = [
        pool.client.wait(pool.client.app.send_task(PREDICT, args=[model, r], queue=pool.settings.inference_queue))
        for r in rows[:3].tolist()
    ]
    for result in bulk:
        check(f"{PREDICT}:result", result)
    # The same row may round differently in a batch of 20 and alone (docs/tasks.md, "Numbers"): float32 tolerance.
    np.testing.assert_allclose([r["outputs"] for r in celery], [r["outputs"] for r in bulk[:3]], rtol=1e-5, atol=1e-6)
    assert single["model"] == bulk[0]["model"] and single["version"] == bulk[0]["version"]
    np.testing.assert_allclose(single["outputs"], bulk[0]["outputs"], rtol=1e-5, atol=1e-6)


def test_client_bulk_keeps_order_and_returns_errors_in_place(pool: Pool) -> None:
    model = unique("lin")
    pool.store.create(model, make_spec("linear", in_features=2))
    out = pool.client.predict_bulk(model, [[1.0, 2.0], [1.0], [3.0, 4.0]], return_exceptions=True)
    assert isinstance(out[1], InputError) and "got length 1" in str(out[1])
    assert out[0]["outputs"] != out[2]["outputs"]
    with pytest.raises(InputError):
        pool.client.predict_bulk(model, [[1.0, 2.0], [1.0]])


def test_client_asyncio_variants(pool: Pool) -> None:
    model = unique("lin")
    pool.store.create(model, make_spec("linear", in_features=2))

    async def main() -> tuple[Any, ...]:
        return await asyncio.gather(
            pool.client.predict_async(model, [1.0, 2.0]),
            pool.client.predict_bulk_async(model, [[1.0, 2.0], [0.0, 1.0]]),
            pool.client.predict_many_async(model, [[1.0, 2.0], [0.0, 1.0]]),
            pool.client.predict_async(model, [1.0], timeout=30),
            return_exceptions=True,
        )

    one, bulk, many, bad = asyncio.run(main())
    assert one["version"] == bulk[0]["version"] and len(one["outputs"]) == len(bulk[0]["outputs"])
    np.testing.assert_allclose(one["outputs"], bulk[0]["outputs"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose([r["outputs"] for r in bulk], many["outputs"], rtol=1e-5, atol=1e-6)
    assert isinstance(bad, InputError)


def test_client_wait_times_out_with_celery_timeout_error(pool: Pool) -> None:
    with pytest.raises(ResultTimeout, match="1 of 1 results not ready"):
        pool.client.wait(str(uuid.uuid4()), timeout=0.3)


# -- celery inspect models --------------------------------------------------------------------------------------------


def test_inspect_models_names_each_loaded_model_with_version_and_device(pool: Pool) -> None:
    model = unique("lin")
    pool.store.create(model, make_spec("linear", in_features=2))
    pool.client.predict(model, [1.0, 2.0])
    node = pool.worker.ready_path.read_text().strip()
    replies = inspect_models(pool.client.app, timeout=5, destination=[node])
    assert set(replies) == {node}
    reply = replies[node]
    assert reply["device"] == "cpu"
    mine = [m for m in reply["models"] if m["name"] == model]
    assert mine == [{"name": model, "version": 0, "epoch": mine[0]["epoch"], "arch": "linear", "device": "cpu"}]

    out = subprocess.run(
        [sys.executable, "-m", "celery", "-A", "tasks", "inspect", "models", "-d", node, "-t", "5", "--json"],
        env=settings_env(pool.env),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    cli = json.loads(out.stdout)
    assert any(m["name"] == model and m["version"] == 0 for m in cli[node]["models"])


def test_bench_reports_producer_cpu_of_both_paths(pool: Pool) -> None:
    queue = f"{pool.settings.namespace}-bench"
    figures = bench(pool.settings, n=30, width=4, queue=queue)  # a throw-away queue; no worker involved
    if pool.settings.broker_is_redis:  # nothing of the queue is left: its list, sub-lists, binding keys
        broker = redis.Redis.from_url(pool.settings.broker_url)
        assert [k for k in broker.scan_iter(match=f"*{queue}*", count=1000)] == []
    for key in (
        "publish_apply_async_us",
        "publish_client_single_us",
        "publish_client_bulk_us",
        "collect_asyncresult_get_us",
        "collect_client_bulk_us",
    ):
        assert figures[key] >= 0, key
