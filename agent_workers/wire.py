"""Celery protocol-2 messages on the wire, built once for the client and the tools.

A task message is headers (``celery.app.amqp.AMQP.as_task_v2``), properties and the JSON body
``[args, kwargs, embed]``. On RabbitMQ it is published as it is; on Redis, kombu's transport wraps it in a JSON
envelope (``kombu.transport.virtual.Channel.prepare_message`` + ``_inplace_augment_message``: body base64-encoded,
``body_encoding``, ``delivery_info`` and a uuid ``delivery_tag`` in the properties) and LPUSHes that onto the queue's
list. :func:`redis_envelope` is that envelope for any message; :class:`Envelope` renders the same bytes from a
template for the hot path of one task name and queue.

Messages go through the default exchange (``""``) with the queue name as routing key: kombu routes such a message
straight to the queue of that name, on Redis (``virtual.Channel._lookup``) and on RabbitMQ alike, also when it is
restored after a lost worker.
"""

from __future__ import annotations

import dataclasses
import json
import os
import socket
import uuid
from typing import Any

import pybase64

#: The ``embed`` part of a body: no callbacks, errbacks, chain or chord.
EMBED_JSON = '{"callbacks": null, "errbacks": null, "chain": null, "chord": null}'
EMBED: dict[str, Any] = {"callbacks": None, "errbacks": None, "chain": None, "chord": None}
DEFAULT_EXCHANGE = ""
#: (content type, content encoding) of a body, as kombu's serializers name them.
JSON = ("application/json", "utf-8")
MSGPACK = ("application/x-msgpack", "binary")
#: The ``serializer`` names a producer may pick (kombu's) -> content type and encoding.
SERIALIZERS = {"json": JSON, "msgpack": MSGPACK}


@dataclasses.dataclass(frozen=True)
class TaskMessage:
    """A Celery protocol-v2 message: headers, properties and the body ``[args, kwargs, embed]`` of ``content``
    (content type and encoding: JSON unless said)."""

    id: str
    headers: dict[str, Any]
    properties: dict[str, Any]
    body: bytes
    content: tuple[str, str] = JSON


def body(args_json: str, kwargs_json: str) -> bytes:
    """The JSON body ``[args, kwargs, embed]`` from already-encoded args and kwargs."""
    return f"[{args_json}, {kwargs_json}, {EMBED_JSON}]".encode()


def msgpack_body(kwargs: dict[str, Any]) -> bytes:
    """The msgpack body ``[args, kwargs, embed]`` of a call with keyword arguments, ``bytes`` packed as msgpack
    ``bin`` (what kombu's msgpack serializer writes: ``packb(..., use_bin_type=True)``)."""
    import msgpack  # only producers that pick msgpack pay for the import

    return msgpack.packb([[], kwargs, EMBED], use_bin_type=True)


def redis_envelope(
    message: TaskMessage, queue: str, *, delivery_tag: str | None = None, content: tuple[str, str] = JSON
) -> str:
    """The JSON kombu's Redis transport LPUSHes onto ``queue``'s list for ``message`` (whose body is of
    ``content``: content type and encoding, JSON by default)."""
    properties = {
        **message.properties,
        "delivery_mode": 2,
        "delivery_info": {"exchange": DEFAULT_EXCHANGE, "routing_key": queue},
        "priority": message.properties.get("priority") or 0,
        "body_encoding": "base64",
        "delivery_tag": delivery_tag or str(uuid.uuid4()),
    }
    return json.dumps(
        {
            "body": b64_text(message.body),
            "content-encoding": content[1],
            "content-type": content[0],
            "headers": message.headers,
            "properties": properties,
        }
    )


class Envelope:
    """Messages for one task name and queue, rendered from a template.

    The headers are those of ``as_task_v2`` for a call with keyword arguments; the Redis form is byte for byte what
    :func:`redis_envelope` builds. Everything constant is rendered once, so a message costs a few string joins.

    Args:
        task: task name, e.g. ``agent_workers.predict``.
        queue: the queue (also the routing key).
        reply_to: the producer's id (Celery's ``app.thread_oid``); only the ``rpc://`` backend reads it.
        content: the bodies' content type and encoding (:data:`JSON` or :data:`MSGPACK`).
    """

    _MARK = "\x00{}\x00"

    def __init__(self, *, task: str, queue: str, reply_to: str, content: tuple[str, str] = JSON) -> None:
        self.task = task
        self.queue = queue
        self.reply_to = reply_to
        self.content = content
        self.origin = f"{os.getpid()}@{socket.gethostname()}"
        mark = {name: self._MARK.format(name) for name in ("id", "argsrepr", "kwargsrepr", "body", "tag", "expires")}
        template = redis_envelope(
            TaskMessage(
                mark["id"],
                self.headers(mark["id"], mark["argsrepr"], mark["kwargsrepr"], mark["expires"]),
                self.properties(mark["id"]),
                b"",
            ),
            queue,
            delivery_tag=mark["tag"],
            content=content,
        )
        template = template.replace('"body": ""', f'"body": {json.dumps(mark["body"])}').replace("%", "%%")
        for name, value in mark.items():
            template = template.replace(json.dumps(value), f"%({name})s")
        self._template = template

    def headers(self, task_id: str, argsrepr: str, kwargsrepr: str, expires: str | None = None) -> dict[str, Any]:
        """The protocol-v2 headers of one message.

        Args:
            expires: ISO 8601 time after which a worker revokes the request unserved, or None.
        """
        return {
            "lang": "py",
            "task": self.task,
            "id": task_id,
            "shadow": None,
            "eta": None,
            "expires": expires,
            "group": None,
            "group_index": None,
            "retries": 0,
            "timelimit": [None, None],
            "root_id": task_id,
            "parent_id": None,
            "argsrepr": argsrepr,
            "kwargsrepr": kwargsrepr,
            "origin": self.origin,
            "ignore_result": False,
            "replaced_task_nesting": 0,
            "stamped_headers": None,
            "stamps": {},
        }

    def properties(self, task_id: str) -> dict[str, Any]:
        """The message properties Celery sets (``correlation_id`` is the task id)."""
        return {"correlation_id": task_id, "reply_to": self.reply_to, "delivery_mode": 2, "priority": 0}

    def message(
        self, task_id: str, body: bytes, argsrepr: str, kwargsrepr: str, expires: str | None = None
    ) -> TaskMessage:
        """One message, for brokers that take headers and properties as they are (RabbitMQ)."""
        return TaskMessage(
            task_id, self.headers(task_id, argsrepr, kwargsrepr, expires), self.properties(task_id), body
        )

    def redis(self, task_id: str, body: bytes, argsrepr: str, kwargsrepr: str, expires: str | None = None) -> str:
        """One message as the Redis transport stores it in the queue's list."""
        return self._template % {  # every value JSON-encoded; uuids and base64 need no escaping, only quotes
            "id": f'"{task_id}"',
            "body": f'"{b64_text(body)}"',
            "tag": f'"{uuid.uuid4()}"',
            "argsrepr": json.dumps(argsrepr),
            "kwargsrepr": json.dumps(kwargsrepr),
            "expires": json.dumps(expires),
        }


def b64_text(raw: bytes) -> str:
    """``raw`` in base64, as text (pybase64: what every Redis envelope carries its body in)."""
    return pybase64.b64encode(raw).decode("ascii")


class Base64Codec:
    """kombu's ``base64`` body codec (``virtual.Channel.codecs``: every Redis envelope's body) on pybase64, whose
    SIMD decoder takes ~5 µs for a 17 KB body where binascii takes ~50 µs. Same bytes, same errors."""

    def encode(self, s: str | bytes) -> str:
        return b64_text(s.encode() if isinstance(s, str) else s)

    def decode(self, s: str | bytes) -> bytes:
        return pybase64.b64decode(s.encode() if isinstance(s, str) else s)
