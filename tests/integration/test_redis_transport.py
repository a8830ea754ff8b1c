"""The loss-free Redis transport (agent_workers/worker/kombu_redis.py): what it cannot record it never pops."""

from __future__ import annotations

import base64
import json
import re
import uuid

import pytest
import redis

from agent_workers.models import make_spec
from tests.conftest import Pool, unique
from tests.integration.test_faults import wait_until

pytestmark = pytest.mark.integration


def _envelope(queue: str, properties: object) -> str:
    body = json.dumps([["m", [1.0, 2.0]], {}, {}]).encode()
    return json.dumps(
        {
            "body": base64.b64encode(body).decode(),
            "content-encoding": "utf-8",
            "content-type": "application/json",
            "headers": {"lang": "py", "task": "agent_workers.predict", "id": str(uuid.uuid4())},
            "properties": properties,
        }
    )


def _props(queue: str, tag: object) -> dict[str, object]:
    return {
        "delivery_mode": 2,
        "delivery_info": {"exchange": queue, "routing_key": queue},
        "priority": 0,
        "body_encoding": "base64",
        "delivery_tag": tag,
    }


def test_malformed_envelopes_are_dead_lettered_and_the_good_ones_served(start_pool) -> None:
    pool: Pool = start_pool("redis", queues="both")  # several queues: the rotating wake-up path
    model = unique("lin")
    pool.store.create(model, make_spec("linear", in_features=2))
    queue = pool.settings.inference_queue
    bad = [
        _envelope(queue, _props(queue, None)),  # cjson: a truthy userdata
        _envelope(queue, _props(queue, True)),
        _envelope(queue, _props(queue, {})),
        _envelope(queue, _props(queue, 5)),
        _envelope(queue, _props(queue, "")),
        _envelope(queue, None),
        "not json {",
        # Recorded (the tag is fine) but unreadable by kombu's Message: found by the fuzz suite, it stopped the worker.
        _envelope(queue, {**_props(queue, str(uuid.uuid4())), "body_encoding": {"x": 1}}),
        re.sub(r'"body": "[^"]*"', '"body": "A"', _envelope(queue, _props(queue, str(uuid.uuid4())))),  # bad base64
    ]
    broker = redis.Redis.from_url(pool.settings.broker_url)
    pid = pool.worker.pid
    try:
        first = [pool.client.app.send_task("agent_workers.predict", args=[model, [1.0, 2.0]]) for _ in range(2)]
        broker.lpush(queue, *bad)
        rest = [pool.client.app.send_task("agent_workers.predict", args=[model, [1.0, 2.0]]) for _ in range(3)]
        outputs = [pool.client.wait(h, 30) for h in first + rest]
        assert [o["version"] for o in outputs] == [0] * 5
        # The worker stayed up and still serves; every malformed envelope sits in the dead-letter list, none
        # was delivered or left in the unacknowledged hash.
        assert pool.client.predict(model, [1.0, 2.0], timeout=30)["version"] == 0
        assert pool.worker.pid == pid
        dead = [raw.decode() for raw in broker.lrange(f"{queue}.dead", 0, -1)]
        assert sorted(dead) == sorted(bad)
        recorded = {json.loads(v)[0].get("headers", {}).get("id") for v in broker.hvals("unacked")}
        assert not recorded & {json.loads(b)["headers"]["id"] for b in bad if b.startswith("{")}
    finally:
        broker.delete(f"{queue}.dead")
        broker.close()


def test_a_batch_ack_clears_each_tag_from_the_unacked_hash_index_and_held_set(start_pool) -> None:
    # ack_all acknowledges a batch in three variadic commands (ZREM, HDEL, SREM of every tag): none may stay behind,
    # or kombu's visibility sweep would redeliver an answered request.
    pool: Pool = start_pool("redis")
    model = unique("lin")
    pool.store.create(model, make_spec("linear", in_features=2))
    queue = pool.settings.inference_queue
    tags = [str(uuid.uuid4()) for _ in range(24)]
    envelopes = [json.loads(_envelope(queue, _props(queue, tag))) for tag in tags]
    for envelope in envelopes:
        envelope["body"] = base64.b64encode(json.dumps([[model, [1.0, 2.0]], {}, {}]).encode()).decode()
    broker = redis.Redis.from_url(pool.settings.broker_url)
    try:
        broker.lpush(queue, *(json.dumps(e) for e in envelopes))
        outputs = pool.client.collect([e["headers"]["id"] for e in envelopes], timeout=30)
        assert len(outputs) == len(tags)
        held = [k for k in broker.scan_iter(match=f"{pool.settings.namespace}:reclaim:held:*")]

        def left() -> list[object]:
            with broker.pipeline(transaction=False) as pipe:
                for tag in tags:
                    pipe.hexists("unacked", tag).zscore("unacked_index", tag)
                    for key in held:
                        pipe.sismember(key, tag)
                return [v for v in pipe.execute() if v]

        # Results are stored before their messages are acknowledged (at-least-once), so the last batch's ack may
        # still be on its way when collect returns: wait for it, then nothing may be left.
        wait_until(lambda: not left(), 10.0, "the batch's acks")
        assert left() == [], "acknowledged tags left in kombu's unacked hash/index or the held set"
    finally:
        broker.close()
