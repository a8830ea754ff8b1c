"""Publishes prepared task messages exactly: every row ends queued, known not queued, or reported unknown.

Redis: chunks of :data:`LPUSH_CHUNK` messages, each pushed by one script together with a short-lived marker
(``push.lua``), all chunks in one pipelined round trip. A chunk is all or nothing, so when the reply is lost (a
killed connection, a frozen server cut at the deadline) the markers say which chunks went in.

RabbitMQ: ``basic_publish(mandatory=True)`` on a channel in confirm mode, then one wait until every message is
confirmed. A message RabbitMQ could not route (its queue was deleted) comes back as ``basic.return`` and counts as
not queued; the queue is declared again and those messages sent once more. A message that was sent but whose
confirm never came (the link died or stalled) is *unknown*: only collecting its id can tell.

Everything runs under the call's :class:`~agent_workers.client.deadline.Deadline`: connect, declare, publish,
confirm and the markers' read-back; a socket still blocked at the deadline is cut.
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading
import time
import weakref
from collections.abc import Sequence
from typing import Any
from urllib.parse import urlparse

import amqp
import redis
from celery import Celery
from redis.backoff import NoBackoff
from redis.retry import Retry

from agent_workers.client.deadline import Deadline
from agent_workers.config import Settings
from agent_workers.contract import declare_queue, queues
from agent_workers.errors import PublishError
from agent_workers.keys import Keys
from agent_workers.lua import source
from agent_workers.redis_clients import redis_client
from agent_workers.wire import DEFAULT_EXCHANGE, Envelope

#: Messages per push script of a bulk (one pipeline carries them all).
LPUSH_CHUNK = 1000
#: An AMQP connection idle this long (seconds) is checked with one round trip before a publish.
IDLE_CHECK = 10.0
#: Seconds a sent marker outlives the call's deadline (it is only read back within the call).
SENT_MARKER_EXTRA = 60
#: Seconds between two tries to read the markers back from a Redis that went away.
MARKER_RETRY_INTERVAL = 0.1
#: Times a message returned unroutable (its queue deleted) is declared and sent again before it is reported.
RETURN_RETRIES = 1
REDIS_SCHEMES = frozenset({"redis", "rediss", "unix", "sentinel"})

_SETTLED = {True: "queued", False: "not_sent"}

#: One prepared message: task id, body (JSON or msgpack, as its envelope says), kwargs repr.
Item = tuple[str, bytes, str]

__all__ = ["LPUSH_CHUNK", "Item", "PublishError", "Publisher"]


class Publisher:
    """Publishes prepared messages on one broker (Redis or AMQP), thread-safe and fork-safe.

    Redis: one client per thread (and per process), WITHOUT redis-py's automatic retries: a retried pipelined push
    whose reply was lost would queue the same task ids twice (kombu refuses pipelined publishing with retries for
    the same reason); the deadline cuts only the calling thread's socket. AMQP: one connection and channel, used
    under a lock.
    """

    def __init__(self, app: Celery, settings: Settings) -> None:
        self.app = app
        self.settings = settings
        self.is_redis = urlparse(settings.broker_url).scheme in REDIS_SCHEMES
        self._keys = Keys(settings.namespace)
        self._queues = queues(settings)
        self._local = threading.local()
        self._clients: weakref.WeakSet[Any] = weakref.WeakSet()
        self._lock = threading.Lock()
        self._conn: Any = None
        self._channel: Any = None
        self._pid = os.getpid()
        self._declared: set[str] = set()
        self._published = 0
        self._settled: dict[int, bool] = {}  # delivery tag -> acked (True) or nacked (False), this bulk
        self._upto = 0  # every delivery tag up to this one is settled
        self._returned: set[str] = set()
        self._last_used = 0.0

    def publish(self, envelope: Envelope, items: Sequence[Item], expires: str | None, deadline: Deadline) -> None:
        """Publish ``items`` on ``envelope.queue`` before ``deadline``.

        Raises:
            PublishError: not every row was queued (or known queued) in time; it says which rows were.
        """
        if not items:
            return
        if self.is_redis:
            self._publish_redis(envelope, items, expires, deadline)
            return
        with self._lock:
            self._publish_amqp(envelope, items, expires, deadline)

    # -- Redis ------------------------------------------------------------------------------------------------------

    def _redis_client(self) -> Any:
        client = getattr(self._local, "redis", None)
        if client is None or self._local.pid != os.getpid():
            client = redis_client(
                self.settings.broker_url, sentinel_master=self.settings.sentinel_master, retry=Retry(NoBackoff(), 0)
            )
            self._local.redis, self._local.pid = client, os.getpid()
            self._local.push = client.register_script(source("push"))
            self._clients.add(client)
        return client

    def _publish_redis(self, envelope: Envelope, items: Sequence[Item], expires: str | None, dl: Deadline) -> None:
        client = self._redis_client()
        ttl = int(dl.timeout) + SENT_MARKER_EXTRA
        starts = range(0, len(items), LPUSH_CHUNK)
        markers = [self._keys.sent(items[start][0]) for start in starts]
        calls = []
        for start, marker in zip(starts, markers, strict=True):
            # LPUSH of several values keeps their order for the consumer's pop (first in, first out).
            part = items[start : start + LPUSH_CHUNK]
            chunk = [envelope.redis(i, body, "()", kwrepr, expires) for i, body, kwrepr in part]
            calls.append({"keys": [envelope.queue, marker], "args": [ttl, *chunk]})
        try:
            with dl.guard(client.connection_pool.disconnect):
                replies = self._push(client, calls)
        except Exception as exc:  # noqa: BLE001 - the reply was lost (or cut): ask the markers
            if _never_connected(exc):
                self._redis_failed(envelope, items, [False] * len(markers), exc)
            self._redis_failed(envelope, items, self._markers(client, markers, dl), exc)
        failed = [r for r in replies if isinstance(r, Exception)]
        if failed:
            self._redis_failed(envelope, items, [not isinstance(r, Exception) for r in replies], failed[0])

    def _push(self, client: Any, calls: list[dict[str, Any]]) -> list[Any]:
        """Run the push script for every chunk: one EVALSHA, or one pipeline of them; a reply per chunk (an error
        reply in place, a lost connection raised)."""
        if len(calls) == 1:  # no pipeline: it would ask SCRIPT EXISTS first, one more round trip per predict
            try:
                return [self._local.push(**calls[0], client=client)]
            except redis.ResponseError as exc:  # the server answered: the script did not run or wrote nothing
                return [exc]
        pipe = client.pipeline(transaction=False)
        for call in calls:
            self._local.push(**call, client=pipe)
        return list(pipe.execute(raise_on_error=False))

    def _markers(self, client: Any, markers: list[str], dl: Deadline) -> list[bool | None]:
        """Which chunks went in, by their markers, retried until the deadline; None for a chunk not learned."""
        while not dl.passed:
            try:
                with dl.guard(client.connection_pool.disconnect):
                    found = client.mget(markers)
                return [value is not None for value in found]
            except (redis.RedisError, OSError):
                time.sleep(min(MARKER_RETRY_INTERVAL, dl.left()))  # noqa: sleep-ok - between tries of a bounded retry
        return [None] * len(markers)

    def _redis_failed(
        self, envelope: Envelope, items: Sequence[Item], chunks: Sequence[bool | None], cause: BaseException
    ) -> None:
        states: dict[bool | None, list[int]] = {True: [], False: [], None: []}
        for n, state in enumerate(chunks):
            states[state].extend(range(n * LPUSH_CHUNK, min((n + 1) * LPUSH_CHUNK, len(items))))
        raise _error(envelope.queue, items, states[True], states[False], states[None], cause) from cause

    # -- AMQP -------------------------------------------------------------------------------------------------------

    def _publish_amqp(self, envelope: Envelope, items: Sequence[Item], expires: str | None, dl: Deadline) -> None:
        state = ["not_sent"] * len(items)  # row -> queued / not_sent / unknown, as far as known
        todo = list(range(len(items)))
        cause: BaseException | None = None
        for _attempt in range(RETURN_RETRIES + 1):
            self._settled.clear()  # earlier bulks were settled in full, or their connection was dropped
            self._returned.clear()
            tags: dict[int, int] = {}  # row -> delivery tag, this attempt
            try:
                with dl.guard(self._cut):
                    channel = self._channel_for(envelope.queue, dl)
                    for row in todo:
                        task_id, body, kwrepr = items[row]
                        m = envelope.message(task_id, body, "()", kwrepr, expires)
                        message = amqp.Message(
                            m.body,
                            content_type=envelope.content[0],
                            content_encoding=envelope.content[1],
                            application_headers=m.headers,
                            **m.properties,
                        )
                        channel.basic_publish(
                            message, exchange=DEFAULT_EXCHANGE, routing_key=envelope.queue, mandatory=True
                        )
                        self._published += 1
                        tags[row] = self._published
                    self._wait_confirms(self._published, dl)
            except Exception as exc:  # noqa: BLE001 - a dead, stalled or refusing link: report exactly
                self._reset()
                cause = exc
            for row, tag in tags.items():
                if items[row][0] in self._returned:
                    continue  # unroutable: not queued
                state[row] = _SETTLED.get(self._settled.get(tag), "unknown")
            if cause is not None:
                break
            todo = [row for row in todo if items[row][0] in self._returned]
            if not todo:
                break
            # Unroutable: the queue is gone (deleted by an operator). Declare it again and send those once more;
            # they are known not queued, so this cannot duplicate them.
            self._declared.discard(envelope.queue)
        if all(s == "queued" for s in state):
            return
        rows = {s: [row for row, v in enumerate(state) if v == s] for s in ("queued", "not_sent", "unknown")}
        if cause is None:
            cause = PublishError(
                f"RabbitMQ refused or could not route {len(rows['not_sent'])} messages (queue {envelope.queue!r})"
            )
        elif dl.cut or isinstance(cause, TimeoutError):
            cause = TimeoutError(f"no answer from RabbitMQ within {dl.timeout:g}s ({type(cause).__name__}: {cause})")
        raise _error(envelope.queue, items, rows["queued"], rows["not_sent"], rows["unknown"], cause) from cause

    def _wait_confirms(self, last: int, dl: Deadline) -> None:
        connection = self._conn.connection
        while self._upto < last:
            left = dl.left()
            if left <= 0:
                raise TimeoutError(f"RabbitMQ did not confirm every message within {dl.timeout:g}s")
            connection.drain_events(timeout=left)

    def _channel_for(self, queue: str, dl: Deadline) -> Any:
        """A live channel in confirm mode on which ``queue`` is declared; one new connection if the kept one died."""
        if self._pid != os.getpid():  # a forked child must not share its parent's socket
            self._conn, self._channel, self._pid = None, None, os.getpid()
        kept = self._conn is not None
        try:
            return self._amqp_channel(queue, dl)
        except Exception:  # noqa: BLE001 - a stale connection found before anything was sent: one fresh try is safe
            if not kept:
                raise
            self._reset()
            return self._amqp_channel(queue, dl)

    def _amqp_channel(self, queue: str, dl: Deadline) -> Any:
        if self._conn is None:
            # heartbeat 0: a producer that idles must not be dropped; the deadline bounds connect and handshake
            conn = self.app.connection_for_write(heartbeat=0, connect_timeout=max(dl.left(), 0.01))
            self._conn = conn
            conn.ensure_connection(max_retries=0, reraise_as_library_errors=False)  # one try: the deadline decides
            channel = self._channel = conn.channel()
            channel.events["basic_ack"].add(self._on_ack)
            channel.events["basic_nack"].add(self._on_nack)
            channel.events["basic_return"].add(self._on_return)
            channel.confirm_select()
            self._declared.clear()
            self._settled.clear()
            self._published = self._upto = 0
        if queue not in self._declared:
            # Declared exactly as workers and every other producer of ours declare it (contract.queues).
            declared = self._queues.get(queue) or declare_queue(queue, self.settings.queue_type)
            declared(self._channel).declare()
            self._declared.add(queue)
        elif time.monotonic() - self._last_used > IDLE_CHECK:
            self._channel.queue_declare(queue, passive=True)  # one round trip: raises if the link died while idle
        with contextlib.suppress(TimeoutError):
            self._conn.connection.drain_events(timeout=0)  # a connection.blocked or channel.close waiting for us
        self._last_used = time.monotonic()
        return self._channel

    def _on_ack(self, delivery_tag: int, multiple: bool) -> None:
        self._settle(delivery_tag, multiple, True)

    def _on_nack(self, delivery_tag: int, multiple: bool) -> None:
        self._settle(delivery_tag, multiple, False)

    def _settle(self, delivery_tag: int, multiple: bool, ok: bool) -> None:
        for tag in range(self._upto + 1, delivery_tag + 1) if multiple else (delivery_tag,):
            self._settled.setdefault(tag, ok)
        while self._upto + 1 in self._settled:
            self._upto += 1

    def _on_return(self, exc: Exception, exchange: str, routing_key: str, message: Any) -> None:
        self._returned.add(str(message.properties.get("correlation_id")))

    def _cut(self) -> None:
        """Shut the AMQP socket down, so a read or write blocked on a stalled link fails now (the deadline)."""
        conn = self._conn
        sock = getattr(getattr(getattr(conn, "connection", None), "transport", None), "sock", None)
        if sock is not None:
            sock.shutdown(socket.SHUT_RDWR)

    def _reset(self) -> None:
        """Forget the connection without a close handshake (a stalled link never answers one)."""
        conn, self._conn, self._channel = self._conn, None, None
        self._declared.clear()
        if conn is not None:
            with contextlib.suppress(Exception):  # already broken
                conn.collect()

    def close(self) -> None:
        with self._lock:
            conn = self._conn if self._pid == os.getpid() else None  # never close a parent's link from a child
            self._conn = conn
            if conn is not None:
                with contextlib.suppress(Exception):
                    self._cut_after(conn, 2.0)
                    conn.close()
            self._reset()
        for client in list(self._clients):
            client.close()

    @staticmethod
    def _cut_after(conn: Any, seconds: float) -> None:
        """Give a graceful close at most ``seconds``: a stalled link would never send close-ok."""
        sock = conn.connection.transport.sock
        sock.settimeout(seconds)


def _never_connected(exc: BaseException) -> bool:
    """True when redis-py failed to connect at all, so nothing of the pipeline was sent (its connect errors read
    "Error N connecting to host:port" and "Timeout connecting to server")."""
    return isinstance(exc, redis.ConnectionError) and "connecting to" in str(exc)


def _error(
    queue: str,
    items: Sequence[Item],
    queued: list[int],
    not_sent: list[int],
    unknown: list[int],
    cause: BaseException,
) -> PublishError:
    what = f"{len(queued)} queued, {len(not_sent)} not sent"
    if unknown:
        what += f", {len(unknown)} unknown (sent, unconfirmed: collect their ids)"
    return PublishError(
        f"publishing {len(items)} messages to {queue!r} failed ({what}): {type(cause).__name__}: {cause}",
        [task_id for task_id, _, _ in items],
        queued,
        not_sent,
        unknown,
    )
