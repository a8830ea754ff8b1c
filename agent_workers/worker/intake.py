"""The intake of a batched task: messages arrive in the worker's event loop, are checked and decoded once, held
for their ``eta``, buffered, and flushed as one batch (full, or the broker has nothing more to hand over, or the
oldest request waited ``max_wait_ms``); every request then gets its own result (one pipelined write),
its retry, its ack (in bulk) and its Flower events.

A subclass decides how a batch is served (:meth:`Intake._serve`): :class:`~agent_workers.worker.batcher.Batcher`
runs forward passes. Serving runs in the intake's compute thread (:mod:`~agent_workers.worker.pipeline`, depth 2 by
default), so the event loop keeps receiving and buffering the next batch meanwhile; results, retries, acks and events
stay on the loop, in the order of the batches. Acks come after results (at-least-once).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from celery import states
from celery.utils.saferepr import saferepr
from celery.worker import state as worker_state

from agent_workers import metrics
from agent_workers.errors import InputError
from agent_workers.worker import idle, kombu_amqp, redelivery, refused
from agent_workers.worker.backlog import Backlog
from agent_workers.worker.held import HeldMessages
from agent_workers.worker.kombu_redis import ack_all
from agent_workers.worker.pipeline import Job, Pipeline
from agent_workers.worker.policy import BatchPolicy
from agent_workers.worker.reporting import Reporter
from agent_workers.worker.requests import Pending, check_headers, decode_body, parse_time, revoked_error, usable_id
from agent_workers.worker.results import Outcome, ResultWriter
from agent_workers.worker.settling import Settling

log = logging.getLogger(__name__)

#: With the pipeline depth on auto, a batch predicted to compute in less than this runs on the event loop: the
#: hand-over to the compute thread and back costs about as much as it would overlap.
INLINE_BELOW_S = 0.002
#: ... and one batch in this many that would go to the compute thread runs on the loop, to time it again.
PROBE_EVERY = 64


class Intake(Settling):
    """Receives a batched task's messages in the event loop and flushes them in batches sized by ``policy``.

    Subclasses implement :meth:`_serve` (and :meth:`_serve_later` for what it defers until the rest of the flush is
    stored and acknowledged).
    """

    #: what ``AGENT_WORKERS_PIPELINE_DEPTH=0`` resolves to on CPU (2 on CUDA)
    cpu_pipeline_depth = 1

    def __init__(self, *, task: Any, app: Any, consumer: Any, policy: BatchPolicy) -> None:
        self.task = task
        self.app = app
        self.policy = policy
        self.writer = ResultWriter(app)
        self.timer = consumer.timer
        eventer = consumer.event_dispatcher
        if eventer is not None:
            # One publish per batch: the dispatcher sends a buffered group when it reaches this many events.
            eventer.buffer_limit = max(eventer.buffer_limit, 8 * policy.settings.max_batch_size)
        self.hostname = consumer.hostname
        self.consumer = consumer
        self.held = HeldMessages(timer=consumer.timer, visibility_timeout=app.settings.visibility_timeout)
        self.labels = metrics.ModelLabels()
        self.reporter = Reporter(eventer=eventer, labels=self.labels)
        self.pending: list[Pending] = []
        self._tref: Any = None
        self.backlog = Backlog(
            timer=consumer.timer, settle=self._settle, requeue=self._requeue, give_up_after=app.settings.result_retry_s
        )
        self.max_message_bytes = app.settings.max_message_bytes
        self.max_eta_s = app.settings.max_eta_s
        self.track_started = app.settings.track_started
        # The transport says when the broker has nothing more for us (kombu_redis.py, kombu_amqp.py): a batch
        # then flushes at once instead of waiting out max_wait for company that is not coming.
        self._connection = getattr(consumer, "connection", None)
        self._idle = False
        self._deferred = False  # a flush found the pipeline full: flush when a batch is done
        # RabbitMQ pushes deliveries one frame per loop callback up to the prefetch window: a subclass that wants
        # whole batches from a drain sets this there (_on_timer, _short_on_amqp); a trainer's groups are unchanged
        self._pushed = False
        self._joined = 0  # requests buffered when the wait timer last fired
        setting = getattr(policy.settings, "pipeline_depth", 1)
        # auto (0): a cheap batch computes on the loop, where handing it to the thread would cost more than it saves
        self._adaptive = setting == 0
        self.pipeline = Pipeline(
            depth=pipeline_depth(app, setting, cpu=self.cpu_pipeline_depth),
            hub=getattr(consumer, "hub", None),
            finish=self._finish,
            on_free=self._on_free,
            name=getattr(task, "name", "intake"),
        )
        if policy.settings.flush_when_idle:
            idle.subscribe(self._connection, self.on_drained)
        refused.subscribe_refused(self._connection, self._on_refused)

    def close(self) -> None:
        """Stop the wait timer (a replaced intake's buffered messages are redelivered by the broker)."""
        idle.unsubscribe(self._connection, self.on_drained)
        refused.unsubscribe_refused(self._connection, self._on_refused)
        if self._tref is not None:
            self._tref.cancel()
            self._tref = None
        self.pipeline.close()
        self.backlog.close()

    def drain(self) -> None:
        """Warm shutdown (event loop, blocking): serve what is buffered and finish every batch in flight."""
        self.pipeline.drain()
        if self.pending:
            log.info("shutting down: serving %d buffered %s requests", len(self.pending), self.task.name)
            self.flush()
        self.pipeline.drain()

    # -- receive --------------------------------------------------------------------------------------------------

    def on_message(
        self,
        message: Any,
        body: Any,
        ack: Callable[..., Any],
        reject: Callable[..., Any],
        callbacks: Any,
        **kwargs: Any,
    ) -> None:
        """Celery strategy entry point: called in the event loop for every message of the task.

        Nothing a message contains may raise out of here: Celery's consumer treats an exception from a strategy
        as unrecoverable and stops the worker, and the redelivered message would stop the next one.
        """
        self._idle = False
        request = None
        try:
            request = self._receive(message, body)
            if request is not None:
                self._hold_or_admit(request)
        except Exception as exc:  # noqa: BLE001 - last resort: this message alone fails, loudly
            self._last_resort(message, body, request, exc)

    def _last_resort(self, message: Any, body: Any, request: Pending | None, exc: Exception) -> None:
        """A message whose handling raised: a FAILURE result when it has an id, else dead-lettered (acknowledged,
        logged); never an exception out of the consumer or a timer."""
        log.error("cannot handle a message: %s", saferepr(getattr(message, "headers", None), 300), exc_info=exc)
        if request is not None and any(p is request for p in self.pending):
            return  # it was buffered before the fault: it is answered with its batch
        try:
            headers = getattr(message, "headers", None) if body is None else body
            headers = headers if isinstance(headers, dict) else {}
            task_id = request.id if request is not None else usable_id(headers.get("id"))
            reason = InputError(f"this message cannot be served: {type(exc).__name__}: {str(exc)[:200]}")
            self._refuse(message, task_id, headers, reason)
        except Exception:  # noqa: BLE001 - not even a result could be stored: drop it alone
            log.exception("dropping a message that cannot be handled")
            ack_all([message])

    def _receive(self, message: Any, body: Any) -> Pending | None:
        """The checked request of ``message``, or None when it was refused (failed alone or dead-lettered)."""
        # Protocol 2 carries the envelope in the headers, protocol 1 in the body.
        headers = message.headers if body is None else body
        if not isinstance(headers, dict):
            headers = {}
        task_id = usable_id(headers.get("id"))
        try:
            check_headers(headers)
            if len(message.body) > self.max_message_bytes:
                raise InputError(
                    f"message is {len(message.body)} bytes; the limit is {self.max_message_bytes} "
                    "(AGENT_WORKERS_MAX_MESSAGE_BYTES)"
                )
            payload = decode_body(message)
            if body is not None:  # protocol 1
                args, kw = body.get("args", []), body.get("kwargs", {})
            else:
                args, kw, _embed = payload
            if not isinstance(args, list) or not isinstance(kw, dict):
                raise InputError("message body must be [args, kwargs, embed] with a list and an object")
        except Exception as exc:  # noqa: BLE001 - a bad message fails alone, the worker stays up
            self._refuse(message, task_id, headers, exc)
            return None
        assert task_id is not None  # check_headers refused it otherwise
        return Pending(
            id=task_id,
            name=headers.get("task") or self.task.name,
            message=message,
            args=args,
            kwargs=kw,
            headers=headers,
            received=time.monotonic(),
            expires=parse_time(headers.get("expires")),
            # The broker's word only (RabbitMQ's flag; on Redis the transport's, from its own restores): a producer's
            # ``redelivered`` header would force solo serving and a poison count per request.
            redelivered=(message.delivery_info or {}).get("redelivered") is True,
        )

    def _hold_or_admit(self, request: Pending) -> None:
        eta = parse_time(request.headers.get("eta"))
        if eta is not None:
            delay = (eta - datetime.now(UTC)).total_seconds()
            if delay > 0:
                refused = self._refuse_hold(request, delay)
                if refused is not None:
                    self._finish([refused])
                    return
                # eta/countdown: held (unacknowledged) on the event-loop timer, then admitted. Like Celery's own
                # strategy (celery/worker/strategy.py), a held message widens the prefetch window by one, so
                # held messages never starve the requests behind them.
                qos = getattr(self.consumer, "qos", None)
                if qos is not None:
                    qos.increment_eventually()
                self.held.hold(request, delay)
                self.timer.call_after(delay, self._release, (request, qos))
                return
        self.admit(request)

    def _refuse_hold(self, request: Pending, delay: float) -> Outcome | None:
        """The outcome of an eta/countdown request that must not be held (``delay`` seconds ahead), else None."""
        if delay > self.max_eta_s:
            return Outcome(
                request,
                states.FAILURE,
                InputError(
                    f"eta is {delay:.0f} s ahead; this worker holds requests at most {self.max_eta_s:g} s ahead "
                    "(AGENT_WORKERS_MAX_ETA_S)"
                ),
            )
        return None

    def _release(self, request: Pending, qos: Any) -> None:
        """The timer of a held request (eta/countdown): admit it now. Never raises (a timer's exception would reach
        kombu's hub)."""
        if qos is not None and qos is getattr(self.consumer, "qos", None):
            qos.decrement_eventually()
        self.held.release(request)
        try:
            self.admit(request)
        except Exception as exc:  # noqa: BLE001 - this request alone fails
            self._last_resort(request.message, None, None, exc)
            return
        if self._idle:  # nothing else is arriving: no reason to wait for company
            self.flush()

    def on_drained(self) -> None:
        """The broker has handed over everything it had: serve what is buffered now."""
        self._idle = True
        if self.pending:
            self.flush()

    def admit(self, request: Pending) -> None:
        """Put a request into the buffer; flush when the batch is full, or arm the wait timer."""
        self.pending.append(request)
        if len(self.pending) >= self.policy.max_batch_size:
            self.flush()
        elif self._tref is None:
            self._tref = self.timer.call_after(self.policy.max_wait, self._on_timer)

    def _refuse(self, message: Any, task_id: str | None, headers: dict[str, Any], exc: Exception) -> None:
        content_type = getattr(message, "content_type", "?")
        reason = (
            exc
            if isinstance(exc, InputError)
            else InputError(
                f"cannot decode message (content type {content_type!r}): {type(exc).__name__}: {exc}; "
                "send JSON or msgpack (pickle is never accepted)"
            )
        )
        if task_id:
            log.warning("refusing message %s: %s", task_id, reason)
            # Only headers that passed their own check travel on into the result record and events.
            safe = {k: headers[k] for k in ("parent_id", "group") if usable_id(headers.get(k))}
            task = headers.get("task")
            request = Pending(
                id=task_id,
                name=task if isinstance(task, str) and len(task) <= 255 else "?",
                message=message,
                args=[],
                kwargs={},
                headers=safe,
                received=time.monotonic(),
                expires=None,
            )
            self._finish([Outcome(request, states.FAILURE, reason)])
        else:
            log.error("dead-lettering a message without a usable id (%s): %s", reason, saferepr(headers, 300))
            ack_all([message])

    def _on_refused(self, refused: list[tuple[str, str]]) -> None:
        """Store a FAILURE for the envelopes of this task the Redis pop script moved to a dead-letter list (kombu
        could not have restored them); they are already out of the queue and never delivered."""
        error = InputError(
            "the Redis envelope of this request cannot be restored by kombu (properties.delivery_info, headers or "
            "priority malformed); it was moved to the queue's dead-letter list"
        )
        now = time.monotonic()
        outcomes = [
            Outcome(Pending(task_id, task, None, [], {}, {}, now, None), states.FAILURE, error)
            for task_id, task in refused
            if task == self.task.name
        ]
        if outcomes:
            self.writer.write(outcomes)

    def _on_timer(self) -> None:
        """``max_wait_ms`` is up: flush. On RabbitMQ, not while deliveries the broker already sent are still being
        read and company joined since the last tick: the reader hands over one frame per loop callback, so the
        timer would cut a batch whose members are already on the socket; the idle signal flushes once it runs dry.
        Each extension takes a newly buffered request, so the wait stays bounded."""
        self._tref = None
        grew, self._joined = len(self.pending) > self._joined, len(self.pending)
        if self._pushed and grew and 0 < len(self.pending) < self.policy.max_batch_size:
            if kombu_amqp.delivering(self._connection):
                self._tref = self.timer.call_after(self.policy.max_wait, self._on_timer)
                return
        self.flush()

    # -- flush ----------------------------------------------------------------------------------------------------

    def flush(self) -> None:
        """Serve everything buffered now, or as soon as a batch in flight is done when ``pipeline_depth`` batches
        are. Never raises: a request's fault stays with that request."""
        if self._tref is not None:
            self._tref.cancel()
            self._tref = None
        self._joined = 0
        if not self.pending:
            return
        # Keep buffering (up to the prefetch window) until the compute thread is free, or, when the buffered requests
        # carry priorities or deadlines, until it has nothing queued: a batch formed later serves the urgent first.
        if self.pipeline.full or (self.pipeline.in_flight and (self._form_late() or self._short_on_amqp())):
            self._deferred = True
            return
        self._deferred = False
        batch, self.pending = self.pending, []
        try:
            self._flush(batch)
        except Exception:  # noqa: BLE001 - last resort; unanswered requests stay unacknowledged and come back
            log.exception("flush of %d requests failed unexpectedly", len(batch))

    def _flush(self, batch: list[Pending]) -> None:
        try:
            self.reporter.announce(batch)
        except Exception:  # noqa: BLE001 - events are for Flower; never worth a request
            log.exception("announcing a batch of %d failed", len(batch))
        batch = redelivery.skip_answered(self.writer, batch)
        if batch:
            self.pipeline.submit(self._job(batch), inline=self._adaptive and self._cheap(batch))

    def _job(self, batch: list[Pending]) -> Job:
        """Serve ``batch`` (in the compute thread): its outcomes, then each deferred request's, alone, once
        everything before it was stored and acknowledged on the event loop."""
        later: list[Any] = []
        try:
            outcomes, later = self._serve(batch)
        except Exception as exc:  # noqa: BLE001 - never lose a batch to a bug: fail each request with the reason
            log.exception("batch of %d failed unexpectedly", len(batch))
            outcomes = [Outcome(r, states.FAILURE, exc) for r in batch]
        yield outcomes, bool(later)
        for i, item in enumerate(later):
            try:
                outcomes = self._serve_later(item)
            except Exception as exc:  # noqa: BLE001
                request = item[-1][0] if isinstance(item, tuple) else None
                log.exception("a deferred request failed unexpectedly")
                outcomes = [Outcome(request, states.FAILURE, exc)] if request is not None else []
            yield outcomes, i < len(later) - 1

    def _on_free(self) -> None:
        """A batch in flight is done: the flush it held back goes now (on RabbitMQ, a short one only once the
        deliveries on the socket are read: the idle signal, a full batch or the wait timer flushes it then)."""
        if self._deferred and self.pending:
            if self._short_on_amqp() and kombu_amqp.delivering(self._connection):
                if self._tref is None:
                    self._tref = self.timer.call_after(self.policy.max_wait, self._on_timer)
                return
            self.flush()

    @staticmethod
    def _revoked_or_expired(req: Pending, now_utc: datetime) -> Outcome | None:
        """REVOKED for a request revoked (``celery control revoke``) or past its ``expires``, before any compute."""
        if req.id in worker_state.revoked:
            return Outcome(req, states.REVOKED, revoked_error("revoked"))
        if req.expires is not None and req.expires <= now_utc:
            return Outcome(req, states.REVOKED, revoked_error("expired"))
        return None

    def _store_started(self, requests: list[Pending]) -> None:
        """Store STARTED for ``requests`` (``AGENT_WORKERS_TRACK_STARTED``); informative, so a failure only logs."""
        if not self.track_started or not requests:
            return
        started = [Outcome(r, states.STARTED, {"pid": None, "hostname": self.hostname}) for r in requests]
        try:
            self.writer.write(started)
        except Exception:  # noqa: BLE001 - STARTED is informative; the final write decides the acks
            log.warning("storing STARTED for %d requests failed", len(started), exc_info=True)

    def _short_on_amqp(self) -> bool:
        """RabbitMQ: a batch short of ``max_batch_size`` waits for the batch in flight (the compute thread could not
        start it sooner). The socket runs dry whenever the prefetch window is full of unacknowledged deliveries, and
        again while the broker refills it after an ack, so neither the idle signal nor the held count says that no
        company is coming; the batch in flight, once acknowledged, frees the window (no deadlock)."""
        return self._pushed and len(self.pending) < self.policy.max_batch_size

    def _form_late(self) -> bool:
        """True when the next batch should be formed only once the compute thread is idle (priorities, deadlines)."""
        return False

    def _cheap(self, batch: list[Pending]) -> bool:
        """True when ``batch`` is predicted to compute in under ``INLINE_BELOW_S`` (the pipeline runs it inline)."""
        return False

    def _serve(self, batch: list[Pending]) -> tuple[list[Outcome], list[Any]]:
        """Serve a batch: the outcomes to store now, and items for :meth:`_serve_later` once those are acked."""
        raise NotImplementedError

    def _serve_later(self, item: Any) -> list[Outcome]:
        raise NotImplementedError


_live: dict[int, dict[str, Intake]] = {}


def register(app: Any, name: str, intake: Intake) -> Intake:
    """Make ``intake`` the one serving task ``name`` for ``app``'s consumer (a consumer restart builds new ones)."""
    old = _live.setdefault(id(app), {}).pop(name, None)
    if old is not None:
        old.close()
    _live[id(app)][name] = intake
    return intake


def live_intakes(app: Any) -> list[Intake]:
    """The intakes serving ``app``'s consumer now (the warm-shutdown step flushes them)."""
    return list(_live.get(id(app), {}).values())


def pipeline_depth(app: Any, setting: int, *, cpu: int = 1) -> int:
    """``AGENT_WORKERS_PIPELINE_DEPTH``, with 0 resolved by the worker's device: 2 on CUDA, ``cpu`` on CPU."""
    if setting:
        return setting
    engine = getattr(app, "engine", None)
    device = getattr(engine, "device", None)
    return 2 if getattr(device, "type", "cpu") == "cuda" else cpu
