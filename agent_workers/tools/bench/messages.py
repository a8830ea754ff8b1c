"""The benchmark's requests: protocol-v2 messages built once per input row, and a publisher that fills a queue
with them in bulk (LPUSH of kombu's envelope on Redis, ``basic_publish`` on RabbitMQ), outside the client."""

from __future__ import annotations

import itertools
import json
from collections.abc import Iterator, Sequence
from typing import Any
from urllib.parse import urlparse

from agent_workers.client.messages import short_repr
from agent_workers.contract import declare_queue
from agent_workers.tensors import encode_tensor
from agent_workers.tools.broker import REDIS_PRIORITY_SEP, REDIS_PRIORITY_STEPS, backlog, delete_queue
from agent_workers.wire import DEFAULT_EXCHANGE, MSGPACK, TaskMessage, msgpack_body, redis_envelope


def task_message(amqp: Any, task_id: str, name: str, args: list[Any]) -> TaskMessage:
    """Build the message ``send_task(name, args=args, task_id=task_id)`` would publish (``amqp`` is ``app.amqp``)."""
    headers, properties, body, _ = amqp.as_task_v2(task_id, name, args=args, kwargs={})
    return TaskMessage(task_id, headers, dict(properties), json.dumps(body).encode())


class MessageFactory:
    """Messages for one task name and model, cheap to make: ``as_task_v2`` runs once per input row (a template),
    and each message only swaps in its task id (``id``, ``root_id``, ``correlation_id``).
    """

    def __init__(self, amqp: Any, name: str, model: str, rows: Sequence[list[float]]) -> None:
        self.templates = [task_message(amqp, "0", name, [model, row]) for row in rows]

    def __call__(self, task_id: str, index: int) -> TaskMessage:
        t = self.templates[index % len(self.templates)]
        return TaskMessage(
            task_id,
            {**t.headers, "id": task_id, "root_id": task_id},
            {**t.properties, "correlation_id": task_id},
            t.body,
        )


#: How a producer encodes one float row (contract 1.2): ``json`` a list of full-precision floats, ``b64``
#: ``{"dtype": "float32", "shape", "b64"}`` in JSON (the Client's default for numpy), ``msgpack`` the same tensor's
#: raw bytes in a msgpack message (contract 1.3).
ENCODINGS = ("json", "b64", "msgpack")


class ProducerFactory:
    """Messages exactly as a bare Celery producer sends them: ``send_task(name, kwargs={"model": ..., "inputs":
    row})`` with a fresh random row and the app's own ``as_task_v2`` for every message.

    Args:
        encoding: how each row travels, one of :data:`ENCODINGS` (``json``: the float64 row's full-precision list;
            ``b64`` / ``msgpack``: the row as float32, what ``encode_tensor`` makes of a numpy array).
    """

    def __init__(
        self, amqp: Any, name: str, model: str, in_features: int, seed: int = 7, *, encoding: str = "json"
    ) -> None:
        import numpy as np

        if encoding not in ENCODINGS:
            raise ValueError(f"encoding must be one of {', '.join(ENCODINGS)}, got {encoding!r}")
        self.amqp, self.name, self.model, self.in_features = amqp, name, model, in_features
        self.encoding = encoding
        self.rng = np.random.default_rng(seed)

    def __call__(self, task_id: str, index: int) -> TaskMessage:
        row = self.rng.standard_normal(self.in_features)
        if self.encoding == "json":
            inputs: Any = row.tolist()
        else:
            inputs = encode_tensor(row, raw=self.encoding == "msgpack")
        kwargs = {"model": self.model, "inputs": inputs}
        # the repr of 4 KB of raw bytes is 16 KB of text: show the bytes' length, as the Client does
        kwargsrepr = short_repr({**kwargs, "inputs": "<tensor>"}) if self.encoding == "msgpack" else None
        headers, properties, body, _ = self.amqp.as_task_v2(
            task_id, self.name, args=(), kwargs=kwargs, kwargsrepr=kwargsrepr
        )
        if self.encoding == "msgpack":
            return TaskMessage(task_id, headers, dict(properties), msgpack_body(kwargs), MSGPACK)
        return TaskMessage(task_id, headers, dict(properties), json.dumps(body).encode())


class Publisher:
    """Publishes task messages onto one queue, on Redis (LPUSH of kombu's envelope) or RabbitMQ (``basic_publish``
    on a channel, what kombu's ``Producer.publish`` ends in, minus its per-call overhead)."""

    def __init__(self, broker_url: str, queue_name: str, *, max_priority: int = 0) -> None:
        self.url = broker_url
        self.queue = queue_name
        self.redis = urlparse(broker_url).scheme.lower() in {"redis", "rediss"}
        self._conn: Any = None
        self._channel: Any = None
        if self.redis:
            import redis

            self._client = redis.Redis.from_url(broker_url)
        else:
            from kombu import Connection

            self._conn = Connection(broker_url)
            self._channel = self._conn.channel()
            declare_queue(queue_name, max_priority=max_priority)(self._channel).declare()

    def send(self, message: TaskMessage) -> None:
        if self.redis:
            self._client.lpush(self._list(message), redis_envelope(message, self.queue, content=message.content))
            return
        properties = {**message.properties, "delivery_mode": 2}
        priority = properties.pop("priority", None) or 0
        amqp_message = self._channel.prepare_message(
            message.body, priority, *message.content, message.headers, properties
        )
        self._channel.basic_publish(amqp_message, exchange=DEFAULT_EXCHANGE, routing_key=self.queue)

    def _list(self, message: TaskMessage) -> str:
        """The Redis list kombu's transport pushes ``message`` onto: the queue's own for priority 0, else the
        sub-list of the nearest priority step at or below it (``<queue>\\x06\\x16<step>``)."""
        priority = message.properties.get("priority") or 0
        step = max((s for s in REDIS_PRIORITY_STEPS if s <= priority), default=0)
        return f"{self.queue}{REDIS_PRIORITY_SEP}{step}" if step else self.queue

    def fill(self, messages: Iterator[TaskMessage], chunk: int = 1000) -> int:
        """Publish everything ``messages`` yields, pipelined on Redis; returns the count."""
        count = 0
        if not self.redis:
            for message in messages:
                self.send(message)
                count += 1
            return count
        while True:
            batch = [redis_envelope(m, self.queue, content=m.content) for m in itertools.islice(messages, chunk)]
            if not batch:
                return count
            self._client.lpush(self.queue, *batch)
            count += len(batch)

    def depth(self) -> int:
        """Messages waiting in the queue."""
        if self.redis:
            return int(self._client.llen(self.queue))
        return backlog(self._channel, self.queue)

    def delete(self) -> None:
        """Remove the queue (and, on Redis, its kombu binding key; on RabbitMQ, its exchange)."""
        delete_queue(self._client if self.redis else self._channel, self.queue)

    def close(self) -> None:
        if self._conn is not None:
            self._conn.release()
        else:
            self._client.close()
