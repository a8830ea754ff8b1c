"""Redelivered predict requests: answered already, or suspects served alone with a bounded attempt count.

A redelivery means the worker holding the message died (or lost its connection) before acknowledging it. Its final
result may already be stored (the worker died between the result write and the ack): then the message is only
acknowledged, never recomputed, so a task id keeps one answer. Otherwise it is served alone, after the rest of its
flush, and each solo attempt is counted in Redis first (the broker keeps no count: Redis none, RabbitMQ only a flag).
"""

from __future__ import annotations

import logging
from typing import Any

from agent_workers.errors import ModelError
from agent_workers.worker.kombu_redis import ack_all

log = logging.getLogger(__name__)

MAX_DELIVERIES = 3  # a request that took its worker down this many times is failed as poison
DELIVERIES_TTL = 24 * 3600

Member = tuple[Any, Any]  # (Pending, its inputs)


def skip_answered(writer: Any, batch: list[Any]) -> list[Any]:
    """Acknowledge, without recomputing, redelivered requests whose final result is already stored; the rest.

    Only redelivered requests are looked up (one MGET per batch that has any), so the hot path does not pay.
    """
    again = [r.id for r in batch if r.redelivered]
    if not again:
        return batch
    try:
        answered = writer.final_states(again)
    except Exception:  # noqa: BLE001 - unknown: serve them; the store never replaces a final result anyway
        log.warning("cannot look up earlier results of %d redelivered requests", len(again), exc_info=True)
        return batch
    if not answered:
        return batch
    log.info("%d redelivered requests already have their final result; acknowledging them", len(answered))
    ack_all([r.message for r in batch if r.id in answered])
    return [r for r in batch if r.id not in answered]


def split_redelivered(groups: dict[tuple[str, int | None], list[Member]]) -> list[tuple[str, int | None, Member]]:
    """Take redelivered requests out of their groups; they are served one by one after the rest."""
    solo = []
    for (model, version), members in list(groups.items()):
        keep = [m for m in members if not m[0].redelivered]
        solo.extend((model, version, m) for m in members if m[0].redelivered)
        if keep:
            groups[(model, version)] = keep
        else:
            del groups[(model, version)]
    return solo


def count_attempt(store: Any, task_id: str) -> int:
    """Count one more solo attempt of ``task_id``; the count so far.

    Raises:
        redis.RedisError: the parameter store is unreachable.
    """
    key = store.keys.deliveries(task_id)
    pipe = store.client.pipeline(transaction=False)
    pipe.incr(key)
    pipe.expire(key, DELIVERIES_TTL)
    return int(pipe.execute()[0])


def forgive(store: Any, task_ids: list[str]) -> None:
    """Forget the solo attempts counted for ``task_ids``: their worker served them and handed them back (the result
    backend was down), so their next delivery is no sign of poison. Best effort: a failure only logs."""
    if not task_ids:
        return
    try:
        store.client.delete(*(store.keys.deliveries(t) for t in task_ids))
    except Exception:  # noqa: BLE001 - at worst a request counts one attempt too many
        log.warning("cannot reset the delivery counts of %d requeued requests", len(task_ids), exc_info=True)


def poison_error(attempt: int) -> ModelError:
    """The failure of a request that took its worker down ``attempt`` times."""
    return ModelError(
        f"request was delivered {attempt + 1} times and its worker died each time before finishing it "
        "(poison message); not retried"
    )
