"""Outcomes the worker could not settle yet: their result write failed (the result backend is down, or one command of
the pipelined write errored), or their retry could not be republished (the broker refused it).

Their messages stay unacknowledged, so nothing is lost, but nothing may be stranded either: leaving them unacked
would hold them for the broker's consumer timeout (RabbitMQ, 30 min) or the visibility timeout (Redis, 1 h), and
keep their prefetch slots, so a worker with a small prefetch would stop consuming after the outage. So the backlog
tries them again from the event-loop timer, with backoff (never blocking the loop), and once an outcome has waited
``give_up_after`` seconds it hands its message back to the broker: AMQP ``reject(requeue=True)``; on Redis kombu's
``reject(requeue=True)`` restores it to its queue and releases its QoS slot. Another delivery then computes it again.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

log = logging.getLogger(__name__)

#: First and longest pause between two attempts, seconds (doubling in between).
FIRST_RETRY_S = 0.05
LONGEST_RETRY_S = 2.0


class Backlog:
    """Unsettled outcomes of one intake, retried on the event-loop timer and requeued after ``give_up_after``.

    Args:
        timer: the consumer's kombu timer (event loop only).
        settle: called on the event loop with the outcomes to try again; it calls :meth:`add` for what fails again.
        requeue: called on the event loop with the outcomes given up on: their messages go back to the broker.
        give_up_after: seconds an outcome is retried before its message is requeued.
    """

    def __init__(
        self,
        *,
        timer: Any,
        settle: Callable[[list[Any]], None],
        requeue: Callable[[list[Any]], None],
        give_up_after: float,
    ) -> None:
        self.timer = timer
        self._settle = settle
        self._requeue = requeue
        self.give_up_after = give_up_after
        self._since: dict[int, float] = {}  # id(outcome) -> monotonic time of its first failure
        self._waiting: list[Any] = []
        self._tref: Any = None
        self._failures = 0

    def __len__(self) -> int:
        return len(self._waiting)

    def add(self, outcomes: list[Any]) -> None:
        """Keep ``outcomes`` (unsettled: their messages unacknowledged) and arm the retry timer."""
        if not outcomes:
            return
        now = time.monotonic()
        for o in outcomes:
            self._since.setdefault(id(o), now)
        self._waiting.extend(outcomes)
        if self._tref is None:
            delay = min(LONGEST_RETRY_S, FIRST_RETRY_S * 2**self._failures)
            self._failures += 1
            self._tref = self.timer.call_after(delay, self._retry)

    def _retry(self) -> None:
        self._tref = None
        waiting, self._waiting = self._waiting, []
        now = time.monotonic()
        expired = [o for o in waiting if now - self._since[id(o)] >= self.give_up_after]
        again = [o for o in waiting if now - self._since[id(o)] < self.give_up_after]
        for o in expired:
            self._since.pop(id(o), None)
        try:
            if expired:
                log.warning(
                    "%d results could not be settled within %g s; requeueing their messages",
                    len(expired),
                    self.give_up_after,
                )
                self._requeue(expired)
            if again:
                self._settle(again)
        except Exception:  # noqa: BLE001 - a timer callback must never raise; keep them for the next round
            log.exception("retrying %d unsettled results failed unexpectedly", len(again))
            kept = {id(o) for o in self._waiting}
            self.add([o for o in again if id(o) not in kept])
        kept = {id(o) for o in self._waiting}
        for o in again:
            if id(o) not in kept:
                self._since.pop(id(o), None)
        if not self._waiting:
            self._failures = 0

    def close(self) -> None:
        """Stop retrying (a replaced intake: its messages, on a dead channel, are redelivered by the broker)."""
        if self._tref is not None:
            self._tref.cancel()
            self._tref = None
