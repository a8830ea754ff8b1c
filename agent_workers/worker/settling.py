"""How an intake settles a batch's outcomes: results stored in one round trip, retries published once their RETRY
state is stored, messages acknowledged in bulk, outcomes reported; whatever could not be settled (the result backend
down, one command of the write failing, a retry's republish refused) goes to the backlog, retried from the event
loop's timer and in the end handed back to the broker (:mod:`~agent_workers.worker.backlog`).

:class:`Settling` is the half of :class:`~agent_workers.worker.intake.Intake` that runs after a batch was served.
"""

from __future__ import annotations

import logging
from typing import Any

from celery import states

from agent_workers.worker import deadlines, redelivery
from agent_workers.worker.kombu_redis import ack_all
from agent_workers.worker.requests import Pending
from agent_workers.worker.results import Outcome

log = logging.getLogger("agent_workers.worker.intake")

MAX_RETRIES = 3


class Settling:
    """Stores, retries, acknowledges and reports outcomes; expects ``app``, ``writer`` (a
    :class:`~agent_workers.worker.results.ResultWriter`), ``backlog`` and ``reporter`` on the instance."""

    app: Any
    writer: Any
    backlog: Any
    reporter: Any

    def _retry_or_fail(self, req: Pending, exc: Exception) -> Outcome:
        """A transient failure: retry the same task id with ``retries + 1`` (bounded), else fail it.

        The retry is published by :meth:`_finish`, only once its RETRY state is stored: published first, another
        worker could store the retry's final answer before this RETRY, which would then hide it.
        """
        if req.retries >= MAX_RETRIES:
            return Outcome(req, states.FAILURE, exc)
        return Outcome(req, states.RETRY, exc, retry_countdown=0.5 * 2**req.retries)

    def _publish_retry(self, o: Outcome) -> bool:
        req = o.request
        try:
            self.app.send_task(
                req.name,
                args=req.args,
                kwargs=req.kwargs,
                task_id=req.id,
                retries=req.retries + 1,
                countdown=o.retry_countdown,
                expires=req.headers.get("expires"),
                priority=deadlines.priority_of(req.message, broker_is_redis=self.app.settings.broker_is_redis),
            )
        except Exception:  # noqa: BLE001 - not acknowledged: tried again from the backlog, then requeued
            log.warning("publishing the retry of %s failed; trying again", req.id, exc_info=True)
            return False
        return True

    def _finish(self, outcomes: list[Outcome]) -> None:
        """Store results in one round trip, then publish retries, then ack in bulk, then announce (results before
        acks: at-least-once; a result that was already final is kept, and the message acknowledged)."""
        try:
            self.reporter.send_kept()
        except Exception:  # noqa: BLE001 - events are for Flower
            log.exception("sending kept events failed")
        if outcomes:
            self._settle(outcomes)

    def _settle(self, outcomes: list[Outcome]) -> None:
        """Store what is not stored yet, publish retries, ack and report what is done; whatever failed (the backend
        or one command of the write, a retry's republish) goes to the backlog, retried from the timer."""
        todo = [o for o in outcomes if o.written is None]
        try:
            for o, written in zip(todo, self.writer.write(todo) if todo else [], strict=True):
                o.written = written
        except Exception:  # noqa: BLE001 - results not stored: retried from the timer, the messages stay unacked
            log.warning("storing %d results failed; retrying", len(todo), exc_info=True)
            self.backlog.add(outcomes)
            return
        done, again = [], []
        for o in outcomes:
            if o.written is None or (o.state == states.RETRY and o.written and not self._publish_retry(o)):
                again.append(o)
            else:
                done.append(o)
        self.backlog.add(again)
        ack_all([o.request.message for o in done])
        try:
            self.reporter.report(done)
        except Exception:  # noqa: BLE001 - metrics and events never cost a request its answer
            log.exception("reporting %d outcomes failed", len(done))

    def _requeue(self, outcomes: list[Outcome]) -> None:
        """Hand messages whose outcome could not be settled back to the broker (a redelivery computes them again):
        AMQP requeues; kombu's Redis transport restores the message to its queue and frees its QoS slot."""
        redelivery.forgive(self.app.store, [o.request.id for o in outcomes if o.request.redelivered])
        for o in outcomes:
            message = o.request.message
            try:
                if not message.acknowledged:
                    message.reject(requeue=True)
            except Exception:  # noqa: BLE001 - channel gone: the broker redelivers it anyway
                log.warning("requeueing %s failed; the broker will redeliver it", o.request.id, exc_info=True)
