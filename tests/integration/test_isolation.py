"""Requests that must not cost others: held eta messages keep the window open, unknown models share one label."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
import requests
from celery.exceptions import TaskRevokedError

from agent_workers.errors import InputError, ModelError
from agent_workers.metrics import UNKNOWN_MODEL
from agent_workers.models import make_spec
from tests.conftest import Pool, unique

pytestmark = pytest.mark.integration


def test_requests_held_for_a_countdown_do_not_starve_the_next_one(broker: str, start_pool) -> None:
    pool: Pool = start_pool(broker, queues="inference")
    model = unique("lin")
    pool.store.create(model, make_spec("linear", in_features=2))
    held = [
        pool.client.app.send_task("agent_workers.predict", args=[model, [1.0, 2.0]], countdown=3600) for _ in range(128)
    ]
    assert pool.client.predict(model, [1.0, 2.0], timeout=30)["version"] == 0
    assert all(h.state == "PENDING" for h in held[:5])


def test_unknown_model_names_share_one_metric_label(pool: Pool) -> None:
    names = [unique("nosuch") for _ in range(3)]
    before = pool.metric("agent_workers_requests_total", {"model": UNKNOWN_MODEL})
    for name in names:
        with pytest.raises(ModelError):
            pool.client.predict(name, [1.0, 2.0], timeout=30)
    # A request's counter moves just after its result is stored: one more request, served after the last refused
    # one's flush finished (one event loop), makes sure every count above is in.
    known = unique("lin")
    pool.store.create(known, make_spec("linear", in_features=2))
    assert pool.client.predict(known, [1.0, 2.0], timeout=30)["version"] == 0
    assert pool.metric("agent_workers_requests_total", {"model": UNKNOWN_MODEL}) >= before + 3
    for name in names:
        assert pool.metric("agent_workers_requests_total", {"model": name}) == 0


def test_made_up_model_names_sent_to_train_step_share_one_metric_label(pool: Pool) -> None:
    names = [unique("nosuch") for _ in range(40)]
    before = pool.metric("agent_workers_requests_total", {"model": UNKNOWN_MODEL})
    handles = [pool.client.send_train_step(name, x=[[1.0, 2.0]], y=[[1.0]]) for name in names]
    answers = pool.client.collect([h.id for h in handles], 60, return_exceptions=True)
    assert all(isinstance(a, ModelError) and "unknown model" in str(a) for a in answers), answers[:3]
    # As above: one more step, on a known model, is counted after every refused one.
    known = unique("lin")
    pool.store.create(known, make_spec("linear", in_features=2))
    assert pool.client.train_step(known, x=[[1.0, 2.0]], y=[[1.0]], timeout=30)["version"] == 1
    assert pool.metric("agent_workers_requests_total", {"model": UNKNOWN_MODEL}) >= before + len(names)
    assert pool.metric("agent_workers_requests_total", {"model": known}) == 1
    text = requests.get(f"http://127.0.0.1:{pool.metrics_port}/metrics", timeout=5).text
    assert not [name for name in names if name in text], "a made-up model name became a metric series"


def test_held_eta_requests_count_against_the_queue_size_and_the_eta_horizon(broker: str, start_pool) -> None:
    pool: Pool = start_pool(broker, queues="inference", max_queue_size=4, max_eta_s=600)
    model = unique("lin")
    pool.store.create(model, make_spec("linear", in_features=2))
    send = pool.client.app.send_task
    held = [send("agent_workers.predict", args=[model, [1.0, 2.0]], countdown=300) for _ in range(12)]
    far = send("agent_workers.predict", args=[model, [1.0, 2.0]], countdown=3600)  # past AGENT_WORKERS_MAX_ETA_S
    never = send("agent_workers.predict", args=[model, [1.0, 2.0]], eta=datetime(9999, 12, 31, tzinfo=UTC))
    assert pool.client.predict(model, [1.0, 2.0], timeout=30)["version"] == 0  # still consuming
    for handle in (far, never):
        with pytest.raises(InputError, match="AGENT_WORKERS_MAX_ETA_S"):
            handle.get(timeout=30)
    # Only MAX_QUEUE_SIZE of the held requests are kept (each widens the prefetch window); the rest are revoked.
    revoked = 0
    for handle in held:
        if handle.state == "PENDING":
            continue
        with pytest.raises(TaskRevokedError, match="MAX_QUEUE_SIZE"):
            handle.get(timeout=30)
        revoked += 1
    assert revoked == len(held) - 4
