"""Publishes prepared task messages in bulk: one LPUSH pipeline on Redis, confirmed publishes on RabbitMQ."""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from typing import Any
from urllib.parse import urlparse

import amqp
from celery import Celery
from redis.backoff import NoBackoff
from redis.retry import Retry

from agent_workers.config import Settings
from agent_workers.contract import declare_queue
from agent_workers.errors import StoreUnavailableError
from agent_workers.redis_clients import redis_client
from agent_workers.wire import DEFAULT_EXCHANGE, Envelope

#: Messages per LPUSH command of a bulk (one pipeline carries them all).
LPUSH_CHUNK = 1000
#: Seconds to wait for RabbitMQ to confirm a bulk.
CONFIRM_TIMEOUT = 30.0
#: An AMQP connection idle this long (seconds) is checked with one round trip before a publish.
IDLE_CHECK = 10.0
REDIS_SCHEMES = frozenset({"redis", "rediss", "unix", "sentinel"})

#: One prepared message: task id, JSON body, kwargs repr.
Item = tuple[str, bytes, str]


class PublishError(StoreUnavailableError):
    """The broker did not take (or did not confirm) a bulk of messages; none of them may be assumed queued."""


class Publisher:
    """Publishes prepared messages on one broker connection (Redis or AMQP), thread-safe.

    Redis: one LPUSH of many messages (a pipeline of them past :data:`LPUSH_CHUNK`), on a client WITHOUT
    redis-py's automatic retries: a retried pipelined push whose reply was lost would queue the same task ids twice
    (kombu refuses pipelined publishing with retries for the same reason). AMQP: ``basic_publish`` of prebuilt
    messages on a channel in confirm mode, then one wait until RabbitMQ has confirmed the whole bulk, so a
    quorum-queue leader change or a full disk never drops a publish silently.
    """

    def __init__(self, app: Celery, settings: Settings) -> None:
        self.app = app
        self.settings = settings
        self.is_redis = urlparse(settings.broker_url).scheme in REDIS_SCHEMES
        self._redis = (
            redis_client(settings.broker_url, sentinel_master=settings.sentinel_master, retry=Retry(NoBackoff(), 0))
            if self.is_redis
            else None
        )
        self._lock = threading.Lock()
        self._conn: Any = None
        self._channel: Any = None
        self._declared: set[str] = set()
        self._published = 0
        self._confirmed = 0
        self._nacked = 0
        self._last_used = 0.0

    def publish(self, envelope: Envelope, items: Sequence[Item], expires: str | None = None) -> None:
        """Publish ``items`` in one round trip (Redis) or one confirmed burst (AMQP).

        Raises:
            PublishError: the broker refused or did not confirm the bulk.
        """
        if self._redis is not None:
            self._publish_redis(envelope, items, expires)
            return
        with self._lock:
            try:
                self._amqp_channel(envelope.queue)
            except (*self._amqp_errors(), TimeoutError):
                self._reset()  # a stale connection found before anything was sent: one fresh try is safe
            try:
                self._publish_amqp(envelope, items, expires)
            except PublishError:
                self._reset()
                raise
            except (*self._amqp_errors(), TimeoutError) as exc:
                self._reset()
                raise PublishError(f"publishing {len(items)} messages to {envelope.queue!r} failed: {exc}") from exc

    def _publish_redis(self, envelope: Envelope, items: Sequence[Item], expires: str | None) -> None:
        assert self._redis is not None
        messages = [envelope.redis(i, body, "()", kwrepr, expires) for i, body, kwrepr in items]
        if len(messages) <= LPUSH_CHUNK:
            self._redis.lpush(envelope.queue, *messages)
            return
        pipe = self._redis.pipeline(transaction=False)
        for start in range(0, len(messages), LPUSH_CHUNK):
            # LPUSH of several values keeps their order for the consumer's pop (first in, first out).
            pipe.lpush(envelope.queue, *messages[start : start + LPUSH_CHUNK])
        pipe.execute()

    def _publish_amqp(self, envelope: Envelope, items: Sequence[Item], expires: str | None) -> None:
        channel = self._amqp_channel(envelope.queue)
        for task_id, body, kwrepr in items:
            m = envelope.message(task_id, body, "()", kwrepr, expires)
            message = amqp.Message(
                m.body,
                content_type="application/json",
                content_encoding="utf-8",
                application_headers=m.headers,
                **m.properties,
            )
            channel.basic_publish(message, exchange=DEFAULT_EXCHANGE, routing_key=envelope.queue)
            self._published += 1
        deadline = time.monotonic() + CONFIRM_TIMEOUT
        connection = self._conn.connection
        while self._confirmed < self._published:
            left = deadline - time.monotonic()
            if left <= 0:
                raise PublishError(
                    f"RabbitMQ confirmed {self._confirmed} of {self._published} messages within {CONFIRM_TIMEOUT:g}s"
                )
            connection.drain_events(timeout=left)
        if self._nacked:
            raise PublishError(
                f"RabbitMQ refused {self._nacked} messages (basic.nack); none of this bulk is known to be queued"
            )

    def _amqp_channel(self, queue: str) -> Any:
        """A live channel in confirm mode on which ``queue`` is declared."""
        if self._conn is None:
            self._conn = self.app.connection_for_write(heartbeat=0)  # a producer that idles must not be dropped
            self._conn.ensure_connection(max_retries=3)
            channel = self._channel = self._conn.channel()
            channel.events["basic_ack"].add(self._on_ack)
            channel.events["basic_nack"].add(self._on_nack)
            channel.confirm_select()
            self._declared.clear()
            self._published = self._confirmed = self._nacked = 0
        if queue not in self._declared:
            # The default exchange drops messages for a queue nobody declared, so declare it exactly as workers do.
            declare_queue(queue, self.settings.queue_type)(self._channel).declare()
            self._declared.add(queue)
        elif time.monotonic() - self._last_used > IDLE_CHECK:
            self._channel.queue_declare(queue, passive=True)  # one round trip: raises if the link died while idle
        try:
            self._conn.connection.drain_events(timeout=0)  # a connection.blocked or channel.close waiting for us
        except TimeoutError:
            pass
        self._last_used = time.monotonic()
        return self._channel

    def _on_ack(self, delivery_tag: int, multiple: bool) -> None:
        self._confirmed = delivery_tag if multiple else max(self._confirmed, delivery_tag)

    def _on_nack(self, delivery_tag: int, multiple: bool) -> None:
        self._nacked += 1
        self._on_ack(delivery_tag, multiple)

    def _amqp_errors(self) -> tuple[type[BaseException], ...]:
        conn = self._conn or self.app.connection_for_write()
        return (*conn.connection_errors, *conn.channel_errors, OSError)

    def _reset(self) -> None:
        conn, self._conn, self._channel = self._conn, None, None
        self._declared.clear()
        if conn is not None:
            try:
                conn.close()
            except Exception:  # noqa: BLE001 - already broken
                pass

    def close(self) -> None:
        with self._lock:
            self._reset()
        if self._redis is not None:
            self._redis.close()
