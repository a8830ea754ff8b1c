"""Deadlines and priorities of predict requests: when each is due, in which order a flush serves them, and which
ones to revoke before they cost compute.

A request's **deadline** (unix seconds) is the earlier of its ``expires`` header and its ``deadline_ms`` argument
(contract 1.1: an absolute unix time in milliseconds, on the producer's clock). Its **rank** orders a flush: lower
first, then earlier deadline, then arrival. The rank follows the meaning the broker gives the message's
``priority`` property, so the worker never contradicts the order the broker handed messages over in:

* RabbitMQ (AMQP): a higher priority is more urgent (rank = -priority);
* Redis (kombu's transport): priority 0 is popped first, so a lower number is more urgent (rank = priority).

Requests without a deadline and without a priority skip all of this (a flag per flush; see Batcher.admit).
"""

from __future__ import annotations

import math
import time
from typing import Any

from celery import states

from agent_workers.config import BatchSettings
from agent_workers.worker.policy import BatchPolicy
from agent_workers.worker.requests import Pending, revoked_error
from agent_workers.worker.results import Outcome

_NO_DEADLINE = math.inf


def deadline_ms_of(req: Pending) -> Any:
    """The raw ``deadline_ms`` argument of ``req`` (positional fifth or keyword), or None."""
    if req.kwargs:
        value = req.kwargs.get("deadline_ms")
        if value is not None:
            return value
    return req.args[4] if len(req.args) > 4 else None


def stamp(req: Pending, *, broker_is_redis: bool) -> bool:
    """Fill in ``req.deadline`` and ``req.rank``; True when either matters (the flush must be ordered)."""
    due = req.expires.timestamp() if req.expires is not None else None
    raw = deadline_ms_of(req)
    if isinstance(raw, int) and not isinstance(raw, bool) and raw >= 0:  # bad values fail later, in binding
        due = raw / 1000.0 if due is None else min(due, raw / 1000.0)
    req.deadline = due
    priority = (getattr(req.message, "properties", None) or {}).get("priority")
    if isinstance(priority, int) and not isinstance(priority, bool):
        req.rank = priority if broker_is_redis else -priority
    return due is not None or req.rank != 0


def urgency(req: Pending) -> tuple[int, float, float]:
    """Sort key: lower serves first."""
    return (req.rank, _NO_DEADLINE if req.deadline is None else req.deadline, req.received)


def order(batch: list[Pending]) -> list[Pending]:
    """``batch`` in serving order (a stable sort: equal keys keep their arrival order)."""
    return sorted(batch, key=urgency)


def passed(req: Pending, now: float) -> bool:
    return req.deadline is not None and req.deadline <= now


def revoke(req: Pending, why: str) -> Outcome:
    return Outcome(req, states.REVOKED, revoked_error(why))


def drop_late(
    members: list[tuple[Pending, Any]], *, chunk: int, cost: float
) -> tuple[list[tuple[Pending, Any]], list[Outcome]]:
    """Revoke the members that cannot be answered by their deadline, before any compute.

    The i-th member is computed in chunk ``i // chunk``; with ``cost`` predicted seconds per chunk it is done at
    ``now + (i // chunk + 1) * cost``. A deadline before that is a miss.
    """
    now = time.time()
    kept: list[tuple[Pending, Any]] = []
    revoked: list[Outcome] = []
    for member in members:
        req = member[0]
        if req.deadline is not None:
            done = now + (len(kept) // chunk + 1) * cost
            if req.deadline <= now:
                revoked.append(revoke(req, "deadline passed before compute"))
                continue
            if req.deadline < done:
                revoked.append(
                    revoke(
                        req,
                        f"deadline cannot be met: predicted done in {1000 * (done - now):.1f} ms, due in "
                        f"{1000 * (req.deadline - now):.1f} ms",
                    )
                )
                continue
        kept.append(member)
    return kept, revoked


def shed(pending: list[Pending], incoming: Pending, limit: int) -> tuple[list[Pending], list[Outcome], bool]:
    """Make room under ``limit`` for ``incoming``: revoke buffered requests past their deadline first, then the
    least urgent (possibly ``incoming`` itself). Returns the buffer to keep, the outcomes, and whether ``incoming``
    is admitted."""
    now = time.time()
    outcomes = [revoke(r, "deadline passed (shed under overload)") for r in pending if passed(r, now)]
    if outcomes:
        pending = [r for r in pending if not passed(r, now)]
    if len(pending) < limit:
        return pending, outcomes, True
    why = f"overloaded: this worker holds {limit} requests (AGENT_WORKERS_MAX_QUEUE_SIZE); shed the least urgent"
    worst = max(pending, key=urgency)
    if urgency(incoming) >= urgency(worst):
        outcomes.append(revoke(incoming, why))
        return pending, outcomes, False
    outcomes.append(revoke(worst, why))
    return [r for r in pending if r is not worst], outcomes, True


class CostModels:
    """The learned batch cost ``t(n) ≈ a·n + b`` of each model (BatchPolicy's fit), for deadline predictions."""

    def __init__(self, settings: BatchSettings) -> None:
        self.settings = settings
        self._models: dict[str, BatchPolicy] = {}

    def observe(self, model: str, size: int, seconds: float) -> None:
        policy = self._models.get(model)
        if policy is None:
            policy = self._models[model] = BatchPolicy(self.settings)
        policy.observe(size, seconds)

    def predicted(self, model: str, size: int) -> float:
        """Predicted seconds of a batch of ``size``; 0 before the model computed anything."""
        policy = self._models.get(model)
        return 0.0 if policy is None else policy.estimate(size)
