"""Hostile envelopes: a bad header fails its own request (or is dead-lettered) and never its batch-mates."""

from __future__ import annotations

import uuid

import numpy as np
import pytest
from celery.result import AsyncResult
from kombu import Connection, Exchange, Producer

from agent_workers.errors import InputError
from agent_workers.models import make_spec
from tests.conftest import Pool, reference, unique

pytestmark = pytest.mark.integration

BAD_HEADERS = {
    "retries-not-a-number": ({"retries": "x"}, "retries"),
    "retries-negative": ({"retries": -1}, "retries"),
    "id-an-integer": ({"id": 123}, None),
    "id-too-long": ({"id": "x" * 10_000}, None),
    "parent-id-beyond-64-bits": ({"parent_id": 2**70}, "parent_id"),
    "group-a-list": ({"group": [1, 2]}, "group"),
    "eta-garbage": ({"eta": "garbage"}, "eta"),
    "expires-a-number": ({"expires": 5}, "expires"),
    "argsrepr-huge": ({"argsrepr": "a" * 100_000}, "argsrepr"),  # AMQP: under the 128 KiB frame
    "task-an-object": ({"task": {"a": 1}}, None),  # unknown task to Celery: dropped and logged, no result
}


def _headers(task_id: object, **extra: object) -> dict[str, object]:
    headers: dict[str, object] = {"lang": "py", "task": "agent_workers.predict", "id": task_id, "retries": 0}
    headers.update(extra)
    return headers


class Text(str):
    """A body published as this JSON text, byte for byte (numbers no encoder writes: ``1e400``)."""


def publish_raw(pool: Pool, messages: list[tuple[dict[str, object], object]], queue: str | None = None) -> None:
    """Publish protocol-2 messages exactly as given (headers and body; a :class:`Text` body as its text), in order,
    on one channel.

    With publisher confirms on RabbitMQ: a message the broker itself refuses (a header table over its frame size)
    closes the channel, and without confirms the messages after it would vanish without a word.
    """
    queue = queue or pool.settings.inference_queue
    with Connection(pool.settings.broker_url, transport_options={"confirm_publish": True}) as conn:
        producer = Producer(conn.default_channel)
        for headers, body in messages:
            text = isinstance(body, Text)
            producer.publish(
                body.encode() if text else body,
                serializer=None if text else "json",
                content_type="application/json" if text else None,
                content_encoding="utf-8" if text else None,
                exchange=Exchange(queue, type="direct"),
                routing_key=queue,
                headers=headers,
                declare=[],
                retry=True,
            )


@pytest.mark.parametrize("case", sorted(BAD_HEADERS))
def test_bad_header_fails_only_its_own_request(pool: Pool, case: str) -> None:
    bad, named = BAD_HEADERS[case]
    if case == "parent-id-beyond-64-bits" and not pool.settings.broker_is_redis:
        pytest.skip("AMQP header tables cannot carry an integer beyond 64 bits: the producer refuses it")
    model = unique("lin")
    pool.store.create(model, make_spec("linear", in_features=2))
    pid = pool.worker.pid
    good = [f"good-{uuid.uuid4().hex}" for _ in range(10)]
    bad_id = f"bad-{uuid.uuid4().hex}"
    rows = [[float(i), 1.0] for i in range(10)]
    messages = [(_headers(task_id), [[model, row], {}, {}]) for task_id, row in zip(good, rows, strict=True)]
    messages.insert(5, (_headers(bad_id, **bad), [[model, [1.0, 1.0]], {}, {}]))
    publish_raw(pool, messages)
    outputs = [pool.client.wait(task_id, 30) for task_id in good]
    assert [o["version"] for o in outputs] == [0] * 10
    expected = reference(pool, model, np.array(rows))
    np.testing.assert_allclose([o["outputs"] for o in outputs], expected, rtol=1e-5, atol=1e-6)
    if named is not None:
        with pytest.raises(InputError, match=f"header '{named}'"):
            pool.client.wait(bad_id, 30)
        assert AsyncResult(bad_id, app=pool.client.app).state == "FAILURE"
    # The worker stayed up: same process, still serving.
    assert pool.worker.pid == pid
    assert pool.client.predict(model, [1.0, 2.0], timeout=30)["version"] == 0
