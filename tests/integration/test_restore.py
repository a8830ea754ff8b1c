"""Restoring unacknowledged messages, and who may say a message was redelivered (issue 18, findings 2, 6 and 12).

A Redis envelope kombu cannot restore (no ``delivery_info``, ``headers: null``, ``priority: 1e400``) is refused by
the pop script; one already in the unacknowledged index (written before that check) is dead-lettered by the restore,
alone: a worker starting on that broker database still starts, and the innocent messages beside it come back.
``redelivered`` is the broker's word (RabbitMQ's flag, our Redis restore's marker), never a producer's.
"""

from __future__ import annotations

import base64
import json
import shutil
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import redis
from kombu import Connection, Exchange, Producer

from agent_workers.contract import declare_queue
from agent_workers.errors import InputError
from agent_workers.keys import Keys
from agent_workers.models import make_spec
from agent_workers.tools.supervisor import LocalRedis
from agent_workers.worker import kombu_redis
from agent_workers.worker.kombu_redis import UNACKED_INDEX_KEY, UNACKED_KEY
from tests.conftest import Pool, need, unique
from tests.integration.test_envelope import _headers

pytestmark = pytest.mark.integration


def envelope(queue: str, task_id: str | None, model: str, **properties: Any) -> dict[str, Any]:
    """A kombu Redis envelope of a predict request, with ``properties`` replaced (``None`` values removed)."""
    body = base64.b64encode(json.dumps([[model, [1.0, 2.0]], {}, {}]).encode()).decode()
    props: dict[str, Any] = {
        "correlation_id": task_id,
        "delivery_mode": 2,
        "delivery_info": {"exchange": queue, "routing_key": queue},
        "priority": 0,
        "body_encoding": "base64",
        "delivery_tag": str(uuid.uuid4()),
    }
    props.update(properties)
    return {
        "body": body,
        "content-encoding": "utf-8",
        "content-type": "application/json",
        "headers": _headers(task_id),
        "properties": {k: v for k, v in props.items() if v is not None},
    }


def unrestorable(queue: str, model: str) -> dict[str, str]:
    """Envelopes kombu's restore cannot put back, as JSON text, by task id (``1e400`` written as a literal)."""
    out = {}
    for case in ("no-delivery-info", "null-delivery-info", "null-route", "null-headers", "list-headers", "priority"):
        task_id = f"{case}-{uuid.uuid4().hex[:8]}"
        env = envelope(queue, task_id, model)
        if case == "no-delivery-info":
            del env["properties"]["delivery_info"]
        elif case == "null-delivery-info":
            env["properties"]["delivery_info"] = None
        elif case == "null-route":
            env["properties"]["delivery_info"] = {"exchange": None, "routing_key": None}
        elif case == "null-headers":
            env["headers"] = None
        elif case == "list-headers":
            env["headers"] = [task_id]
        text = json.dumps(env)
        if case == "priority":
            text = text.replace('"priority": 0', '"priority": 1e400')
        out[task_id] = text
    return out


def test_pop_refuses_envelopes_kombu_could_not_restore(start_pool) -> None:
    pool: Pool = start_pool("redis", queues="inference")
    model = unique("lin")
    pool.store.create(model, make_spec("linear", in_features=2))
    queue = pool.settings.inference_queue
    broker = redis.Redis.from_url(pool.settings.broker_url)
    refused = unrestorable(queue, model)
    bad = [text.encode() for text in refused.values()]
    # Lua's parser takes invalid UTF-8, ours does not: recorded by the script, then dead-lettered, not left held.
    bad.append(json.dumps(envelope(queue, str(uuid.uuid4()), model)).replace('"py"', '"\xff"').encode("latin-1"))
    try:
        first = pool.client.app.send_task("agent_workers.predict", args=[model, [1.0, 2.0]])
        broker.lpush(queue, *bad)
        rest = pool.client.app.send_task("agent_workers.predict", args=[model, [1.0, 2.0]])
        assert [pool.client.wait(h, 30)["version"] for h in (first, rest)] == [0, 0]
        dead = set(broker.lrange(f"{queue}.dead", 0, -1))
        assert dead == set(bad), "an envelope kombu cannot restore, or we cannot read, was recorded as unacknowledged"
        assert not any(raw in broker.hvals(UNACKED_KEY) for raw in bad)
        for task_id in refused:  # those whose headers carry an id get a FAILURE that says why
            if "headers" not in task_id:
                with pytest.raises(InputError, match="cannot be restored"):
                    pool.client.wait(task_id, 30)
    finally:
        broker.delete(f"{queue}.dead")
        broker.close()


@pytest.fixture
def own_broker() -> Iterator[LocalRedis]:
    """A Redis of our own for the broker: a poisoned unacked index must never reach the shared one."""
    need(shutil.which("redis-server") is not None, "redis-server (to start a Redis of our own)")
    server = LocalRedis().start()
    yield server
    server.stop()
    shutil.rmtree(server.dir, ignore_errors=True)


def plant_held(broker: redis.Redis, queue: str, model: str, score: float) -> tuple[list[str], dict[str, str]]:
    """Unacknowledged entries of a worker that died: five innocent messages among the unrestorable ones, recorded as
    the old pop script recorded them ([envelope, exchange, routing key], null when the envelope had none), with
    index ``score``. Returns the innocent task ids and every entry by tag."""
    innocent = [f"innocent-{i}-{uuid.uuid4().hex[:8]}" for i in range(5)]
    entries = {}
    for i, (task_id, text) in enumerate(unrestorable(queue, model).items()):
        info = json.loads(text)["properties"].get("delivery_info") if "delivery-info" not in task_id else None
        route = [None, None] if not isinstance(info, dict) else [info.get("exchange"), info.get("routing_key")]
        entries[f"bad-tag-{i}-{uuid.uuid4().hex[:8]}"] = f"[{text}, {json.dumps(route[0])}, {json.dumps(route[1])}]"
    for task_id in innocent:
        env = envelope(queue, task_id, model)
        entries[env["properties"]["delivery_tag"]] = json.dumps([env, queue, queue])
    broker.hset(UNACKED_KEY, mapping=entries)
    broker.zadd(UNACKED_INDEX_KEY, dict.fromkeys(entries, score))
    return innocent, entries


def test_a_worker_starts_and_restores_innocent_messages_beside_unrestorable_ones(own_broker, start_pool) -> None:
    pool: Pool = start_pool("redis", queues="inference", start=False, broker_url=own_broker.url, reclaim_after=2)
    model = unique("lin")
    pool.store.create(model, make_spec("linear", in_features=2))
    queue = pool.settings.inference_queue
    broker = redis.Redis.from_url(own_broker.url)
    # Score 0 (older than any visibility timeout): kombu's visibility sweep restores them as the worker starts;
    # before the fix it raised there and the worker died, and so did every worker started after it.
    innocent, entries = plant_held(broker, queue, model, 0)
    pool.worker.start()
    for task_id in innocent:
        assert pool.client.wait(task_id, 30)["version"] == 0
    wait_for_empty_index(broker)
    # Held by a dead consumer (its heartbeat long gone), recent in the index: fast reclaim's sweep restores them.
    keys = Keys(pool.settings.namespace)
    again, more = plant_held(broker, queue, model, time.time())
    broker.sadd(keys.held("dead-worker"), *more)
    broker.zadd(keys.heartbeats(), {"dead-worker": 0})
    for task_id in again:
        assert pool.client.wait(task_id, 30)["version"] == 0
    wait_for_empty_index(broker)
    dead = broker.lrange(f"{queue}.dead", 0, -1) + broker.lrange(f"{kombu_redis.UNROUTABLE}.dead", 0, -1)
    unrestorable_count = len(entries) - len(innocent) + len(more) - len(again)
    assert len(dead) == unrestorable_count, "an unrestorable message was dropped instead of dead-lettered"
    assert pool.worker.proc is not None and pool.worker.proc.poll() is None


def wait_for_empty_index(broker: redis.Redis) -> None:
    from tests.fuzz.test_worker_fuzz import wait_until

    wait_until(lambda: broker.zcard(UNACKED_INDEX_KEY) == 0, 30, "every unacked entry restored or dead-lettered")


# -- redelivered ----------------------------------------------------------------------------------------------------


def publish(pool: Pool, headers: dict[str, Any], body: Any) -> None:
    s = pool.settings
    queue = declare_queue(s.inference_queue, s.queue_type, s.queue_max_priority)
    with Connection(s.broker_url) as conn:
        Producer(conn.default_channel).publish(
            body,
            serializer="json",
            exchange=Exchange(s.inference_queue, type="direct"),
            routing_key=s.inference_queue,
            headers=headers,
            declare=[queue],
            retry=True,
        )


def redeliver(pool: Pool, headers: dict[str, Any], body: Any) -> None:
    """Publish a message, then take it and hand it back unacknowledged, as a dying worker's broker would: the
    broker (RabbitMQ) or our Redis transport's restore marks it redelivered. The pool's worker must not run yet."""
    s = pool.settings
    publish(pool, headers, body)
    transport = kombu_redis.Transport if s.broker_is_redis else None
    with Connection(s.broker_url, transport=transport) as conn:
        queue = declare_queue(s.inference_queue, s.queue_type, s.queue_max_priority)(conn.default_channel)
        message = queue.get(no_ack=False)
        assert message is not None and not message.delivery_info.get("redelivered")
        message.requeue()


def test_a_producer_cannot_mark_its_message_redelivered(pool: Pool) -> None:
    model = unique("lin")
    pool.store.create(model, make_spec("linear", in_features=2))
    forged = [str(uuid.uuid4()) for _ in range(2)]
    publish(pool, {**_headers(forged[0]), "redelivered": True}, [[model, [1.0, 2.0]], {}, {}])
    if pool.settings.broker_is_redis:  # the envelope's own flags, as kombu's restore writes them
        env = envelope(pool.settings.inference_queue, forged[1], model)
        env["properties"]["delivery_info"]["redelivered"] = True
        env["headers"]["redelivered"] = True
        redis.Redis.from_url(pool.settings.broker_url).lpush(pool.settings.inference_queue, json.dumps(env))
    else:
        forged.pop()
    for task_id in forged:
        assert pool.client.wait(task_id, 30)["version"] == 0
        # Served in its batch, not alone as a suspect: no poison count written into the parameter Redis.
        assert not pool.store.client.exists(pool.store.keys.deliveries(task_id))


def test_a_broker_redelivery_is_served_alone_and_counted(broker: str, start_pool) -> None:
    pool: Pool = start_pool(broker, queues="inference", start=False)
    model = unique("lin")
    pool.store.create(model, make_spec("linear", in_features=2))
    task_id = str(uuid.uuid4())
    redeliver(pool, _headers(task_id), [[model, [1.0, 2.0]], {}, {}])
    pool.worker.start()
    assert pool.client.wait(task_id, 30)["version"] == 0
    assert int(pool.store.client.get(pool.store.keys.deliveries(task_id)) or 0) == 1
