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
from collections import deque
from collections.abc import Callable
from typing import Any

from celery import states

from agent_workers.contract import MAX_DEADLINE_MS
from agent_workers.worker.requests import Pending, revoked_error
from agent_workers.worker.results import Outcome

_NO_DEADLINE = math.inf
#: kombu's Redis transport knows priorities 0-9 (``Channel.max_priority``, ``priority_steps``).
REDIS_MAX_PRIORITY = 9
#: A ``deadline_ms`` below this (1973-03-03 in milliseconds) that is near now in seconds was given in seconds.
_SECONDS_LOOK_BELOW = 10**11


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
    # Bad values (a float, 10**400, past year 9999) fail later, in binding, naming deadline_ms.
    if isinstance(raw, int) and not isinstance(raw, bool) and 0 <= raw <= MAX_DEADLINE_MS:
        due = raw / 1000.0 if due is None else min(due, raw / 1000.0)
    req.deadline = due
    priority = priority_of(req.message, broker_is_redis=broker_is_redis)
    if priority is not None:
        req.rank = priority if broker_is_redis else -priority
    return due is not None or req.rank != 0


def priority_of(message: Any, *, broker_is_redis: bool) -> int | None:
    """The priority the broker gave ``message``, as the broker reads it; None when it has none.

    AMQP: the ``priority`` property, an octet. Redis: kombu's reading (``Channel._get_message_priority``):
    ``int(priority)`` clamped to 0-9, 0 when it does not convert, so the worker orders a flush exactly as kombu
    chose the priority list (an unclamped 1000 or -5 would reorder what kombu ranks as 9 or 0).
    """
    raw = (getattr(message, "properties", None) or {}).get("priority")
    if raw is None:
        return None
    if not broker_is_redis:
        return raw if isinstance(raw, int) and not isinstance(raw, bool) else None
    try:
        value = int(raw)
    except (TypeError, ValueError, OverflowError):
        return 0
    return max(min(value, REDIS_MAX_PRIORITY), 0)


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


def miss(req: Pending, now: float, done: float) -> Outcome | None:
    """REVOKED for ``req`` when it would be answered at ``done``, after its deadline, else None; the reason says
    whether it expired, its deadline passed, or the prediction missed it."""
    if req.deadline is None or req.deadline >= done:
        return None
    if req.expires is not None and req.expires.timestamp() <= now:
        return revoke(req, "expired")  # what Celery, and the check before compute, call it
    if req.deadline <= now:
        return revoke(req, "deadline passed before compute" + unit_hint(req, now))
    due, eta = 1000 * (req.deadline - now), 1000 * (done - now)
    return revoke(req, f"deadline cannot be met: predicted done in {eta:.1f} ms, due in {due:.1f} ms")


def unit_hint(req: Pending, now: float) -> str:
    """A hint for a ``deadline_ms`` that was given in seconds (a common mistake: it then lies in January 1970 and
    the request is revoked on arrival); empty otherwise."""
    raw = deadline_ms_of(req)
    if isinstance(raw, (int, float)) and not isinstance(raw, bool) and 0 < raw < _SECONDS_LOOK_BELOW:
        if abs(raw - now) < 366 * 24 * 3600:
            return (
                f"; deadline_ms {raw} looks like unix seconds: send unix milliseconds (now is about {int(now * 1000)})"
            )
    return ""


def too_late(req: Pending, now: float, cost: float) -> Outcome | None:
    """REVOKED for ``req`` when its deadline falls before ``now + cost`` (the least its batch takes), else None.

    Checked as a request arrives: under overload a request that waited in the broker past its deadline is answered
    and acknowledged at once, so it neither holds a prefetch slot nor waits for a batch in flight to end (Triton's
    queue timeouts only fire once the running batch is done).
    """
    return miss(req, now, now + cost)


def drop_late(
    members: list[tuple[Pending, Any]], *, chunk: int, cost: float
) -> tuple[list[tuple[Pending, Any]], list[Outcome]]:
    """Revoke the members that cannot be answered by their deadline, before any compute.

    The members are computed ``chunk`` at a time, ``cost`` predicted seconds per chunk, and every answer is stored
    when the last chunk is done: all are answered at ``now + chunks * cost``. A deadline before that is a miss;
    revoking misses leaves fewer chunks, so the check repeats until nothing more is revoked (a member revoked in an
    earlier round stays revoked: this errs towards fewer late answers).
    """
    now = time.time()
    kept = list(members)
    revoked: list[Outcome] = []
    while True:
        done = now + math.ceil(len(kept) / max(1, chunk)) * cost
        keep: list[tuple[Pending, Any]] = []
        for member in kept:
            outcome = miss(member[0], now, done)
            if outcome is None:
                keep.append(member)
            else:
                revoked.append(outcome)
        if len(keep) == len(kept):
            return keep, revoked
        kept = keep


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
    """What a batch of each model costs, for deadline predictions, from its recent batches (each model's first is
    left out: allocations and lazy initialisation make it slow).

    The prediction is a lower bound, never an extrapolating fit: a model that over-predicts revokes everything, and
    then no batch ever runs to correct it. Per batch size, the statistic is the lower median of that size's samples
    from the last ``MAX_AGE_S`` seconds, so one slow batch (a GC pause, a page fault storm) is outvoted by the next
    normal one and forgotten after ``MAX_AGE_S`` anyway. Across sizes, a batch costs at least what a smaller one
    costs (cost grows with the size) and at least ``size`` x the per-request cost of a larger one. While a model's
    requests are being revoked on a prediction alone, :meth:`probe` lets one through every ``PROBE_AFTER_S``, so
    the prediction is measured again instead of trusted for ever.
    """

    HISTORY = 32
    #: samples older than this (seconds) no longer count
    MAX_AGE_S = 60.0
    #: a model without a sample this recent (seconds) gets a probe: one request computed despite the prediction
    PROBE_AFTER_S = 2.0

    def __init__(self, *, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._batches: dict[str, deque[tuple[int, float, float]]] = {}
        self._probed: dict[str, float] = {}

    def observe(self, model: str, size: int, seconds: float) -> None:
        """Record a batch of ``model`` (from the compute thread or the loop)."""
        history = self._batches.get(model)
        if history is None:
            self._batches[model] = deque(maxlen=self.HISTORY)  # the first batch: left out
            return
        history.append((max(1, size), seconds, self._clock()))

    def floor(self) -> float:
        """The least any known model is predicted to take for one request (0 before any computed): a lower bound
        for a request whose model is not known yet."""
        return min((self.predicted(m, 1) for m in list(self._batches)), default=0.0)

    def ahead(self, req: Pending, pending: list[Pending]) -> float:
        """The least time before ``req`` could be answered if admitted now: the batches of the buffered requests
        that would be served before it (more urgent or as urgent, deadline not yet passed) and its own."""
        key, now = urgency(req), time.time()
        before = sum(1 for p in pending if urgency(p) <= key and not passed(p, now))
        model = model_of(req)
        cost = self.predicted(model, before + 1) if model is not None else 0.0
        return cost or self.floor()

    def predicted(self, model: str, size: int) -> float:
        """The least seconds a batch of ``size`` of ``model`` takes; 0 before the model computed a second batch."""
        per_size = self._per_size(model)
        smaller = max((t for n, t in per_size.items() if n <= size), default=0.0)
        larger = min((t / n for n, t in per_size.items() if n >= size), default=0.0)
        return max(smaller, size * larger)

    def probe(self, model: str | None) -> bool:
        """Whether a request of ``model`` that the prediction alone would revoke is computed anyway, to measure the
        model again: when its newest sample is older than ``PROBE_AFTER_S`` and so is its last probe."""
        if model is None:
            return False
        now = self._clock()
        history = list(self._batches.get(model) or ())
        newest = max((at for _, _, at in history), default=-math.inf)
        if now - newest < self.PROBE_AFTER_S or now - self._probed.get(model, -math.inf) < self.PROBE_AFTER_S:
            return False
        self._probed[model] = now
        return True

    def _per_size(self, model: str) -> dict[int, float]:
        """The lower median of each batch size's recent samples."""
        oldest = self._clock() - self.MAX_AGE_S
        by_size: dict[int, list[float]] = {}
        for n, t, at in list(self._batches.get(model) or ()):  # one C-level copy: the compute thread appends
            if at >= oldest:
                by_size.setdefault(n, []).append(t)
        return {n: sorted(ts)[(len(ts) - 1) // 2] for n, ts in by_size.items()}


def model_of(req: Pending) -> str | None:
    """The model name ``req`` asks for, when it names one as a string (before binding checks it)."""
    model = (req.kwargs or {}).get("model", req.args[0] if req.args else None)
    return model if isinstance(model, str) else None
