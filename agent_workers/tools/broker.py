"""What the tools need of a broker beyond publishing: a queue's backlog and its removal.

On Redis, kombu keeps a queue as a list named like it, binding keys ``_kombu.binding.<queue>`` and
``_kombu.binding_permanent.<exchange>``, and one hash of
delivered, not yet acknowledged messages for all queues (the visibility-timeout bookkeeping). The key names come from
:mod:`agent_workers.worker.kombu_redis`, the one module that knows kombu's Redis layout.
"""

from __future__ import annotations

from typing import Any

import redis

from agent_workers.worker.kombu_redis import UNACKED_KEY, binding_key, permanent_binding_key


def backlog(broker: Any, queue: str) -> int:
    """Messages the broker holds for ``queue``.

    Args:
        broker: a Redis client (counted: queued + delivered-unacknowledged, of all queues) or an AMQP channel
            (counted: ready; RabbitMQ does not say how many are unacknowledged through a passive declare).
    """
    if isinstance(broker, redis.Redis):
        return int(broker.llen(queue)) + int(broker.hlen(UNACKED_KEY))
    return int(broker.queue_declare(queue, passive=True).message_count)


#: kombu's Redis transport: ``priority_steps`` and the separator of a queue's priority sub-lists.
REDIS_PRIORITY_STEPS = (0, 3, 6, 9)
REDIS_PRIORITY_SEP = "\x06\x16"


def delete_queue(broker: Any, queue: str) -> None:
    """Remove ``queue``: on Redis (a client) its list, its priority sub-lists and its binding key; on AMQP (a
    channel) the queue and the direct exchange named like it (:func:`agent_workers.contract.declare_queue`), each
    only where it still exists."""
    if isinstance(broker, redis.Redis):
        steps = (f"{queue}{REDIS_PRIORITY_SEP}{step}" for step in REDIS_PRIORITY_STEPS if step)
        broker.delete(queue, *steps, binding_key(queue), permanent_binding_key(queue))
        return
    for call in (lambda: broker.queue_delete(queue), lambda: broker.exchange_delete(queue)):
        try:
            call()
        except Exception:  # noqa: BLE001 - already gone
            pass
