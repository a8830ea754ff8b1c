"""What a producer calls: inference and training jobs by task name, results from the Redis result backend.

    from agent_workers.client import Client
    client = Client.from_env()
    client.predict("linear", [0.1] * 10)                 # {'model': 'linear', 'version': 3, 'outputs': [0.09]}
    client.predict_bulk("linear", rows)                  # one result per row, in order
    await client.predict_async("linear", [0.1] * 10)

Predictions take a cheap path: the client builds the Celery protocol-v2 message itself (exactly the envelope kombu
puts on the wire, see :class:`Envelope`) and publishes it without ``apply_async``'s routing, signals and repr work;
a bulk of them goes out in one pipelined Redis round trip (or back to back on one AMQP channel). Results are read
straight from the Redis result backend: one pub/sub subscription for a whole bulk plus one MGET for those already
stored. ``python -m agent_workers.client --bench`` measures the producer CPU this saves.

A producer that does not want this package sends the same messages with any Celery client:
``send_task("agent_workers.predict", args=[model, inputs], queue="inference")`` (the contract is docs/tasks.md).
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import json
import math
import os
import socket
import struct
import threading
import time
import uuid
import weakref
from collections.abc import Callable, Iterable, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import urlparse

import redis
from celery import Celery
from celery.exceptions import TimeoutError as ResultTimeout
from celery.result import AsyncResult

from agent_workers import errors
from agent_workers.config import Settings
from agent_workers.errors import AgentWorkersError
from agent_workers.redis_clients import redis_client
from agent_workers.routing import FIT, PREDICT, PREDICT_MANY, TRAIN_STEP, declare_queue, task_routes

DEFAULT_TIMEOUT = 60.0
#: Messages per LPUSH command of a bulk (one pipeline carries them all).
LPUSH_CHUNK = 1000
#: Channels per SUBSCRIBE command.
SUBSCRIBE_CHUNK = 2000
#: While waiting, re-read still-missing results this often (seconds), in case a pub/sub message was lost.
RESYNC_INTERVAL = 1.0
KWARGSREPR_LIMIT = 120
READY_STATES = frozenset({"SUCCESS", "FAILURE", "REVOKED"})
_ERRORS: dict[str, type[AgentWorkersError]] = {name: getattr(errors, name) for name in errors.__all__}
_REDIS_URL_SCHEMES = {"redis", "rediss", "unix"}

__all__ = ["DEFAULT_TIMEOUT", "Client", "Envelope", "ResultTimeout", "bench", "producer_app"]


def producer_app(settings: Settings) -> Celery:
    """A minimal Celery app for producing: JSON only, our routes, our result backend."""
    app = Celery("agent_workers_client", broker=settings.broker_url, backend=settings.result_backend,
                 set_as_current=False)
    app.conf.update(task_serializer="json", result_serializer="json", accept_content=["json"],
                    result_accept_content=["json"], task_routes=task_routes(settings),
                    task_queues=[declare_queue(settings.inference_queue, settings.queue_type),
                                 declare_queue(settings.training_queue, settings.queue_type)],
                    broker_transport_options={"visibility_timeout": settings.visibility_timeout},
                    broker_connection_retry_on_startup=True)
    if urlparse(settings.broker_url).scheme == "sentinel":
        app.conf.broker_transport_options["master_name"] = settings.sentinel_master
    if urlparse(settings.result_backend).scheme == "sentinel":
        app.conf.result_backend_transport_options = {"master_name": settings.sentinel_master}
    return app


class Envelope:
    """Celery protocol-v2 messages for one task name and queue, built without Celery.

    The Redis form is byte-for-byte what ``kombu.transport.redis.Channel._put`` LPUSHes after
    ``virtual.Channel.prepare_message`` and ``_inplace_augment_message`` (body base64-encoded, ``body_encoding``,
    ``delivery_info`` and a uuid ``delivery_tag`` in the properties); the headers are those of
    ``celery.app.amqp.AMQP.as_task_v2``. Everything constant is rendered once into a template.

    Args:
        task: task name, e.g. ``agent_workers.predict``.
        queue: the queue; published through the default exchange with the queue name as routing key, as Celery
            itself does for direct queues.
        reply_to: the producer's id (Celery's ``app.thread_oid``); only the ``rpc://`` backend reads it.
    """

    _MARK = "\x00{}\x00"

    def __init__(self, *, task: str, queue: str, reply_to: str) -> None:
        self.task = task
        self.queue = queue
        self.reply_to = reply_to
        self.origin = f"{os.getpid()}@{socket.gethostname()}"
        mark = {name: self._MARK.format(name) for name in ("id", "argsrepr", "kwargsrepr", "body", "tag", "expires")}
        headers = self.headers(mark["id"], mark["argsrepr"], mark["kwargsrepr"], mark["expires"])
        message = {
            "body": mark["body"],
            "content-encoding": "utf-8",
            "content-type": "application/json",
            "headers": headers,
            "properties": {
                "correlation_id": mark["id"],
                "reply_to": reply_to,
                "delivery_mode": 2,
                "delivery_info": {"exchange": "", "routing_key": queue},
                "priority": 0,
                "body_encoding": "base64",
                "delivery_tag": mark["tag"],
            },
        }
        template = json.dumps(message).replace("%", "%%")
        for name, value in mark.items():
            template = template.replace(json.dumps(value), f"%({name})s")
        self._template = template

    def headers(self, task_id: str, argsrepr: str, kwargsrepr: str, expires: str | None = None) -> dict[str, Any]:
        """The protocol-v2 headers of one message (the AMQP form sends exactly these).

        Args:
            expires: ISO 8601 time after which a worker revokes the request unserved, or None.
        """
        return {
            "lang": "py", "task": self.task, "id": task_id, "shadow": None, "eta": None, "expires": expires,
            "group": None, "group_index": None, "retries": 0, "timelimit": [None, None], "root_id": task_id,
            "parent_id": None, "argsrepr": argsrepr, "kwargsrepr": kwargsrepr, "origin": self.origin,
            "ignore_result": False, "replaced_task_nesting": 0, "stamped_headers": None, "stamps": {},
        }

    @staticmethod
    def body(args_json: str, kwargs_json: str) -> bytes:
        """The JSON body ``[args, kwargs, embed]`` from already-encoded args and kwargs."""
        return (f'[{args_json}, {kwargs_json}, '
                '{"callbacks": null, "errbacks": null, "chain": null, "chord": null}]').encode()

    def redis(self, task_id: str, body: bytes, argsrepr: str, kwargsrepr: str, expires: str | None = None) -> str:
        """The whole message as the Redis transport stores it in the queue's list."""
        return self._template % {  # every value JSON-encoded; uuids and base64 need no escaping, only quotes
            "id": f'"{task_id}"', "body": f'"{base64.b64encode(body).decode("ascii")}"', "tag": f'"{uuid.uuid4()}"',
            "argsrepr": json.dumps(argsrepr), "kwargsrepr": json.dumps(kwargsrepr), "expires": json.dumps(expires),
        }


class AmqpFrames:
    """The AMQP 0-9-1 frames that publish an :class:`Envelope`'s messages through the default exchange.

    ``py-amqp`` re-serializes the whole headers table and makes one ``sendall`` per message (about 100 us of CPU);
    here the constant part of the table is encoded once, by py-amqp's own ``dumps``, and only the per-message
    strings are appended, so a bulk is a few string joins and one socket write. Frames as in the AMQP 0-9-1 spec
    §4.2.3 (method ``basic.publish``, content header, body split at ``frame_max - 8``), properties in the order of
    ``amqp.basic_message.Message.PROPERTIES``.

    Args:
        envelope: task, queue and reply_to of the messages.
        channel_id: the open channel to publish on.
        frame_max: the connection's negotiated frame size.
    """

    _VARIABLE = ("id", "root_id", "kwargsrepr", "expires")
    # content_type, content_encoding, application_headers, delivery_mode, priority, correlation_id, reply_to
    _FLAGS = 0xFE00

    def __init__(self, envelope: Envelope, *, channel_id: int, frame_max: int) -> None:
        from amqp.serialization import dumps

        self.channel_id = channel_id
        self.chunk = frame_max - 8
        constant = {k: v for k, v in envelope.headers("", "()", "").items() if k not in self._VARIABLE}
        self._table = dumps("F", [constant])[4:]  # without its length prefix: entries follow
        publish = struct.pack(">HHH", 60, 40, 0) + _shortstr("") + _shortstr(envelope.queue) + b"\x00"
        self._method = self._frame(1, publish)
        self._content_head = struct.pack(">H", self._FLAGS) + _shortstr("application/json") + _shortstr("utf-8")
        self._reply_to = _shortstr(envelope.reply_to)

    def _frame(self, kind: int, payload: bytes) -> bytes:
        return struct.pack(">BHI", kind, self.channel_id, len(payload)) + payload + b"\xce"

    def render(self, task_id: str, body: bytes, kwargsrepr: str, expires: str | None = None) -> bytes:
        """All frames of one message, ready for the socket."""
        ident = _longstr_entry("id", task_id)
        table = (self._table + ident + _longstr_entry("root_id", task_id) + _longstr_entry("kwargsrepr", kwargsrepr)
                 + (_longstr_entry("expires", expires) if expires is not None else b"\x07expiresV"))
        header = (struct.pack(">HHQ", 60, 0, len(body)) + self._content_head + struct.pack(">I", len(table)) + table
                  + b"\x02\x00" + _shortstr(task_id) + self._reply_to)
        parts = [self._method, self._frame(2, header)]
        for start in range(0, len(body), self.chunk):
            parts.append(self._frame(3, body[start : start + self.chunk]))
        return b"".join(parts)


def _shortstr(value: str) -> bytes:
    raw = value.encode()
    return bytes((len(raw),)) + raw


def _longstr_entry(key: str, value: str) -> bytes:
    raw = value.encode()
    return _shortstr(key) + b"S" + struct.pack(">I", len(raw)) + raw


def _predict_parts(model_json: str, model: str, inputs: Any, version: int | None) -> tuple[bytes, str]:
    """Body and kwargs repr of one ``agent_workers.predict`` message (kwargs: model, inputs[, version])."""
    if hasattr(inputs, "tolist"):  # numpy arrays and scalars
        inputs = inputs.tolist()
    inputs_json = json.dumps(inputs)
    extra = "" if version is None else f', "version": {int(version)}'
    body = Envelope.body("[]", f'{{"model": {model_json}, "inputs": {inputs_json}{extra}}}')
    shown = inputs_json if len(inputs_json) <= KWARGSREPR_LIMIT else inputs_json[: KWARGSREPR_LIMIT - 3] + "..."
    return body, f"{{'model': {model!r}, 'inputs': {shown}{extra.replace(chr(34), chr(39))}}}"


class _Publisher:
    """Publishes prepared predict messages on one broker connection (Redis or AMQP), thread-safe.

    Redis: one LPUSH of many messages (a pipeline of them past :data:`LPUSH_CHUNK`). AMQP: the frames of all
    messages in one socket write on a connection of our own; no publisher confirms, like Celery's default.
    """

    #: An AMQP connection idle this long (seconds) is checked with one round trip before a publish.
    IDLE_CHECK = 10.0

    def __init__(self, app: Celery, settings: Settings) -> None:
        self.app = app
        self.settings = settings
        self.is_redis = urlparse(settings.broker_url).scheme in _REDIS_URL_SCHEMES | {"sentinel"}
        self._redis = (redis_client(settings.broker_url, sentinel_master=settings.sentinel_master)
                       if self.is_redis else None)
        self._lock = threading.Lock()
        self._conn: Any = None
        self._frames: dict[str, AmqpFrames] = {}
        self._last_used = 0.0

    def publish(self, envelope: Envelope, items: Sequence[tuple[str, bytes, str]], expires: str | None = None) -> None:
        """Publish ``(task_id, body, kwargsrepr)`` items in one round trip."""
        if self._redis is not None:
            messages = [envelope.redis(i, body, "()", kwrepr, expires) for i, body, kwrepr in items]
            if len(messages) <= LPUSH_CHUNK:
                self._redis.lpush(envelope.queue, *messages)
                return
            pipe = self._redis.pipeline(transaction=False)
            for start in range(0, len(messages), LPUSH_CHUNK):
                # LPUSH of several values keeps their order for the consumer's BRPOP (first in, first out).
                pipe.lpush(envelope.queue, *messages[start : start + LPUSH_CHUNK])
            pipe.execute()
            return
        with self._lock:
            try:
                frames = self._amqp_frames(envelope)
            except self._amqp_errors():
                self._amqp_reset()  # a stale connection found before anything was sent: one fresh try
                frames = self._amqp_frames(envelope)
            data = [frames.render(task_id, body, kwrepr, expires) for task_id, body, kwrepr in items]
            try:
                self._conn.connection.transport.write(b"".join(data))
            except self._amqp_errors():
                self._amqp_reset()
                raise
            self._last_used = time.monotonic()

    def _amqp_frames(self, envelope: Envelope) -> AmqpFrames:
        """The frame renderer for ``envelope``'s queue on a live connection (declaring the queue once)."""
        if self._conn is None:
            self._conn = self.app.connection_for_write(heartbeat=0)  # a producer that idles must not be dropped
            self._conn.ensure_connection(max_retries=3)
            self._frames.clear()
        channel = self._conn.default_channel
        frames = self._frames.get(envelope.queue)
        if frames is None:
            # The default exchange drops messages for a queue nobody declared, so declare it exactly as workers do.
            declare_queue(envelope.queue, self.settings.queue_type)(channel).declare()
            frames = AmqpFrames(envelope, channel_id=channel.channel_id, frame_max=self._conn.connection.frame_max)
            self._frames[envelope.queue] = frames
        elif time.monotonic() - self._last_used > self.IDLE_CHECK:
            channel.queue_declare(envelope.queue, passive=True)  # one round trip: raises if the link is dead
        try:
            self._conn.connection.drain_events(timeout=0)  # a connection.blocked or channel.close waiting for us
        except TimeoutError:
            pass
        return frames

    def _amqp_errors(self) -> tuple[type[BaseException], ...]:
        conn = self._conn or self.app.connection_for_write()
        return (*conn.connection_errors, *conn.channel_errors, OSError)

    def _amqp_reset(self) -> None:
        conn, self._conn = self._conn, None
        self._frames.clear()
        if conn is not None:
            try:
                conn.close()
            except Exception:  # noqa: BLE001 - already broken
                pass

    def close(self) -> None:
        with self._lock:
            self._amqp_reset()
        if self._redis is not None:
            self._redis.close()


class _Collection:
    """What one wait for many results knows, shared by the blocking and the asyncio loop: which keys are still
    pending, which subscriptions are unconfirmed, and the metas found so far (in id order)."""

    def __init__(self, prefix: str, ids: Sequence[str],
                 on_ready: Callable[[int, dict[str, Any]], None] | None = None) -> None:
        self.ids = ids
        self.index = {prefix + task_id: i for i, task_id in enumerate(ids)}
        self.metas: list[dict[str, Any] | None] = [None] * len(ids)
        self.pending = set(self.index)
        self.unconfirmed: set[str] = set()
        self.on_ready = on_ready

    def take(self, key: str, raw: Any) -> None:
        """Record a stored or published result record if it is final."""
        if raw is None or key not in self.pending:
            return
        meta = json.loads(raw)
        if meta.get("status") in READY_STATES:
            self.pending.discard(key)
            self.metas[self.index[key]] = meta
            if self.on_ready is not None:
                self.on_ready(self.index[key], meta)

    def on_message(self, message: dict[str, Any]) -> bool:
        """Handle one pub/sub message; True when every subscription is confirmed and stored results must be read
        (a result published before we listened is already stored: the backend SETs before it PUBLISHes)."""
        channel = message["channel"].decode()
        if message["type"] == "message":
            self.take(channel, message["data"])
        elif message["type"] == "subscribe" and self.unconfirmed:
            self.unconfirmed.discard(channel)
            return not self.unconfirmed
        return False

    def check_deadline(self, now: float, deadline: float, timeout: float) -> None:
        if now >= deadline:
            raise ResultTimeout(f"{len(self.pending)} of {len(self.ids)} results not ready after {timeout:g}s")


class _Results:
    """Reads many results from the Redis result backend: one subscription, one MGET, then pub/sub messages.

    Subscribing first and reading the keys only once every subscription is confirmed loses nothing: the backend
    stores a result (SETEX) before it publishes it, on one connection, so a result published before we listened
    is already readable. Celery's Redis backend and our batcher both write ``celery-task-meta-<id>`` that way.
    """

    def __init__(self, app: Celery, url: str) -> None:
        self.app = app
        self.prefix = app.backend.get_key_for_task("x").decode()[:-1]  # celery-task-meta-, any global prefix
        self.url = url
        self.redis = redis.Redis.from_url(url)
        self._local = threading.local()
        self._pubsubs: weakref.WeakSet[Any] = weakref.WeakSet()
        self._aredis: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, Any] = weakref.WeakKeyDictionary()

    def _pubsub(self) -> Any:
        ps = getattr(self._local, "pubsub", None)
        if ps is None:
            ps = self._local.pubsub = self.redis.pubsub()
            self._pubsubs.add(ps)
        return ps

    def collect(self, ids: Sequence[str], timeout: float,
                on_ready: Callable[[int, dict[str, Any]], None] | None = None) -> list[dict[str, Any]]:
        """Wait for the result meta of every id (``status`` in SUCCESS/FAILURE/REVOKED); metas in id order.

        Raises:
            ResultTimeout: some results were not ready within ``timeout`` seconds.
        """
        deadline = time.monotonic() + timeout
        state = _Collection(self.prefix, ids, on_ready)

        def read_stored() -> None:
            keys = list(state.pending)
            for start in range(0, len(keys), SUBSCRIBE_CHUNK):
                chunk = keys[start : start + SUBSCRIBE_CHUNK]
                for key, raw in zip(chunk, self.redis.mget(chunk), strict=True):
                    state.take(key, raw)

        def subscribe(keys: list[str]) -> None:
            state.unconfirmed.update(keys)
            for start in range(0, len(keys), SUBSCRIBE_CHUNK):
                ps.subscribe(*keys[start : start + SUBSCRIBE_CHUNK])

        ps = self._pubsub()
        keys = list(state.index)
        resync = time.monotonic() + RESYNC_INTERVAL
        try:
            subscribe(keys)
            while state.pending:
                now = time.monotonic()
                state.check_deadline(now, deadline, timeout)
                try:
                    message = ps.get_message(timeout=min(deadline, resync) - now)
                except (redis.ConnectionError, redis.TimeoutError):
                    if time.monotonic() >= deadline:
                        raise
                    ps.reset()  # Redis went away: listen again on a fresh connection, then re-read
                    state.unconfirmed.clear()
                    subscribe(list(state.pending))
                    continue
                if message is None:
                    if time.monotonic() >= resync:
                        read_stored()
                        resync = time.monotonic() + RESYNC_INTERVAL
                elif state.on_message(message):
                    read_stored()
        finally:
            self._unsubscribe(ps, keys)
        return state.metas  # type: ignore[return-value]

    def _unsubscribe(self, ps: Any, keys: list[str]) -> None:
        try:
            for start in range(0, len(keys), SUBSCRIBE_CHUNK):
                ps.unsubscribe(*keys[start : start + SUBSCRIBE_CHUNK])
        except redis.RedisError:
            ps.reset()  # a fresh connection next time; the server drops the old one's subscriptions

    async def collect_async(self, ids: Sequence[str], timeout: float) -> list[dict[str, Any]]:
        """asyncio form of :meth:`collect` (redis.asyncio; no thread per waiting request)."""
        client = self._async_client()
        deadline = time.monotonic() + timeout
        state = _Collection(self.prefix, ids)
        state.unconfirmed.update(state.index)

        async def read_stored() -> None:
            keys = list(state.pending)
            for key, raw in zip(keys, await client.mget(keys), strict=True):
                state.take(key, raw)

        ps = client.pubsub()
        try:
            await ps.subscribe(*state.index)
            resync = time.monotonic() + RESYNC_INTERVAL
            while state.pending:
                now = time.monotonic()
                state.check_deadline(now, deadline, timeout)
                message = await ps.get_message(timeout=min(deadline, resync) - now)
                if message is None:
                    if time.monotonic() >= resync:
                        await read_stored()
                        resync = time.monotonic() + RESYNC_INTERVAL
                elif state.on_message(message):
                    await read_stored()
        finally:
            await ps.aclose()
        return state.metas  # type: ignore[return-value]

    def _async_client(self) -> Any:
        """One redis.asyncio client per event loop (a client is bound to the loop that created it)."""
        import redis.asyncio as aioredis

        loop = asyncio.get_running_loop()
        client = self._aredis.get(loop)
        if client is None:
            client = self._aredis[loop] = aioredis.Redis.from_url(self.url)
        return client

    def close(self) -> None:
        for ps in list(self._pubsubs):
            ps.close()
        self.redis.close()


class Client:
    """Send inference and training jobs and wait for their results.

    Args:
        settings: broker, backend and queue names (``Settings.from_env()`` when omitted).
        app: an existing Celery app to send training jobs with, instead of a new producer app.

    Every ``wait``-ing method raises our typed errors for a task that failed on our side (:class:`InputError`,
    :class:`ModelError`, :class:`StoreError` and its subclasses), Celery's exception otherwise (e.g.
    ``TaskRevokedError``), and :data:`ResultTimeout` (``celery.exceptions.TimeoutError``) when no result came within
    ``timeout`` seconds.
    """

    def __init__(self, settings: Settings | None = None, *, app: Celery | None = None) -> None:
        self.settings = settings or Settings.from_env()
        self.app = app or producer_app(self.settings)
        self.id = str(uuid.uuid4())
        self._predict = Envelope(task=PREDICT, queue=self.settings.inference_queue, reply_to=self.id)
        self._publisher = _Publisher(self.app, self.settings)
        self._results = _Results(self.app, self.settings.result_backend) if urlparse(
            self.settings.result_backend).scheme in _REDIS_URL_SCHEMES else None

    @classmethod
    def from_env(cls) -> Client:
        return cls(Settings.from_env())

    def close(self) -> None:
        """Release the broker and backend connections."""
        self._publisher.close()
        if self._results is not None:
            self._results.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- predict --------------------------------------------------------------------------------------------------

    def send_predict(self, model: str, inputs: Sequence[float], *, version: int | None = None,
                     expires: float | None = None) -> AsyncResult:
        """Enqueue one prediction (the cheap path: no ``apply_async``); returns its result handle at once."""
        task_id = self.send_predict_bulk(model, [inputs], version=version, expires=expires)[0]
        return AsyncResult(task_id, app=self.app)

    def send_predict_bulk(self, model: str, rows: Iterable[Sequence[float]], *, version: int | None = None,
                          expires: float | None = None) -> list[str]:
        """Enqueue one ``agent_workers.predict`` message per row in one round trip; returns their task ids.

        Args:
            version: pin a parameter version (default: the newest when the request is served).
            expires: seconds from now after which workers drop a request unserved (state REVOKED).
        """
        model_json = json.dumps(model)
        items = []
        for row in rows:
            body, kwrepr = _predict_parts(model_json, model, row, version)
            items.append((str(uuid.uuid4()), body, kwrepr))
        when = None
        if expires is not None:
            when = (datetime.now(UTC) + timedelta(seconds=expires)).isoformat()
        self._publisher.publish(self._predict, items, when)
        return [task_id for task_id, _, _ in items]

    def predict(self, model: str, inputs: Sequence[float], *, version: int | None = None,
                timeout: float = DEFAULT_TIMEOUT) -> dict[str, Any]:
        """Score one example and wait for it: ``{"model", "version", "outputs"}``.

        Raises:
            InputError / ModelError / StoreError: the worker refused the request (message says why).
            ResultTimeout: no result within ``timeout`` seconds.
        """
        ids = self.send_predict_bulk(model, [inputs], version=version)
        return self.collect(ids, timeout)[0]

    def predict_bulk(self, model: str, rows: Iterable[Sequence[float]], *, version: int | None = None,
                     timeout: float = DEFAULT_TIMEOUT, on_result: Callable[[int], None] | None = None,
                     return_exceptions: bool = False) -> list[Any]:
        """Score many examples, one message each (the workers batch them), published and collected together.

        Args:
            on_result: called with a row's index as its result arrives.
            return_exceptions: put a failed row's error in its place instead of raising the first one.
        Returns:
            One result per row, in row order.
        """
        ids = self.send_predict_bulk(model, rows, version=version)
        return self.collect(ids, timeout, on_result=on_result, return_exceptions=return_exceptions)

    def predict_many(self, model: str, rows: Sequence[Sequence[float]], *, version: int | None = None,
                     timeout: float = DEFAULT_TIMEOUT) -> dict[str, Any]:
        """Score many examples carried by one message (offline scoring)."""
        return self.wait(self.send_predict_many(model, rows, version=version), timeout)

    def send_predict_many(self, model: str, rows: Sequence[Sequence[float]], *,
                          version: int | None = None) -> AsyncResult:
        kwargs: dict[str, Any] = {"model": model, "inputs": [_plain(r) for r in rows]}
        if version is not None:
            kwargs["version"] = version
        return self.app.send_task(PREDICT_MANY, kwargs=kwargs)

    # -- training -------------------------------------------------------------------------------------------------

    def send_train_step(self, model: str, *, x: Any = None, y: Any = None, dataset: str | None = None,
                        rows: Sequence[int] | None = None, hparams: dict[str, Any] | None = None,
                        update_id: str | None = None) -> AsyncResult:
        """Enqueue one training step (inline ``x``/``y`` or ``rows`` of an uploaded dataset)."""
        kwargs: dict[str, Any] = {"model": model, "hparams": hparams or {}}
        if dataset is not None:
            kwargs.update(dataset=dataset, rows=[int(r) for r in rows or ()])
        else:
            kwargs.update(x=_plain(x), y=_plain(y))
        if update_id is not None:
            kwargs["update_id"] = update_id
        return self.app.send_task(TRAIN_STEP, kwargs=kwargs)

    def train_step(self, model: str, *, timeout: float = DEFAULT_TIMEOUT, **kwargs: Any) -> dict[str, Any]:
        """One training step, waited for (arguments as :meth:`send_train_step`)."""
        return self.wait(self.send_train_step(model, **kwargs), timeout)

    def send_fit(self, model: str, dataset: str, *, epochs: int = 10, batch_size: int = 100,
                 hparams: dict[str, Any] | None = None, seed: int = 0) -> AsyncResult:
        """Enqueue a whole training job that one worker runs (progress in the task's ``PROGRESS`` meta)."""
        return self.app.send_task(FIT, kwargs={"model": model, "dataset": dataset, "epochs": epochs,
                                               "batch_size": batch_size, "hparams": hparams or {}, "seed": seed})

    def fit(self, model: str, dataset: str, *, timeout: float = 600.0, **kwargs: Any) -> dict[str, Any]:
        """Run a whole training job and wait for it: ``{"model", "version", "steps", "history"}``."""
        return self.wait(self.send_fit(model, dataset, **kwargs), timeout)

    def train(self, model: str, dataset: str, n_rows: int, *, epochs: int, batch_size: int,
              hparams: dict[str, Any] | None = None, seed: int = 0, window: int = 8,
              timeout: float = DEFAULT_TIMEOUT, on_step: Callable[[dict[str, Any]], None] | None = None,
              ) -> list[dict[str, Any]]:
        """Data-parallel training through the queue: every mini-batch is its own ``train_step`` message.

        At most ``window`` steps are in flight, which bounds how stale a gradient can get with many workers.
        Returns the step results in completion order.
        """
        import numpy as np

        rng = np.random.default_rng(seed)
        steps = math.ceil(n_rows / batch_size)
        in_flight: list[AsyncResult] = []
        results: list[dict[str, Any]] = []

        def drain(keep: int) -> None:
            while len(in_flight) > keep:
                result = self.wait(in_flight.pop(0), timeout)
                results.append(result)
                if on_step is not None:
                    on_step(result)

        for _ in range(epochs):
            order = rng.permutation(n_rows)
            for i in range(steps):
                rows = order[i * batch_size : (i + 1) * batch_size]
                in_flight.append(self.send_train_step(model, dataset=dataset, rows=rows.tolist(), hparams=hparams))
                drain(window - 1)
        drain(0)
        return results

    # -- waiting --------------------------------------------------------------------------------------------------

    def wait(self, handle: AsyncResult | str, timeout: float = DEFAULT_TIMEOUT) -> Any:
        """Wait for one result; a task failure comes back as our typed error when the class is ours."""
        task_id = handle if isinstance(handle, str) else handle.id
        return self.collect([task_id], timeout)[0]

    def collect(self, ids: Sequence[str], timeout: float = DEFAULT_TIMEOUT, *,
                on_result: Callable[[int], None] | None = None, return_exceptions: bool = False) -> list[Any]:
        """Wait for the results of many task ids together; results in id order.

        Raises:
            the first failed task's error (unless ``return_exceptions``), or ResultTimeout.
        """
        if self._results is None:  # not a Redis backend: Celery's own, one by one
            return [self._unwrap_celery(AsyncResult(i, app=self.app), timeout, return_exceptions) for i in ids]
        metas = self._results.collect(ids, timeout, None if on_result is None else lambda i, _m: on_result(i))
        return [self._outcome(meta, task_id, return_exceptions) for meta, task_id in zip(metas, ids, strict=True)]

    def _outcome(self, meta: dict[str, Any], task_id: str, return_exceptions: bool) -> Any:
        if meta["status"] == "SUCCESS":
            return meta["result"]
        error = self.error_from(meta["result"])
        error.task_id = task_id  # type: ignore[attr-defined]
        if return_exceptions:
            return error
        raise error

    def _unwrap_celery(self, handle: AsyncResult, timeout: float, return_exceptions: bool) -> Any:
        try:
            return handle.get(timeout=timeout, disable_sync_subtasks=False)
        except ResultTimeout:
            raise
        except Exception as exc:  # noqa: BLE001 - mapped to ours or handed back as is
            mapped = _ERRORS.get(type(exc).__name__)
            error = mapped(*exc.args) if mapped is not None and not isinstance(exc, mapped) else exc
            if return_exceptions:
                return error
            raise error from (exc if error is not exc else None)

    def error_from(self, payload: Any) -> BaseException:
        """The exception a stored failure stands for: ours by class name, anything else as Celery rebuilds it.

        ``payload`` is Celery's failure format ``{"exc_type", "exc_message", "exc_module"}`` (docs/tasks.md).
        """
        if isinstance(payload, dict):
            cls = _ERRORS.get(str(payload.get("exc_type")))
            if cls is not None and payload.get("exc_module", errors.__name__) == errors.__name__:
                args = payload.get("exc_message")
                args = list(args) if isinstance(args, (list, tuple)) else [args]
                try:
                    return cls(*args)
                except TypeError:
                    return cls(" ".join(map(str, args)))
        try:
            exc = self.app.backend.exception_to_python(payload)
        except Exception as err:  # noqa: BLE001 - an unknown or malformed payload still tells what happened
            return RuntimeError(f"task failed: {payload!r} ({err})")
        return exc if isinstance(exc, BaseException) else RuntimeError(f"task failed: {payload!r}")

    # -- asyncio --------------------------------------------------------------------------------------------------

    async def collect_async(self, ids: Sequence[str], timeout: float = DEFAULT_TIMEOUT, *,
                            return_exceptions: bool = False) -> list[Any]:
        """asyncio variant of :meth:`collect`."""
        if self._results is None:
            return await asyncio.to_thread(self.collect, ids, timeout, return_exceptions=return_exceptions)
        metas = await self._results.collect_async(ids, timeout)
        return [self._outcome(meta, task_id, return_exceptions) for meta, task_id in zip(metas, ids, strict=True)]

    async def predict_async(self, model: str, inputs: Sequence[float], *, version: int | None = None,
                            timeout: float = DEFAULT_TIMEOUT) -> dict[str, Any]:
        """asyncio variant of :meth:`predict` (publishing is one cheap call; the wait never blocks the loop)."""
        ids = self.send_predict_bulk(model, [inputs], version=version)
        return (await self.collect_async(ids, timeout))[0]

    async def predict_bulk_async(self, model: str, rows: Iterable[Sequence[float]], *, version: int | None = None,
                                 timeout: float = DEFAULT_TIMEOUT, return_exceptions: bool = False) -> list[Any]:
        """asyncio variant of :meth:`predict_bulk`."""
        ids = self.send_predict_bulk(model, rows, version=version)
        return await self.collect_async(ids, timeout, return_exceptions=return_exceptions)

    async def predict_many_async(self, model: str, rows: Sequence[Sequence[float]], *, version: int | None = None,
                                 timeout: float = DEFAULT_TIMEOUT) -> dict[str, Any]:
        """asyncio variant of :meth:`predict_many`."""
        handle = await asyncio.to_thread(self.send_predict_many, model, rows, version=version)
        return (await self.collect_async([handle.id], timeout))[0]

    async def fit_async(self, model: str, dataset: str, *, timeout: float = 600.0, **kwargs: Any) -> dict[str, Any]:
        """asyncio variant of :meth:`fit`."""
        handle = await asyncio.to_thread(self.send_fit, model, dataset, **kwargs)
        return (await self.collect_async([handle.id], timeout))[0]


def _plain(value: Any) -> Any:
    """numpy arrays to lists, so the JSON serializer takes them."""
    if hasattr(value, "tolist"):
        return value.tolist()
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


# -- benchmark ------------------------------------------------------------------------------------------------------


def bench(settings: Settings | None = None, *, n: int = 2000, width: int = 10) -> dict[str, float]:
    """Producer CPU per predict request: plain ``apply_async`` vs this client's single and bulk paths.

    Publishes ``n`` messages each way to a throw-away queue (no worker needed; the queue is deleted after), and
    measures result collection by storing ``n`` results the way the worker does and reading them back with
    ``AsyncResult.get()`` one by one vs :meth:`Client.collect`. Figures are CPU microseconds of this process per
    request (``time.process_time``), so other load on the machine does not inflate them.
    """
    settings = settings or Settings.from_env()
    queue = f"aw-bench-{uuid.uuid4().hex[:8]}"
    settings = dataclasses.replace(settings, inference_queue=queue)
    rows = [[float(i % 7) + 0.5 * j for j in range(width)] for i in range(n)]
    plain = producer_app(settings)
    plain.conf.task_routes = {PREDICT: {"queue": queue}}

    @plain.task(name=PREDICT)
    def _predict(model: str, inputs: Any, version: int | None = None) -> None:  # a stub: only apply_async is timed
        raise NotImplementedError

    def cpu(fn: Callable[[], Any]) -> float:
        start = time.process_time()
        fn()
        return (time.process_time() - start) / n * 1e6

    client = Client(settings)
    ids_plain: list[str] = []
    ids_bulk: list[str] = []
    out: dict[str, float] = {}
    try:
        _predict.apply_async(kwargs={"model": "bench", "inputs": rows[0]})  # warm: connection, queue declared
        client.send_predict_bulk("bench", rows[:1])
        out["publish_apply_async_us"] = cpu(lambda: ids_plain.extend(
            _predict.apply_async(kwargs={"model": "bench", "inputs": row}).id for row in rows))
        out["publish_client_single_us"] = cpu(lambda: [client.send_predict("bench", row) for row in rows])
        out["publish_client_bulk_us"] = cpu(lambda: ids_bulk.extend(client.send_predict_bulk("bench", rows)))
        _store_fake_results(client, ids_plain + ids_bulk)
        out["collect_asyncresult_get_us"] = cpu(lambda: [plain.AsyncResult(i).get(timeout=30) for i in ids_plain])
        out["collect_client_bulk_us"] = cpu(lambda: client.collect(ids_bulk, timeout=30))
        out["publish_speedup"] = out["publish_apply_async_us"] / out["publish_client_bulk_us"]
        out["total_speedup"] = ((out["publish_apply_async_us"] + out["collect_asyncresult_get_us"])
                                / (out["publish_client_bulk_us"] + out["collect_client_bulk_us"]))
    finally:
        keys = [plain.backend.get_key_for_task(i) for i in ids_plain + ids_bulk]
        if keys:
            plain.backend.client.delete(*keys)
        _delete_queue(client, queue)
        client.close()
        plain.close()
    return out


def _store_fake_results(client: Client, ids: list[str]) -> None:
    """Store a SUCCESS result for every id, as the worker's batcher does (SETEX + PUBLISH, one pipeline)."""
    backend = client.app.backend
    pipe = backend.client.pipeline(transaction=False)
    for task_id in ids:
        value = backend.encode({"status": "SUCCESS", "result": {"model": "bench", "version": 0, "outputs": [0.0]},
                                "traceback": None, "children": [], "date_done": None, "task_id": task_id})
        pipe.set(backend.get_key_for_task(task_id), value, ex=600)
    pipe.execute()


def _delete_queue(client: Client, queue: str) -> None:
    if client._publisher.is_redis:
        r = redis.Redis.from_url(client.settings.broker_url)
        r.delete(queue, f"_kombu.binding.{queue}")
        r.close()
        return
    with client.app.connection_for_write() as conn:
        conn.default_channel.queue_delete(queue)
        conn.default_channel.exchange_delete(queue)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m agent_workers.client --bench [-n N] [--broker URL]``: print the producer CPU figures."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m agent_workers.client", description=main.__doc__)
    parser.add_argument("--bench", action="store_true", help="measure producer CPU per predict request")
    parser.add_argument("-n", type=int, default=2000, help="requests per path")
    parser.add_argument("--broker", help="broker URL (default: AGENT_WORKERS_BROKER_URL)")
    args = parser.parse_args(argv)
    if not args.bench:
        parser.print_help()
        return 2
    settings = Settings.from_env()
    if args.broker:
        settings = dataclasses.replace(settings, broker_url=args.broker)
    figures = bench(settings, n=args.n)
    print(f"producer CPU per predict request, n={args.n}, broker {urlparse(settings.broker_url).scheme}")
    print(f"  publish  plain apply_async      {figures['publish_apply_async_us']:9.1f} us")
    print(f"  publish  client, one by one     {figures['publish_client_single_us']:9.1f} us")
    print(f"  publish  client, bulk           {figures['publish_client_bulk_us']:9.1f} us"
          f"   ({figures['publish_speedup']:.0f}x cheaper)")
    print(f"  collect  AsyncResult.get()      {figures['collect_asyncresult_get_us']:9.1f} us")
    print(f"  collect  client, bulk           {figures['collect_client_bulk_us']:9.1f} us")
    print(f"  publish + collect               {figures['total_speedup']:9.1f} x cheaper in bulk")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
