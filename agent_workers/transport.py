"""A kombu Redis transport that pops many messages per round trip.

kombu's Redis transport issues one ``BRPOP`` per message and then one pipeline per message to record it as
unacknowledged (the visibility-timeout bookkeeping), so a worker pays two round trips and a loop iteration for every
message before any work happens. Here the consumer issues ``BLMPOP ... COUNT n`` (Redis >= 7.0), with ``n`` the
free prefetch window, and records all popped messages as unacknowledged in ONE pipeline before handing any of them
to the consumer, so the crash window is the same as kombu's (pop, then record) but paid once per batch.

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
        keys = [self._q_for_pri(queue, pri) for pri in self.priority_steps for queue in queues]
        self._in_poll = self.client.connection
        self._brpop_sent_at = kredis.monotonic()
        # RIGHT matches BRPOP (producers LPUSH); keys are tried in order, so priorities keep their meaning.
        self.client.connection.send_command("BLMPOP", timeout or 0, len(keys), *keys, "RIGHT", "COUNT",
                                            self._pop_count())
        return None

    def _brpop_read(self, **options: Any) -> bool:
        if not self._can_bulk_pop():
            return bool(super()._brpop_read(**options))
        try:
            try:
                reply = self.client.parse_response(self.client.connection, "BLMPOP", **options)
            except self.connection_errors:
                self.client.connection.disconnect()
                raise
            if not reply:
                raise kredis.Empty()
            dest, items = reply
            dest = bytes_to_str(dest).rsplit(self.sep, 1)[0]
            self._queue_cycle.rotate(dest)
            raw, payloads = [], []
            for item in items:
                text = bytes_to_str(item)
                try:
                    payload = loads(text)
                    payload["properties"]["delivery_tag"]
                except Exception:  # noqa: BLE001 - one unparseable envelope must not cost the others
                    logger.error("dropping an unparseable message from %s: %.200r", dest, text)
                    continue
                raw.append(text)
                payloads.append(payload)
            if not payloads:
                return True
            self._record_unacked(payloads, raw)
            for payload in payloads:
                self.connection._deliver(payload, dest)
            return True
        finally:
            self._in_poll = None
            self._flush_brpop_reauth()

    def _record_unacked(self, payloads: list[dict[str, Any]], raw: list[str]) -> None:
        """What ``QoS.append`` does per message, for all of them in one pipeline.

        The stored value is ``json([payload, exchange, routing_key])``; the payload's JSON is spliced in as
        received instead of being encoded again.
        """
        now = time()
        qos = self.qos
        with qos.pipe_or_acquire() as pipe:
            for payload, text in zip(payloads, raw, strict=True):
                props = payload["properties"]
                tag = props["delivery_tag"]
                info = props.get("delivery_info") or {}
                pipe.zadd(self.unacked_index_key, {tag: now})
                pipe.hset(self.unacked_key, tag,
                          f"[{text}, {dumps(info.get('exchange'))}, {dumps(info.get('routing_key'))}]")
            pipe.execute()
        qos._recorded.update(p["properties"]["delivery_tag"] for p in payloads)


class Transport(kredis.Transport):
    """The stock Redis transport with :class:`Channel` above."""

    Channel = Channel
