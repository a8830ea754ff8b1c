"""Variable-length batches against real workers on both brokers (contract 1.3, docs/tasks.md "Variable-length
batches"): requests of different lengths share one padded batch and answer as if served alone, the mask reaches
the model, batches keep to ``AGENT_WORKERS_MAX_BATCH_TOKENS``, a request over the whole budget is served alone, one
over the per-request limit fails alone, and a long request is not starved behind short ones."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import torch

from agent_workers.client import Client
from agent_workers.config import Settings
from agent_workers.errors import InputError
from agent_workers.models import make_spec
from agent_workers.store.params import RedisParamStore
from agent_workers.tools.supervisor import WorkerProcess, free_port
from tests.conftest import Pool, _cleanup, pool_env, unique
from tests.integration.test_contract import check

pytestmark = pytest.mark.integration

BUDGET = 256
MAX_ELEMENTS = 4096


@pytest.fixture(scope="module")
def padded_pool(broker: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pool]:
    """One worker per broker: batches of at most 8 requests and 256 tokens, the mask_echo test model known."""
    port = free_port()
    env = pool_env(
        broker,
        metrics_port=port,
        max_wait_ms=50,
        max_batch_size=8,
        max_batch_tokens=BUDGET,
        max_input_elements=MAX_ELEMENTS,
        plugins="tests.plugins_padding",
    )
    settings = Settings.from_env(env)
    worker = WorkerProcess(
        queues=[settings.inference_queue], env=env, log_path=tmp_path_factory.mktemp("padded") / "worker.log"
    )
    worker.start()
    p = Pool(broker, env, settings, worker, Client(settings), RedisParamStore.from_settings(settings), port)
    yield p
    worker.stop()
    _cleanup(settings)


def ids(rng: np.random.Generator, length: int) -> list[int]:
    return rng.integers(1, 1000, length).tolist()


def alone(pool: Pool, model: str, row: list[int]) -> np.ndarray:
    """What the stored text classifier answers for ``row`` computed alone, unpadded, here."""
    snap = pool.store.read(model)
    module = pool.store.spec(model, snap.epoch).build().eval()
    module.load_state_dict(snap.parameters())
    with torch.inference_mode():
        return module(torch.tensor([row])).numpy()[0]


def test_different_lengths_in_one_batch_answer_as_each_served_alone(padded_pool: Pool) -> None:
    model = unique("text")
    padded_pool.store.create(model, make_spec("text_classifier"), seed=5)
    rng = np.random.default_rng(1)
    rows = [ids(rng, n) for n in (5, 17, 32, 9, 3, 21)]
    results = padded_pool.client.predict_bulk(model, rows, timeout=60)
    batched = [r for r in results if r["batch"]["size"] > 1]
    assert batched, "no two requests shared a batch: nothing was padded"
    assert any(r["batch"]["padded_tokens"] > r["batch"]["tokens"] for r in batched)
    for row, result in zip(rows, results, strict=True):
        check("agent_workers.predict:result", result)  # contract 1.3: the batch metadata is in the schema
        assert result["batch"]["tokens"] == len(row)
        np.testing.assert_allclose(result["outputs"], alone(padded_pool, model, row), rtol=1e-4, atol=1e-5)


def test_the_mask_reaches_the_model_and_variable_outputs_are_cut_back(padded_pool: Pool) -> None:
    model = unique("echo")
    padded_pool.store.create(model, make_spec("mask_echo"))
    rng = np.random.default_rng(2)
    rows = [ids(rng, n) for n in (2, 7, 4, 11)]
    results = padded_pool.client.predict_bulk(model, rows, timeout=60)
    for row, result in zip(rows, results, strict=True):
        assert result["outputs"] == {"length": [float(len(row))], "kept": row}


def batch_of(result: dict[str, Any]) -> dict[str, Any]:
    return result["batch"]


def test_batches_keep_to_the_token_budget_and_an_overlong_request_is_served_alone(padded_pool: Pool) -> None:
    model = unique("echo")
    padded_pool.store.create(model, make_spec("mask_echo"))
    rng = np.random.default_rng(3)
    lengths = [int(n) for n in rng.integers(8, 120, 40)] + [BUDGET + 100]
    rows = [ids(rng, n) for n in lengths]
    results = padded_pool.client.predict_bulk(model, rows, timeout=60)
    for result in results:
        used = batch_of(result)
        assert used["size"] == 1 or used["size"] * used["padded_tokens"] <= BUDGET, used
    over = results[-1]
    assert batch_of(over)["size"] == 1 and over["outputs"]["length"] == [float(BUDGET + 100)]
    padding = padded_pool.metric("agent_workers_batch_tokens_total", {"model": model, "kind": "padding"})
    real = padded_pool.metric("agent_workers_batch_tokens_total", {"model": model, "kind": "real"})
    assert real == sum(lengths) and padding >= 0


def test_a_request_over_the_per_request_limit_fails_alone(padded_pool: Pool) -> None:
    model = unique("echo")
    padded_pool.store.create(model, make_spec("mask_echo"))
    rows = [[1, 2, 3], [7] * (MAX_ELEMENTS + 1), [4, 5]]
    results = padded_pool.client.predict_bulk(model, rows, timeout=60, return_exceptions=True)
    assert isinstance(results[1], InputError) and "limit" in str(results[1])
    assert results[0]["outputs"]["kept"] == [1, 2, 3] and results[2]["outputs"]["kept"] == [4, 5]


def test_a_long_request_is_not_starved_behind_short_ones(padded_pool: Pool) -> None:
    """The long request goes first into the queue, then a stream of short ones: length-aware formation must not
    keep deferring it (its batch computes first in its flush), so it is answered before most short ones."""
    model = unique("echo")
    padded_pool.store.create(model, make_spec("mask_echo"))
    rng = np.random.default_rng(4)
    rows = [ids(rng, 200)] + [ids(rng, int(n)) for n in rng.integers(2, 10, 120)]
    handles = padded_pool.client.send_predict_bulk(model, rows)
    padded_pool.client.collect(handles, timeout=60)
    backend = padded_pool.client.app.backend
    done = [backend.get_task_meta(task_id)["date_done"] for task_id in handles]
    shorts = sorted(done[1:])
    assert done[0] <= shorts[len(shorts) // 2], (done[0], shorts[0], shorts[-1])
