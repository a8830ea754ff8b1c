"""The only module that knows kombu's Redis internals: a transport that pops many messages per round trip, bulk
acknowledgement, and queue depth.

kombu's Redis transport issues one ``BRPOP`` per message and then one pipeline per message to record it as
unacknowledged (the visibility-timeout bookkeeping), so a worker pays two round trips and a loop iteration for every
message before any work happens, and a SIGKILL between the pop and the record loses the message. Here:

* a worker consuming ONE queue (the recommended topology) waits with ``BLMOVE q q RIGHT RIGHT``, which wakes it
  without removing anything, then a Lua script pops up to the free prefetch window and records every popped message
  as unacknowledged in the same atomic step: a popped message is never only in flight to this process, so a SIGKILL
  at any moment loses nothing (the visibility-timeout sweep restores what it had recorded);
* a worker consuming several queues blocks for one message with ``BLMPOP ... COUNT 1`` (Redis >= 7.0), exactly as
  kombu's ``BRPOP`` does, and keeps kombu's own one-message window; the rest of the window is popped and recorded
  atomically by the same script, in the same round trip as that message's record.

Messages on the wire are unchanged: producers keep using the stock transport. Enabled for Redis brokers by
``create_app`` (``broker_transport``); falls back to the stock behaviour for a Redis older than 7.0 or with a global
key prefix.
"""

from __future__ import annotations

import logging
from time import time
from typing import Any

from kombu.transport import redis as kredis
from kombu.transport import virtual
from kombu.utils.encoding import bytes_to_str
from kombu.utils.json import dumps, loads

from agent_workers import lua

DEFAULT_POP_COUNT = 128
logger = logging.getLogger(__name__)


class QoS(kredis.QoS):
    """Redis QoS that skips the per-message bookkeeping for messages already recorded in bulk."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._recorded: set[str] = set()

    def append(self, message: Any, delivery_tag: str) -> None:
        if delivery_tag in self._recorded:
            self._recorded.discard(delivery_tag)
            virtual.QoS.append(self, message, delivery_tag)
        else:
            super().append(message, delivery_tag)


class Channel(kredis.Channel):
    """Redis channel whose blocking pop takes up to the free prefetch window at once."""

    QoS = QoS
    _bulk_pop: bool | None = None

    def _can_bulk_pop(self) -> bool:
        if self._bulk_pop is None:
            try:
                major = int(str(self.client.info("server").get("redis_version", "0")).split(".")[0])
            except Exception:  # noqa: BLE001 - unknown server: keep kombu's behaviour
                major = 0
            self._bulk_pop = major >= 7 and not self.global_keyprefix and self.ack_emulation
        return self._bulk_pop

    def _pop_count(self) -> int:
        estimate = self.qos.can_consume_max_estimate()
        limit = int(self.connection.client.transport_options.get("pop_count", DEFAULT_POP_COUNT))
        return max(1, min(limit, estimate if estimate is not None else limit))

    def _brpop_start(self, timeout: float | None = None) -> None:
        if not self._can_bulk_pop():
            return super()._brpop_start(timeout)
        if timeout is None:
            timeout = self.brpop_timeout
        queues = self._queue_cycle.consume(len(self.active_queues))
        if not queues:
            return None
        self._bulk_keys = [self._q_for_pri(queue, pri) for pri in self.priority_steps for queue in queues]
        self._in_poll = self.client.connection
        self._brpop_sent_at = kredis.monotonic()
        self._peek = len(queues) == 1
        if self._peek:
            # One queue (the recommended topology: a worker per queue): wait WITHOUT popping. BLMOVE from a list to
            # its own tail leaves it unchanged, and only wakes us; _POP_AND_RECORD then pops and records atomically,
            # so no message is ever only in flight to this process. Priority sub-lists are swept by that script too.
            base = self._bulk_keys[0]
            self.client.connection.send_command("BLMOVE", base, base, "RIGHT", "RIGHT", timeout or 0)
            return None
        # Several queues: block for ONE message, exactly as kombu's BRPOP does (keys in priority order), the one
        # message kombu itself can lose to a SIGKILL; the rest of the window is popped and recorded atomically.
        self.client.connection.send_command(
            "BLMPOP", timeout or 0, len(self._bulk_keys), *self._bulk_keys, "RIGHT", "COUNT", 1
        )
        return None

    def _brpop_read(self, **options: Any) -> bool:
        if not self._can_bulk_pop():
            return bool(super()._brpop_read(**options))
        try:
            command = "BLMOVE" if self._peek else "BLMPOP"
            try:
                reply = self.client.parse_response(self.client.connection, command, **options)
            except self.connection_errors:
                self.client.connection.disconnect()
                raise
            if self._peek:
                # Woken (or timed out: sweep the priority sub-lists anyway); nothing was popped yet.
                popped = self._record_and_pop_more([], self._pop_count())
            else:
                if not reply:
                    raise kredis.Empty()
                dest, items = reply
                popped = [(bytes_to_str(dest), bytes_to_str(item)) for item in items]
                popped += self._record_and_pop_more(popped, self._pop_count() - len(popped))
            if not popped:
                raise kredis.Empty()
            for key, text in popped:
                queue = key.rsplit(self.sep, 1)[0]
                try:
                    payload = loads(text)
                    payload["properties"]["delivery_tag"]
                except Exception:  # noqa: BLE001 - one unparseable envelope must not cost the others
                    logger.error("dropping an unparseable message from %s: %.200r", queue, text)
                    continue
                self.qos._recorded.add(payload["properties"]["delivery_tag"])
                self._queue_cycle.rotate(queue)
                self.connection._deliver(payload, queue)
            return True
        finally:
            self._in_poll = None
            self._flush_brpop_reauth()

    def _record_and_pop_more(self, popped: list[tuple[str, str]], more: int) -> list[tuple[str, str]]:
        """Record the blocking pop's message as unacknowledged and, in the same round trip, pop up to ``more``
        further messages AND record them, atomically (a Lua script), so no popped message ever exists only in
        this process: a SIGKILL at any point leaves each message either in its queue or in the unacked hash, from
        which the visibility-timeout sweep restores it.
        """
        now = time()
        script = self._pop_script()
        with self.qos.pipe_or_acquire() as pipe:
            for _key, text in popped:
                try:
                    payload = loads(text)
                    props = payload["properties"]
                    tag = props["delivery_tag"]
                except Exception:  # noqa: BLE001 - dropped (and logged) by the caller
                    continue
                info = props.get("delivery_info") or {}
                pipe.zadd(self.unacked_index_key, {tag: now})
                pipe.hset(
                    self.unacked_key, tag, f"[{text}, {dumps(info.get('exchange'))}, {dumps(info.get('routing_key'))}]"
                )
            if more > 0:
                script(keys=[self.unacked_index_key, self.unacked_key, *self._bulk_keys], args=[more, now], client=pipe)
            results = pipe.execute()
        if more <= 0 or not results or not results[-1]:
            return []
        key, items = results[-1]
        return [(bytes_to_str(key), bytes_to_str(item)) for item in items]

    def _pop_script(self) -> Any:
        script = getattr(self, "_pop_and_record", None)
        if script is None:
            script = self._pop_and_record = self.client.register_script(lua.source("pop_and_record"))
        return script


class Transport(kredis.Transport):
    """The stock Redis transport with :class:`Channel` above."""

    Channel = Channel


# -- acknowledgement and depth, for any transport (Redis in bulk) ---------------------------------------------------


def ack_all(messages: list[Any]) -> None:
    """Acknowledge many messages; on Redis in one pipelined round trip instead of one per message."""
    by_qos: dict[int, list[Any]] = {}
    for m in messages:
        qos = getattr(m.channel, "qos", None)
        if isinstance(qos, virtual.QoS) and hasattr(qos, "_remove_from_indices"):
            by_qos.setdefault(id(qos), []).append(m)
        elif not m.acknowledged:
            try:
                m.ack()
            except Exception:  # noqa: BLE001 - channel gone: the broker redelivers it
                logger.warning("ack of %s failed; the broker will redeliver it", m.delivery_tag, exc_info=True)
    for group in by_qos.values():
        qos = group[0].channel.qos
        try:
            with qos.pipe_or_acquire() as pipe:
                for m in group:
                    qos._remove_from_indices(m.delivery_tag, pipe)  # kombu/transport/redis.py QoS.ack, batched
                pipe.execute()
        except Exception:  # noqa: BLE001
            logger.warning("bulk ack failed; the broker will redeliver %d messages", len(group), exc_info=True)
            continue
        for m in group:
            virtual.QoS.ack(qos, m.delivery_tag)
            m._state = "ACK"


def keeps_unacked_index(message: Any) -> bool:
    """Whether ``message`` came through a Redis channel, whose unacked index kombu's visibility sweep reads."""
    qos = getattr(getattr(message, "channel", None), "qos", None)
    return isinstance(qos, kredis.QoS)


def touch_unacked(messages: list[Any]) -> None:
    """Mark unacknowledged Redis messages as delivered now (``ZADD XX`` in the unacked index), so kombu's visibility
    sweep (``QoS.restore_visible``: entries older than the timeout) does not restore them while this worker holds
    them; other messages are ignored."""
    by_qos: dict[int, tuple[Any, list[str]]] = {}
    for m in messages:
        if keeps_unacked_index(m) and not m.acknowledged:
            by_qos.setdefault(id(m.channel.qos), (m.channel.qos, []))[1].append(m.delivery_tag)
    now = time()
    for qos, tags in by_qos.values():
        try:
            with qos.pipe_or_acquire() as pipe:
                pipe.zadd(qos.unacked_index_key, dict.fromkeys(tags, now), xx=True)
                pipe.execute()
        except Exception:  # noqa: BLE001 - tried again next time; at worst kombu restores them, as before
            logger.warning("refreshing %d held messages failed", len(tags), exc_info=True)


def queue_depth(channel: Any, queue: str) -> int:
    """Messages waiting in ``queue``: the sum over its priority lists on Redis, a passive declare on AMQP."""
    if hasattr(channel, "_q_for_pri"):
        keys = {channel._q_for_pri(queue, pri) for pri in channel.priority_steps}
        pipe = channel.client.pipeline(transaction=False)
        for key in keys:
            pipe.llen(key)
        return int(sum(pipe.execute()))
    return int(channel.queue_declare(queue, passive=True).message_count)


#: kombu's hash of delivered, not yet acknowledged messages (every queue of the database).
UNACKED_KEY: str = kredis.Channel.unacked_key


def binding_key(queue: str) -> str:
    """kombu's binding key of ``queue`` on a Redis broker (``_kombu.binding.<queue>``)."""
    return kredis.Channel.keyprefix_queue % queue
