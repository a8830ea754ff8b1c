"""The only module that knows kombu's Redis internals: a transport that pops many messages per round trip, bulk
acknowledgement, and queue depth.

kombu's Redis transport issues one ``BRPOP`` per message and then one pipeline per message to record it as
unacknowledged (the visibility-timeout bookkeeping), so a worker pays two round trips and a loop iteration for every
message before any work happens, and a SIGKILL between the pop and the record loses the message. Here:

* a worker waits with ``BLMOVE q q RIGHT RIGHT``, which wakes it without removing anything, then a Lua script pops
  up to the free prefetch window and records every popped message as unacknowledged in the same atomic step: a
  popped message is never only in flight to this process, so a SIGKILL at any moment loses nothing (the
  visibility-timeout sweep restores what it had recorded). BLMOVE watches one list; a worker with several lists
  (several queues, priority sub-lists) watches the queue that last delivered and waits 2 ms after traffic, doubling
  with each quiet wake-up up to ``wake_interval`` (0.25 s) (:mod:`~agent_workers.worker.redis_wait`); every wake-up
  sweeps all its lists;
* the script records only envelopes with a usable delivery tag that kombu could restore (headers, delivery_info,
  priority); any other is moved to ``<queue>.dead`` and logged, never delivered and never lost. A restore checks
  the same again (:meth:`Channel._do_restore_message`), and one tag that still cannot be restored is moved to the
  dead-letter list alone (:meth:`QoS.restore_by_tag`): it never stops a sweep, or a worker's start-up;
* ``redelivered`` is the transport's word: a message is redelivered when our restore put it back (the pop script
  finds its tag in ``RESTORED_KEY``), whatever flag a producer wrote into the envelope;
* when a pop comes back with fewer messages than it asked for, or leaves the lists empty, the broker has nothing
  more to hand over: once the burst is delivered, the intakes are told (:func:`agent_workers.worker.idle.drained`)
  and flush at once instead of waiting out ``max_wait_ms``.

Messages on the wire are unchanged: producers keep using the stock transport. Enabled for ``redis://``,
``rediss://`` and ``sentinel://`` brokers by ``create_app`` (``broker_transport``); falls back to the stock behaviour
for a Redis older than 7.0 or with a global key prefix.
"""

from __future__ import annotations

import logging
from time import time
from typing import Any

from kombu.transport import redis as kredis
from kombu.transport import virtual
from kombu.utils.encoding import bytes_to_str
from kombu.utils.json import dumps, loads

from agent_workers import lua, numbers
from agent_workers.wire import Base64Codec
from agent_workers.worker import idle, kombu_amqp
from agent_workers.worker.redis_wait import DEFAULT_WAKE_INTERVAL, WakePolicy
from agent_workers.worker.refused import tell_refused, unrestorable

DEFAULT_POP_COUNT = 128
#: A queue's dead-letter list, for envelopes the transport cannot record: ``<queue>.dead``.
DEAD_LETTER_SUFFIX = ".dead"
#: Where an unrestorable message goes when it names no queue: ``<UNROUTABLE><DEAD_LETTER_SUFFIX>``.
UNROUTABLE = "agent_workers.unroutable"
#: Delivery tags our restores put back (sorted set, scored by time): the pop script marks them redelivered.
RESTORED_KEY = "agent_workers.restored"
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

    def restore_by_tag(self, tag: Any, client: Any = None, leftmost: bool = False) -> None:
        """kombu's restore of one unacknowledged message, alone: one that cannot be restored (kombu's own restore
        raised) is moved to its queue's dead-letter list and forgotten, instead of stopping the sweep (kombu's
        visibility sweep and fast reclaim restore tag by tag through here) or the worker's start-up."""
        try:
            super().restore_by_tag(tag, client=client, leftmost=leftmost)
        except self.channel.connection_errors:
            raise
        except Exception:  # noqa: BLE001 - this message alone
            logger.exception("cannot restore message %s; moving it to the dead-letter list", bytes_to_str(tag))
            self._dead_letter_tag(tag, client)

    def _dead_letter_tag(self, tag: Any, client: Any = None) -> None:
        with self.channel.conn_or_acquire(client) as client:
            raw = client.hget(self.unacked_key, tag)
            queue = UNROUTABLE
            try:
                routing_key = loads(bytes_to_str(raw))[2]
                if isinstance(routing_key, str) and routing_key:
                    queue = routing_key
            except Exception:  # noqa: BLE001 - an entry we cannot read names no queue
                pass
            pipe = client.pipeline()
            if raw is not None:
                pipe.rpush(queue + DEAD_LETTER_SUFFIX, raw)
            self._remove_from_indices(tag, pipe)
            pipe.execute()

    def _remove_from_indices(self, delivery_tag: str, pipe: Any = None) -> Any:
        # Fast reclaim (agent_workers/worker/reclaim.py): an ack, reject or restore also drops the holder's record.
        with self.pipe_or_acquire(pipe) as pipe:
            super()._remove_from_indices(delivery_tag, pipe)
            if self.channel.reclaim_key:
                pipe.srem(self.channel.reclaim_key, delivery_tag)
            return pipe

    def remove_many_from_indices(self, delivery_tags: list[str], pipe: Any) -> Any:
        """:meth:`_remove_from_indices` of many tags in three variadic commands on ``pipe``, not three per tag."""
        pipe.zrem(self.unacked_index_key, *delivery_tags).hdel(self.unacked_key, *delivery_tags)
        if self.channel.reclaim_key:
            pipe.srem(self.channel.reclaim_key, *delivery_tags)
        return pipe


class Channel(kredis.Channel):
    """Redis channel whose blocking pop takes up to the free prefetch window at once."""

    QoS = QoS
    codecs = {"base64": Base64Codec()}  # every envelope's body: pybase64, ~10x kombu's binascii (agent_workers/wire.py)
    _bulk_pop: bool | None = None
    #: Fast reclaim: this consumer's held set, set while its heartbeat runs (agent_workers/worker/reclaim.py).
    reclaim_key: str | None = None

    def _do_restore_message(
        self, payload: Any, exchange: Any, routing_key: Any, pipe: Any, leftmost: bool = False
    ) -> None:
        """kombu's restore of one message, for messages it can restore; any other goes to the dead-letter list
        (kombu would raise, or log and drop it). A restored message's tag is marked in ``RESTORED_KEY``: the pop
        script flags it redelivered when it comes back."""
        problem = unrestorable(payload, exchange, routing_key)
        if problem is None and exchange:
            try:
                if not self._lookup(exchange, routing_key):  # kombu would drop it: back by its routing key
                    exchange = ""
            except self.connection_errors:
                raise
            except Exception as exc:  # noqa: BLE001
                problem = f"cannot route it: {exc}"
        if problem is not None:
            dead = (routing_key if isinstance(routing_key, str) and routing_key else UNROUTABLE) + DEAD_LETTER_SUFFIX
            logger.error("cannot restore a message (%s); moved to %s", problem, dead)
            pipe.rpush(dead, dumps(payload))
            return
        super()._do_restore_message(payload, exchange, routing_key, pipe, leftmost)
        pipe.zadd(RESTORED_KEY, {payload["properties"]["delivery_tag"]: time()})

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
        # Wait WITHOUT popping: BLMOVE from a list to its own tail leaves it unchanged and only wakes us; the script
        # then pops and records atomically, so no message is ever only in flight to this process. BLMOVE watches
        # one list; every wake-up (or time-out) sweeps ALL of them (every queue, every priority sub-list), so with
        # more than one list the wait is short (``wake_interval``) and the watched queue rotates.
        base = self._waits.watched(queues)
        if len(self._bulk_keys) > 1:
            timeout = min(timeout or self._waits.wait, self._waits.wait)
        self.client.connection.send_command("BLMOVE", base, base, "RIGHT", "RIGHT", timeout or 0)
        return None

    def _brpop_read(self, **options: Any) -> bool:
        if not self._can_bulk_pop():
            return bool(super()._brpop_read(**options))
        drained = False
        try:
            try:
                self.client.parse_response(self.client.connection, "BLMOVE", **options)
            except self.connection_errors:
                self.client.connection.disconnect()
                raise
            # Woken (or timed out: sweep every list anyway); nothing was popped yet.
            count = self._pop_count()
            popped, left = self._pop_and_record(count)
            drained = len(popped) < count or left == 0
            self._waits.after_pop(popped)
            if not popped:
                raise kredis.Empty()
            for key, text, restored, recorded_tag in popped:
                queue = key.rsplit(self.sep, 1)[0]
                try:
                    payload = _envelope(text)
                    tag = payload["properties"]["delivery_tag"]
                    if not isinstance(tag, str) or not tag:
                        raise TypeError(f"delivery_tag {tag!r}")
                    # The transport's word, not the producer's (the script checked delivery_info is an object).
                    payload["properties"]["delivery_info"]["redelivered"] = restored
                except Exception:  # noqa: BLE001 - Lua's parser took it, ours did not (e.g. invalid UTF-8)
                    logger.error(
                        "cannot read an envelope from %s; moved to %s%s: %.200r", queue, queue, DEAD_LETTER_SUFFIX, text
                    )
                    self._dead_letter(queue, text, recorded_tag)
                    continue
                self.qos._recorded.add(tag)
                self._queue_cycle.rotate(queue)
                try:
                    self.connection._deliver(payload, queue)
                except Exception:  # noqa: BLE001 - an envelope kombu cannot read (body_encoding {}, bad base64...)
                    # Raised before any strategy saw it (ours never raise): one message must not stop the worker.
                    logger.exception(
                        "cannot deliver an envelope from %s; moved to %s%s", queue, queue, DEAD_LETTER_SUFFIX
                    )
                    self.qos._recorded.discard(tag)
                    self._dead_letter(queue, text, tag)
                    if tag in self.qos._delivered:  # kombu appended it before the fault: free its prefetch slot
                        virtual.QoS.ack(self.qos, tag)
            return True
        finally:
            self._in_poll = None
            self._flush_brpop_reauth()
            if drained:  # after the poll is over: a flush acknowledges on this channel's connection pool
                idle.drained(self.connection.client)

    @property
    def _waits(self) -> WakePolicy:
        policy = getattr(self, "_wake_policy", None)
        if policy is None:
            ceiling = float(self.connection.client.transport_options.get("wake_interval", DEFAULT_WAKE_INTERVAL))
            policy = self._wake_policy = WakePolicy(self.sep, ceiling)
        return policy

    def _dead_letter(self, queue: str, text: bytes, tag: str) -> None:
        """Move a recorded envelope that cannot be delivered to ``<queue>.dead`` and forget it as unacknowledged (so
        no sweep restores it to fail again)."""
        with self.qos.pipe_or_acquire() as pipe:
            pipe.rpush(queue + DEAD_LETTER_SUFFIX, text)
            self.qos._remove_from_indices(tag, pipe)
            pipe.execute()

    def _pop_and_record(self, count: int) -> tuple[list[tuple[str, bytes, bool, str]], int]:
        """Pop up to ``count`` messages AND record them as unacknowledged, atomically (a Lua script), so no popped
        message ever exists only in this process: a SIGKILL at any point leaves each message either in its queue or
        in the unacked hash, from which the visibility-timeout sweep restores it. Envelopes that cannot be recorded
        go to the queue's dead-letter list (``<queue>.dead``) instead.

        Returns:
            The popped (list key, envelope, restored by us, delivery tag) tuples, and how many messages are left in all
            the lists.
        """
        held = self.reclaim_key  # fast reclaim: also record who holds each message
        reply = self._pop_script()(
            keys=[self.unacked_index_key, self.unacked_key, held or self.unacked_key, RESTORED_KEY, *self._bulk_keys],
            args=[count, time(), DEAD_LETTER_SUFFIX, "1" if held else ""],
        )
        if not reply:
            return [], 0
        sources, items, dropped, left = reply[0], reply[1], int(reply[2]), int(reply[3])
        if dropped:
            logger.error(
                "%d malformed envelope(s) moved to <queue>%s (no usable delivery tag, or not restorable)",
                dropped,
                DEAD_LETTER_SUFFIX,
            )
            refused = [(bytes_to_str(i), bytes_to_str(t)) for i, t in zip(reply[6], reply[7], strict=True)]
            if refused:
                tell_refused(self.connection.client, refused)
        return [
            (bytes_to_str(key), item, flag == b"1", bytes_to_str(tag))
            for key, item, flag, tag in zip(sources, items, reply[4], reply[5], strict=True)
        ], left

    def _pop_script(self) -> Any:
        script = getattr(self, "_pop_and_record_script", None)
        if script is None:
            script = self._pop_and_record_script = self.client.register_script(lua.source("pop_and_record"))
        return script


def _envelope(raw: bytes) -> Any:
    """kombu's envelope of a message: parsed with orjson (the envelope carries the whole body, base64-encoded, so
    this is most of a large message's parse), else as kombu's own ``loads`` does (what orjson refuses, e.g. a lone
    surrogate escape, kombu may still read), numbers by one rule either way (:func:`agent_workers.numbers.loads`)."""
    return numbers.loads(raw)


class Transport(kredis.Transport):
    """The stock Redis transport with :class:`Channel` above (``redis://`` and ``rediss://``)."""

    Channel = Channel


class SentinelChannel(kredis.SentinelChannel, Channel):
    """kombu's Sentinel channel (the master found through Sentinel) with the bulk, loss-free pop above."""


class SentinelTransport(kredis.SentinelTransport):
    """The stock Sentinel transport with :class:`SentinelChannel` (``sentinel://``)."""

    Channel = SentinelChannel


# -- acknowledgement and depth, for any transport (Redis in bulk) ---------------------------------------------------


def ack_all(messages: list[Any]) -> None:
    """Acknowledge many messages: on Redis in one pipelined round trip instead of one per message, on AMQP in one
    socket write."""
    by_qos: dict[int, list[Any]] = {}
    by_channel: dict[int, list[Any]] = {}
    for m in messages:
        qos = getattr(m.channel, "qos", None)
        if isinstance(qos, virtual.QoS) and hasattr(qos, "_remove_from_indices"):
            by_qos.setdefault(id(qos), []).append(m)
        elif not m.acknowledged:
            by_channel.setdefault(id(m.channel), []).append(m)
    for group in by_channel.values():  # AMQP and others: one ack each, written together on AMQP
        with kombu_amqp.corked(group[0].channel):
            for m in group:
                try:
                    m.ack()
                except Exception:  # noqa: BLE001 - channel gone: the broker redelivers it
                    logger.warning("ack of %s failed; the broker will redeliver it", m.delivery_tag, exc_info=True)
    for group in by_qos.values():
        qos = group[0].channel.qos
        try:
            with qos.pipe_or_acquire() as pipe:
                if hasattr(qos, "remove_many_from_indices"):  # ours: three commands for the whole group
                    qos.remove_many_from_indices([m.delivery_tag for m in group], pipe)
                else:
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
#: kombu's index of unacknowledged delivery tags scored by delivery time, which its visibility sweep reads.
UNACKED_INDEX_KEY: str = kredis.Channel.unacked_index_key


def binding_key(queue: str) -> str:
    """kombu's binding key of ``queue`` on a Redis broker (``_kombu.binding.<queue>``)."""
    return kredis.Channel.keyprefix_queue % queue


def permanent_binding_key(exchange: str) -> str:
    """kombu's set of the permanent bindings of ``exchange`` (``_kombu.binding_permanent.<exchange>``), written
    when a queue is bound; our queues' exchange is named like the queue."""
    return kredis.Channel.keyprefix_binding_permanent % exchange
