"""Idle-aware flushing on both brokers: a lone request is served as soon as the broker has nothing more to hand
over, not after ``max_wait_ms``; a burst still fills batches."""

from __future__ import annotations

import numpy as np
import pytest

from agent_workers.models import make_spec
from tests.conftest import Pool, reference, unique

pytestmark = pytest.mark.integration

#: Far longer than any result timeout below: a request answered at all was flushed because the broker was idle.
MAX_WAIT_MS = 30_000
RESULT_TIMEOUT = 15


def test_lone_request_is_served_without_waiting_out_max_wait(broker: str, start_pool) -> None:
    pool: Pool = start_pool(broker, queues="inference", max_wait_ms=MAX_WAIT_MS)
    model = unique("idle")
    pool.store.create(model, make_spec("mlp", in_features=4, hidden=[8], out_features=2))
    rows = np.random.default_rng(11).standard_normal((3, 4)).astype(np.float32)
    expected = reference(pool, model, rows)
    for i, row in enumerate(rows):  # one at a time: each one alone in the queue
        handle = pool.client.app.send_task("agent_workers.predict", kwargs={"model": model, "inputs": row.tolist()})
        result = pool.client.wait(handle, RESULT_TIMEOUT)
        np.testing.assert_allclose(result["outputs"], expected[i], rtol=1e-5, atol=1e-6)
    assert pool.metric("agent_workers_batch_size_count", {"model": model}) == 3


def test_burst_still_fills_batches_when_flushing_on_idle(broker: str, start_pool) -> None:
    pool: Pool = start_pool(broker, queues="inference", start=False, max_wait_ms=MAX_WAIT_MS, max_batch_size=16)
    model = unique("burst")
    pool.store.create(model, make_spec("mlp", in_features=4, hidden=[8], out_features=2))
    rows = np.random.default_rng(12).standard_normal((80, 4)).astype(np.float32)
    # queued before the worker starts, so the broker hands over many at once
    handles = [
        pool.client.app.send_task("agent_workers.predict", kwargs={"model": model, "inputs": row.tolist()})
        for row in rows
    ]
    pool.worker.start()
    expected = reference(pool, model, rows)
    for i, handle in enumerate(handles):
        np.testing.assert_allclose(
            pool.client.wait(handle, RESULT_TIMEOUT)["outputs"], expected[i], rtol=1e-5, atol=1e-6
        )
    batches = pool.metric("agent_workers_batch_size_count", {"model": model})
    served = pool.metric("agent_workers_batch_size_sum", {"model": model})
    assert served == 80
    assert served / batches > 1, f"{batches:.0f} batches for 80 requests: flushing on idle broke batching"


@pytest.mark.parametrize("depth", [0, 2], ids=["auto", "thread"])
def test_drain_batches_are_full_but_the_last_ones(broker: str, start_pool, depth: int) -> None:
    """A backlog drained through a prefetch window of two batches, with a wait shorter than it takes to read one
    batch's deliveries: every batch but the last ones is full, whether batches compute on the event loop (auto, a
    cheap model) or in the compute thread. On RabbitMQ the reader hands over one frame per loop callback, so the
    timer fired mid-delivery, and a short batch went to the compute thread behind the one in flight while the socket
    was dry only because the broker waited for acks (the prefetch window was full) or was refilling it."""
    size, n = 16, 960
    pool: Pool = start_pool(
        broker, queues="inference", start=False, max_wait_ms=0.5, max_batch_size=size, pipeline_depth=depth
    )
    model = unique("fill")
    pool.store.create(model, make_spec("mlp", in_features=64, hidden=[256, 256], out_features=10))
    rows = np.random.default_rng(13).standard_normal((n, 64)).astype(np.float32)
    handles = pool.client.send_predict_bulk(model, rows)
    pool.worker.start()
    pool.client.collect(handles, timeout=60)
    served = pool.metric("agent_workers_batch_size_sum", {"model": model})
    batches = pool.metric("agent_workers_batch_size_count", {"model": model})
    assert served == n
    # full batches but for the last ones (the window holds two): n / size, plus two short at most
    assert batches <= n // size + 2, f"{batches:.0f} batches of {size} for {n} requests: short batches formed"
