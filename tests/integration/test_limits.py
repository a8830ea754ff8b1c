"""Every task has limits, and a training step never poisons a model: on real workers, on both brokers.

One worker per broker with small limits (64 numbers per request, 4 KiB per message, a 2 s task time limit) serves
every test here; each test checks that the bad request fails alone, with an error naming what to change, and that
the worker keeps serving.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterator

import numpy as np
import pytest
from celery.exceptions import TimeLimitExceeded

from agent_workers.errors import InputError
from agent_workers.models import make_spec
from agent_workers.training.datasets import DatasetStore
from tests.conftest import Pool, unique

pytestmark = pytest.mark.integration

MAX_ELEMENTS = 64
MAX_MESSAGE_BYTES = 4096
TIME_LIMIT = 2
TIMEOUT = 60


@pytest.fixture(scope="module", params=["redis", "rabbitmq"])
def broker(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def limited(broker: str, start_pool: Callable[..., Pool]) -> Iterator[Pool]:
    yield start_pool(
        broker,
        max_input_elements=MAX_ELEMENTS,
        max_message_bytes=MAX_MESSAGE_BYTES,
        task_time_limit=TIME_LIMIT,
        visibility_timeout=TIME_LIMIT + 60,
    )


def linear(pool: Pool, width: int = 4) -> str:
    model = unique("lim")
    pool.store.create(model, make_spec("linear", in_features=width))
    return model


def test_a_step_that_would_blow_the_parameters_up_commits_nothing_and_the_model_keeps_serving(limited: Pool) -> None:
    model = linear(limited, width=2)
    with pytest.raises(InputError, match="non-finite|not finite"):
        limited.client.train_step(
            model, x=[[1e10, 1e10]], y=[[1e10]], hparams={"optimizer": "sgd", "lr": 1e30}, timeout=TIMEOUT
        )
    assert limited.store.head(model).version == 0
    outputs = limited.client.predict(model, [1.0, 2.0], timeout=TIMEOUT)["outputs"]
    assert all(isinstance(v, float) and math.isfinite(v) for v in outputs)
    clipped = limited.client.train_step(
        model,
        x=[[1e10, 1e10]],
        y=[[1e10]],
        hparams={"optimizer": "sgd", "lr": 0.01, "max_grad_norm": 1.0},
        timeout=TIMEOUT,
    )
    assert clipped["version"] == 1 and not clipped["duplicate"]
    assert all(math.isfinite(v) for v in limited.client.predict(model, [1.0, 2.0], timeout=TIMEOUT)["outputs"])


def test_predict_many_is_limited_by_the_numbers_of_the_whole_message(limited: Pool) -> None:
    model = linear(limited)
    fits = [[0.5] * 4] * (MAX_ELEMENTS // 4)
    assert len(limited.client.predict_many(model, fits, timeout=TIMEOUT)["outputs"]) == len(fits)
    with pytest.raises(InputError, match="AGENT_WORKERS_MAX_INPUT_ELEMENTS"):
        limited.client.predict_many(model, fits + [[0.5] * 4], timeout=TIMEOUT)


def test_train_step_and_fit_are_limited_by_rows_times_features(limited: Pool) -> None:
    model = linear(limited)
    rows = MAX_ELEMENTS // 4 + 1
    with pytest.raises(InputError, match="AGENT_WORKERS_MAX_INPUT_ELEMENTS"):
        limited.client.train_step(model, x=[[0.1] * 4] * rows, y=[[0.0]] * rows, timeout=TIMEOUT)
    datasets = DatasetStore.from_settings(limited.settings)
    dataset = datasets.upload(np.zeros((rows, 4), np.float32), np.zeros((rows, 1), np.float32))
    with pytest.raises(InputError, match="batch_size"):
        limited.client.fit(model, dataset, epochs=1, batch_size=rows, timeout=TIMEOUT)
    assert limited.store.head(model).version == 0
    assert limited.client.train_step(model, x=[[0.1] * 4], y=[[0.0]], timeout=TIMEOUT)["version"] == 1


@pytest.mark.parametrize("send", ["train_step", "predict_many"])
def test_an_oversized_message_of_any_task_fails_alone(limited: Pool, send: str) -> None:
    model = linear(limited)
    padding = "x" * MAX_MESSAGE_BYTES
    if send == "train_step":
        handle = limited.client.send_train_step(model, x=[[0.1] * 4], y=[[0.0]], update_id=padding)
    else:
        handle = limited.client.app.send_task(
            "agent_workers.predict_many", kwargs={"model": model, "inputs": [[0.5] * 4], "pad": padding}
        )
    with pytest.raises(InputError, match="AGENT_WORKERS_MAX_MESSAGE_BYTES"):
        limited.client.wait(handle, TIMEOUT)
    assert limited.client.predict_many(model, [[0.5] * 4], timeout=TIMEOUT)["version"] == 0
    assert limited.store.head(model).version == 0


def test_fit_honours_the_task_time_limit_under_the_threads_pool(limited: Pool) -> None:
    model = linear(limited)
    datasets = DatasetStore.from_settings(limited.settings)
    rows = 20_000  # one commit per row: far more than TIME_LIMIT seconds of work
    dataset = datasets.upload(np.zeros((rows, 4), np.float32), np.zeros((rows, 1), np.float32))
    handle = limited.client.send_fit(model, dataset, epochs=1, batch_size=1)
    with pytest.raises(TimeLimitExceeded, match="AGENT_WORKERS_TASK_TIME_LIMIT"):
        limited.client.wait(handle, TIMEOUT)
    stopped_at = limited.store.head(model).version
    assert 0 < stopped_at < rows
    record = json.loads(limited.client.app.backend.get(limited.client.app.backend.get_key_for_task(handle.id)))
    assert record["status"] == "FAILURE"
    assert limited.client.train_step(model, x=[[0.1] * 4], y=[[0.0]], timeout=TIMEOUT)["version"] == stopped_at + 1
