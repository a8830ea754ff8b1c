"""Fuzz the real worker (Hypothesis) on both brokers: generated header values, bodies, argument values, numbers past
every range written as JSON literals (``1e400``, ``10**400``) in every numeric field, a producer-set ``redelivered``,
an ``eta`` past the eta horizon (days ahead up to year 9999) and, on Redis, raw kombu envelopes pushed past the
producer (``LPUSH``, through the Lua pop) with their fields replaced, nulled or missing (``properties``,
``delivery_info``, ``headers``, ``priority``).

Each example publishes a few hostile messages among three good ones in one go (one worker round trip per example)
and checks the promises as properties:

* every hostile message that carries a usable id reaches exactly one final state (SUCCESS, FAILURE or REVOKED);
* every good batch-mate succeeds with the output torch computes locally from the stored parameters;
* the worker never restarts (same pid);
* on Redis, every pushed envelope the worker took (did not dead-letter) could have been restored had it died;
and, once all examples ran: nothing stays unacknowledged (Redis: no unacked entry of ours; RabbitMQ: the queue is
empty), no prefetch slot leaked and the worker still consumes (a burst of more requests than its prefetch window is
answered), and no metrics series or Redis key grows with the number of bad messages (a forged ``redelivered`` would
write a poison counter per request).

``HYPOTHESIS_PROFILE=long`` (``make fuzz``) runs 500 examples per broker instead of 25.
"""

from __future__ import annotations

import json
import time
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import numpy as np
import pytest
import redis
import torch
from celery.result import AsyncResult
from hypothesis import given, reject
from hypothesis import strategies as st
from kombu import Connection

from agent_workers import numbers
from agent_workers.models import make_spec
from agent_workers.worker.kombu_redis import UNACKED_KEY
from agent_workers.worker.refused import unrestorable
from tests.conftest import Pool, unique
from tests.integration.test_envelope import Text, _headers, publish_raw
from tests.integration.test_restore import envelope as restore_envelope

pytestmark = pytest.mark.integration

FINAL = {"SUCCESS", "FAILURE", "REVOKED"}
HEADERS = (
    "retries",
    "root_id",
    "parent_id",
    "group",
    "eta",
    "expires",
    "argsrepr",
    "kwargsrepr",
    "timelimit",
    "redelivered",
)
#: Number literals no JSON encoder writes, or that parse differently on orjson and the standard library.
LITERALS = (
    "1e400",
    "-1e400",
    "1" + "0" * 400,
    "-" + "9" * 5000,
    "18446744073709551616",
    "-9223372036854775809",
    "9223372036854775807",
    "1e39",
    "3.5e38",
    "1e-400",
    "-0.0",
    "253402300800001",
    "1800000000",
    "2.0",
)
#: Where a literal goes in a predict call: ``%s`` is the literal, ``M`` the model name.
NUMERIC_FIELDS = (
    '[["M", [%s, 1.0]], {}, {}]',
    '[["M", [1.0, 2.0]], {"deadline_ms": %s}, {}]',
    '[["M", [1.0, 2.0], %s], {}, {}]',
    '[["M", [1.0, 2.0], null, %s], {}, {}]',
    '[["M", [1.0, 2.0]], {"min_version": %s, "deadline_ms": %s}, {}]',
    '[["M", [[%s], 1.0]], {}, {}]',
    '[["M", [1, %s]], {}, {}]',
)


def json_values(*, amqp: bool) -> st.SearchStrategy[Any]:
    """Any JSON value a producer could put in a header or a body (AMQP tables cannot carry ints beyond 64 bits)."""
    ints = st.integers(-(2**63), 2**63 - 1) if amqp else st.integers()
    # AMQP: one header frame holds at most frame_max (128 KiB) bytes; RabbitMQ answers a larger one by closing the
    # connection (INTERNAL_ERROR), before any worker sees it.
    long = st.just("x" * (500 if amqp else 5000))
    scalars = st.none() | st.booleans() | ints | st.floats() | st.text(max_size=300) | long
    return st.recursive(
        scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    )


def rows() -> st.SearchStrategy[Any]:
    """Argument values for a 2-feature model: mostly wrong (lengths, types, NaN/inf, nesting)."""
    floats = st.floats() | st.integers(-(2**70), 2**70)
    return (
        st.lists(floats, min_size=0, max_size=5)
        | st.lists(st.lists(floats, max_size=3), max_size=3)
        | st.text(max_size=20)
        | st.none()
        | st.dictionaries(st.text(max_size=4), floats, max_size=2)
    )


def hostile(model: str, *, amqp: bool) -> st.SearchStrategy[tuple[str, dict[str, Any], Any, bool]]:
    """(kind, headers overrides, body, has a usable id)."""
    values = json_values(amqp=amqp)
    header = st.builds(
        lambda h: ("header", h, [[model, [1.0, 2.0]], {}, {}], True),
        st.dictionaries(st.sampled_from(HEADERS), values, min_size=1, max_size=3),
    )
    bad_id = st.builds(lambda v: ("id", {"id": v}, [[model, [1.0, 2.0]], {}, {}], False), values)
    bad_task = st.builds(lambda v: ("task", {"task": v}, [[model, [1.0, 2.0]], {}, {}], False), values)
    number = st.builds(
        lambda field, literal: (
            "number",
            {},
            Text(field.replace('"M"', json.dumps(model)).replace("%s", literal)),
            True,
        ),
        st.sampled_from(NUMERIC_FIELDS),
        st.sampled_from(LITERALS),
    )
    forged = st.just(("forged", {"redelivered": True}, [[model, [1.0, 2.0]], {}, {}], True))
    # An eta past AGENT_WORKERS_MAX_ETA_S (24 h by default): refused at once, never held without bound.
    far_eta = st.builds(
        lambda eta: ("eta", {"eta": eta}, [[model, [1.0, 2.0]], {}, {}], True),
        st.sampled_from(["9999-12-31T23:59:59+00:00", "9999-12-31T23:59:59.999999", "3000-01-01T00:00:00Z"])
        | st.integers(2, 10_000).map(lambda days: (datetime.now(UTC) + timedelta(days=days)).isoformat()),
    )
    body = st.builds(lambda b: ("body", {}, b, True), values)
    args = st.builds(
        lambda name, row, kw: ("args", {}, [[name, row], kw, {}], True),
        st.just(model) | st.text(max_size=30),
        rows(),
        st.just({}) | st.dictionaries(st.text(max_size=8), values, max_size=2),
    )
    return st.one_of(header, bad_id, bad_task, body, args, number, forged, far_eta)


ENVELOPE_PARTS = (
    "delivery_tag",
    "body_encoding",
    "delivery_info",
    "priority",
    "content-type",
    "body",
    "headers",
    "properties",
    "redelivered",
)


def envelopes(queue: str) -> st.SearchStrategy[tuple[dict[str, Any], list[str], str | None]]:
    """Raw kombu Redis envelopes, as kombu would push them, with generated parts replaced or missing, and maybe a
    priority written as a literal no encoder writes (``LPUSH``)."""
    values = json_values(amqp=False)
    return st.tuples(
        st.dictionaries(st.sampled_from(ENVELOPE_PARTS), st.none() | values, max_size=3),
        st.lists(st.sampled_from(ENVELOPE_PARTS), max_size=2),
        st.none() | st.sampled_from(LITERALS),
    )


def envelope(
    queue: str, task_id: str, model: str, replace: dict[str, Any], remove: list[str], priority: str | None
) -> str:
    env = restore_envelope(queue, task_id, model)
    for key, value in sorted(replace.items(), key=lambda kv: kv[0] == "properties"):  # properties last
        if key in ("body", "content-type", "headers", "properties"):
            env[key] = value
        elif key == "redelivered":  # what kombu's restore writes, forged by a producer
            env["properties"]["delivery_info"] = {"exchange": queue, "routing_key": queue, "redelivered": True}
            env["headers"] = {**_headers(task_id), "redelivered": True}
        else:
            env["properties"][key] = value
    for key in remove:
        if key in env:
            del env[key]
        elif isinstance(env.get("properties"), dict):
            env["properties"].pop(key, None)
    text = json.dumps(env)
    if priority is not None and '"priority": 0' in text:
        text = text.replace('"priority": 0', f'"priority": {priority}', 1)
    return text


def held_but_unrestorable(broker: redis.Redis, queue: str, pushed: list[str]) -> list[str]:
    """Why each pushed envelope the worker took (it is not in ``<queue>.dead``) could not have been restored by
    kombu had its worker died (empty: every one could). Waits until the worker has taken all of them."""
    marks = [text.encode() for text in pushed]
    wait_until(
        lambda: not any(m in v for m in marks for v in broker.lrange(queue, 0, -1) + broker.hvals(UNACKED_KEY)),
        20,
        "the worker to take (and acknowledge) every pushed envelope",
    )
    dead = {raw.decode(errors="replace") for raw in broker.lrange(queue + ".dead", 0, -1)}
    problems = []
    for text in pushed:
        if text in dead:
            continue
        payload = numbers.loads(text)
        # Lua cannot tell an empty list from an empty object: ``headers: []`` is taken, and our restore moves it to
        # the dead-letter list (kombu's would drop it); never lost, never able to stop a sweep.
        if isinstance(payload, dict) and payload.get("headers") == []:
            continue
        problem = unrestorable(payload, "", queue)
        if problem:
            problems.append(f"{problem}: {text[:300]}")
    return problems


def final_state(pool: Pool, task_id: str) -> str:
    result = AsyncResult(task_id, app=pool.client.app)
    result.get(timeout=20, propagate=False)
    return str(result.state)


def series(pool: Pool) -> int:
    import requests
    from prometheus_client.parser import text_string_to_metric_families

    text = requests.get(f"http://127.0.0.1:{pool.metrics_port}/metrics", timeout=5).text
    return sum(len(f.samples) for f in text_string_to_metric_families(text) if f.name.startswith("agent_workers"))


def namespace_keys(pool: Pool) -> int:
    client = redis.Redis.from_url(pool.settings.params_url)
    return sum(1 for _ in client.scan_iter(match=f"{pool.settings.namespace}:*", count=1000))


def wait_until(condition: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.05)  # noqa: sleep-ok - poll interval of a deadline-bounded wait


@pytest.mark.timeout(900)
def test_no_message_can_hurt_another(pool: Pool) -> None:
    amqp = not pool.settings.broker_is_redis
    model = unique("fuzz")
    pool.store.create(model, make_spec("linear", in_features=2))
    snap = pool.store.read(model)
    module = pool.store.spec(model, snap.epoch).build()
    module.load_state_dict(snap.parameters())
    pid = pool.worker.pid
    prefix = f"fuzz-{uuid.uuid4().hex[:8]}-"
    queue = pool.settings.inference_queue
    broker = None if amqp else redis.Redis.from_url(pool.settings.broker_url)
    seen = {"examples": 0, "bad": 0, "baseline": None}
    good_rows = st.lists(st.floats(-1e3, 1e3, width=32), min_size=2, max_size=2)

    @given(
        bad=st.lists(hostile(model, amqp=amqp), min_size=1, max_size=4),
        raw=st.lists(envelopes(queue), max_size=0 if amqp else 2),
        good=st.lists(good_rows, min_size=3, max_size=3),
    )
    def example(bad: list[tuple[str, dict[str, Any], Any, bool]], raw: list[Any], good: list[list[float]]) -> None:
        n = seen["examples"]
        seen["examples"] += 1
        good_ids = [f"{prefix}{n}-good-{i}" for i in range(len(good))]
        bad_ids = [f"{prefix}{n}-bad-{i}" for i in range(len(bad))]
        messages = [(_headers(task_id), [[model, row], {}, {}]) for task_id, row in zip(good_ids, good, strict=True)]
        texts = []
        for task_id, (_kind, headers, body, _usable) in zip(bad_ids, bad, strict=True):
            if isinstance(body, Text):
                texts.append((_headers(task_id, **headers), body))
            else:
                messages.insert(1, (_headers(task_id, **headers), body))
        try:
            publish_raw(pool, texts + messages)
        except Exception as exc:  # noqa: BLE001 - the broker refused a message (RabbitMQ: a header over its frame)
            if not amqp:
                raise
            reject()  # not a message any worker can receive: the example says nothing about ours
            raise AssertionError("unreachable") from exc
        if broker is not None:
            pushed = [
                envelope(queue, f"{prefix}{n}-raw-{i}", model, replace, remove, priority)
                for i, (replace, remove, priority) in enumerate(raw)
            ]
            for text in pushed:
                broker.lpush(queue, text)
        seen["bad"] += len(bad) + len(raw)
        outputs = [pool.client.wait(task_id, 20) for task_id in good_ids]
        with torch.no_grad():
            expected = module(torch.tensor(good, dtype=torch.float32)).numpy()
        np.testing.assert_allclose([o["outputs"] for o in outputs], expected, rtol=1e-5, atol=1e-5)
        for task_id, (kind, _h, _b, usable) in zip(bad_ids, bad, strict=True):
            if usable:
                assert final_state(pool, task_id) in FINAL, (kind, task_id)
        assert pool.worker.pid == pid and pool.worker.proc.poll() is None, "the worker restarted"
        if broker is not None:
            problems = held_but_unrestorable(broker, queue, pushed)
            assert not problems, f"the worker held envelopes kombu could not have restored: {problems}"
        if seen["baseline"] is None:
            seen["baseline"] = (series(pool), namespace_keys(pool))

    example()
    # Nothing stays unacknowledged once every result is in (results are stored before the acks: wait for them).
    if broker is not None:
        wait_until(
            lambda: not any(prefix.encode() in v for v in broker.hvals(UNACKED_KEY)), 30, "the acks of our messages"
        )
    else:
        with Connection(pool.settings.broker_url) as conn:
            wait_until(
                lambda: conn.default_channel.queue_declare(queue, passive=True).message_count == 0, 30, "an empty queue"
            )
    # No prefetch slot leaked, and the worker still consumes: more requests than its prefetch window, all answered.
    burst = 2 * 2 * pool.settings.batch.max_batch_size + 1
    answers = pool.client.predict_bulk(model, [[1.0, 2.0]] * burst, timeout=60)
    assert len(answers) == burst and pool.worker.pid == pid
    # Nothing grows per bad message: at most a few series (outcome labels) and keys beyond the first example's.
    assert seen["baseline"] is not None
    base_series, base_keys = seen["baseline"]
    assert series(pool) - base_series <= 40, f"{seen['bad']} bad messages"
    assert namespace_keys(pool) - base_keys <= 5, f"{seen['bad']} bad messages"
    print(f"\n[{pool.broker}] {seen['examples']} examples, {seen['bad']} hostile messages; worker pid unchanged")
