"""The dynamic batcher: many single-example ``agent_workers.predict`` messages, few forward passes.

It replaces Celery's per-message strategy for the predict task (``Task.Strategy``), so it runs in the worker's event
loop, where messages arrive:

1. each message is decoded (JSON only) and buffered (with the Redis broker, many messages arrive per round trip:
   see kombu_redis.py);
2. the buffer is flushed when it holds ``max_batch_size`` requests or its oldest request has waited ``max_wait_ms``;
3. a flush announces the batch to Flower (``task-received``, one buffered event publish per batch), checks revoke
   and ``expires``, groups requests by model and pinned version, resolves ONE parameter version per group (a batch
   never mixes versions), validates every request on its own, and runs the valid ones in one forward pass
   (bisecting if the model raises); redelivered requests are served alone afterwards (poison isolation);
4. every request gets its own result: written for the whole batch in one pipelined Redis round trip, in the exact
   format Celery's Redis backend uses (``AsyncResult.get()`` works, including its pub/sub wake-up); then the
   messages are acknowledged in bulk and ``task-started`` / ``task-succeeded`` / ``task-failed`` events are sent.

Acks come after results (at-least-once). Unlike celery-batches, a failing request never leaves the others PENDING,
events make each request visible in Flower, and revoke/expires are honoured before compute.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import numpy as np
from celery import states
from celery.utils.saferepr import saferepr
from celery.worker import state as worker_state

from agent_workers.contract import bind_predict
from agent_workers.errors import AgentWorkersError, ConfigError, InputError, StoreUnavailableError
from agent_workers.worker import metrics, redelivery
from agent_workers.worker.held import HeldMessages
from agent_workers.worker.inference import InferenceEngine
from agent_workers.worker.kombu_redis import ack_all
from agent_workers.worker.policy import BatchPolicy
from agent_workers.worker.reporting import Reporter
from agent_workers.worker.requests import Pending, check_headers, decode_body, parse_time, revoked_error, usable_id
from agent_workers.worker.results import Outcome, ResultWriter

log = logging.getLogger(__name__)

MAX_RETRIES = 3


@dataclasses.dataclass(frozen=True)
class _ModelMetrics:
    """Labelled metric children of one model, looked up once (``labels()`` is costly per call)."""

    batch_size: Any
    compute: Any
    queue_wait: Any
    version: Any


class Batcher:
    """Buffers predict requests in a worker's event loop and serves them in batches.

    One batcher exists per consumer connection; Celery builds a new one when the consumer restarts after a broker
    reconnect, and the old one's buffered messages (on a dead channel) are simply redelivered by the broker.
    """

    def __init__(self, *, task: Any, app: Any, consumer: Any, engine: InferenceEngine, policy: BatchPolicy) -> None:
        self.task = task
        self.app = app
        self.engine = engine
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
        self._metric_cache: dict[str, _ModelMetrics] = {}
        self._tref: Any = None
        self.max_message_bytes = app.settings.max_message_bytes
        self.track_started = app.settings.track_started

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
        """Celery strategy entry point: called in the event loop for every predict message.

        Nothing a message contains may raise out of here: Celery's consumer treats an exception from a strategy
        as unrecoverable and stops the worker, and the redelivered message would stop the next one.
        """
        try:
            request = self._receive(message, body)
        except Exception:  # noqa: BLE001 - last resort: drop this message alone, loudly
            log.exception("dropping a predict message that cannot be handled: %s", saferepr(message.headers, 300))
            ack_all([message])
            return
        if request is not None:
            self._hold_or_admit(request)

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
            redelivered=bool((message.delivery_info or {}).get("redelivered") or headers.get("redelivered")),
        )

    def _hold_or_admit(self, request: Pending) -> None:
        eta = parse_time(request.headers.get("eta"))
        if eta is not None:
            delay = (eta - datetime.now(UTC)).total_seconds()
            if delay > 0:
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

    def _release(self, request: Pending, qos: Any) -> None:
        if qos is not None and qos is getattr(self.consumer, "qos", None):
            qos.decrement_eventually()
        self.held.release(request)
        self.admit(request)

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
                "send JSON (pickle is never accepted)"
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
            log.error("dead-lettering a predict message without a usable id (%s): %s", reason, saferepr(headers, 300))
            ack_all([message])

    def _on_timer(self) -> None:
        self._tref = None
        self.flush()

    # -- flush ----------------------------------------------------------------------------------------------------

    def flush(self) -> None:
        """Serve everything buffered now. Never raises: a request's fault stays with that request."""
        if self._tref is not None:
            self._tref.cancel()
            self._tref = None
        batch, self.pending = self.pending, []
        if not batch:
            return
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
        solo: list[tuple[str, int | None, tuple[Pending, Any]]] = []
        try:
            outcomes, solo = self._serve(batch)
        except Exception as exc:  # noqa: BLE001 - never lose a batch to a bug: fail each request with the reason
            log.exception("batch of %d failed unexpectedly", len(batch))
            outcomes = [Outcome(r, states.FAILURE, exc) for r in batch]
        self._finish(outcomes)
        for model, version, member in solo:
            try:
                outcomes = self._serve_suspect(model, version, member)
            except Exception as exc:  # noqa: BLE001
                log.exception("redelivered request %s failed unexpectedly", member[0].id)
                outcomes = [Outcome(member[0], states.FAILURE, exc)]
            self._finish(outcomes)

    def _serve(self, batch: list[Pending]) -> tuple[list[Outcome], list[tuple[str, int | None, tuple[Pending, Any]]]]:
        outcomes: list[Outcome] = []
        groups: dict[tuple[str, int | None], list[tuple[Pending, Any]]] = {}
        now_utc = datetime.now(UTC)
        revoked = worker_state.revoked
        for req in batch:
            if req.id in revoked:
                outcomes.append(Outcome(req, states.REVOKED, revoked_error("revoked")))
                continue
            if req.expires is not None and req.expires <= now_utc:
                outcomes.append(Outcome(req, states.REVOKED, revoked_error("expired")))
                continue
            try:
                model, inputs, version = bind_predict(req.args, req.kwargs)
                groups.setdefault((model, version), []).append((req, inputs))
            except Exception as exc:  # noqa: BLE001 - InputError, or arguments no one expected: this request alone
                outcomes.append(Outcome(req, states.FAILURE, exc))
        solo = redelivery.split_redelivered(groups)
        if self.track_started:
            started = [
                Outcome(r, states.STARTED, {"pid": None, "hostname": self.hostname})
                for group in groups.values()
                for r, _ in group
            ]
            try:
                self.writer.write(started)
            except Exception:  # noqa: BLE001 - STARTED is informative; the final write decides the acks
                log.warning("storing STARTED for %d requests failed", len(started), exc_info=True)
        for (model, version), members in groups.items():
            try:
                outcomes.extend(self._serve_group(model, version, members))
            except Exception as exc:  # noqa: BLE001 - a fault in one (model, version) group fails that group only
                log.exception("serving %d requests of %r failed unexpectedly", len(members), model)
                outcomes.extend(Outcome(req, states.FAILURE, exc) for req, _ in members)
        return outcomes, solo

    def _serve_suspect(self, model: str, version: int | None, member: tuple[Pending, Any]) -> list[Outcome]:
        """Serve a redelivered request alone, after everything else in its flush was stored and acknowledged.

        A redelivery means the worker holding the message died (or lost its connection) before acking it. Served
        alone, a request that crashes the process takes only itself down; each solo attempt is counted in Redis
        first (the broker keeps no count: Redis none, RabbitMQ only a flag), and after ``MAX_DELIVERIES - 1``
        solo attempts the request fails as poison instead of looping.
        """
        req = member[0]
        try:
            attempt = redelivery.count_attempt(self.app.store, req.id)
        except Exception as exc:  # noqa: BLE001 - a parameter-Redis blip must not stop a RabbitMQ worker
            log.warning("cannot count the deliveries of %s: %s", req.id, exc)
            return [self._retry_or_fail(req, StoreUnavailableError(f"parameter store unavailable: {exc}"))]
        if attempt >= redelivery.MAX_DELIVERIES:
            log.error("request %s took its worker down %d times; failing it as poison", req.id, attempt)
            return [Outcome(req, states.FAILURE, redelivery.poison_error(attempt))]
        return self._serve_group(model, version, [member])

    def _serve_group(self, model: str, version: int | None, members: list[tuple[Pending, Any]]) -> list[Outcome]:
        try:
            loaded = self.engine.current(model) if version is None else self.engine.pinned(model, version)
        except StoreUnavailableError as exc:
            return [self._retry_or_fail(req, exc) for req, _ in members]
        except AgentWorkersError as exc:
            return [Outcome(req, states.FAILURE, exc) for req, _ in members]
        self.labels.known(model)
        outcomes: list[Outcome] = []
        valid: list[tuple[Pending, Any]] = []
        for req, inputs in members:
            try:
                valid.append((req, self.engine.validate(loaded, inputs)))
            except InputError as exc:
                outcomes.append(Outcome(req, states.FAILURE, exc))
        size = max(1, self.policy.max_batch_size)
        for start in range(0, len(valid), size):
            chunk = valid[start : start + size]
            started = time.monotonic()
            for req, _ in chunk:  # Flower shows received / started / succeeded times per request
                self.reporter.event("task-started", req)
            results = self.engine.run_batch_arrays(loaded, [a for _, a in chunk])
            elapsed = time.monotonic() - started
            self.policy.observe(len(chunk), elapsed)
            m = self._metrics(model)
            m.batch_size.observe(len(chunk))
            m.compute.observe(elapsed)
            m.version.set(loaded.version)
            for (req, _), value in zip(chunk, results, strict=True):
                m.queue_wait.observe(started - req.received)
                if isinstance(value, Exception):
                    outcomes.append(Outcome(req, states.FAILURE, value, elapsed))
                else:
                    outcomes.append(
                        Outcome(
                            req,
                            states.SUCCESS,
                            {
                                "model": model,
                                "version": loaded.version,
                                # float64 prints exactly as json prints float(float32):
                                # the same digits as every other path (predict_many, eager)
                                "outputs": value.astype(np.float64),
                            },
                            elapsed,
                        )
                    )
        return outcomes

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
            )
        except Exception:  # noqa: BLE001 - not acknowledged: the broker redelivers the original instead
            log.warning("publishing the retry of %s failed; its message is not acknowledged", req.id, exc_info=True)
            return False
        return True

    def _finish(self, outcomes: list[Outcome]) -> None:
        """Store results in one round trip, then publish retries, then ack in bulk, then announce (results before
        acks: at-least-once; a result that was already final is kept, and the message acknowledged)."""
        if not outcomes:
            return
        try:
            stored = self.writer.write(outcomes)
        except Exception:  # noqa: BLE001 - results not stored: leave the messages unacked so they come back
            log.exception("storing %d results failed; their messages are not acknowledged", len(outcomes))
            return
        done = [
            o
            for o, ok in zip(outcomes, stored, strict=True)
            if o.state != states.RETRY or not ok or self._publish_retry(o)
        ]
        ack_all([o.request.message for o in done])
        try:
            self.reporter.report(done)
        except Exception:  # noqa: BLE001 - metrics and events never cost a request its answer
            log.exception("reporting %d outcomes failed", len(done))

    def _metrics(self, model: str) -> _ModelMetrics:
        hit = self._metric_cache.get(model)
        if hit is None:
            hit = _ModelMetrics(
                metrics.BATCH_SIZE.labels(model),
                metrics.COMPUTE.labels(model),
                metrics.QUEUE_WAIT.labels(model),
                metrics.PARAM_VERSION.labels(model),
            )
            self._metric_cache[model] = hit
        return hit


_live: dict[int, Batcher] = {}


def batch_strategy(task: Any, app: Any, consumer: Any, **kwargs: Any) -> Callable[..., None]:
    """The ``Task.Strategy`` of ``agent_workers.predict``: route its messages into a :class:`Batcher`."""
    settings = app.settings
    prefetch = consumer.initial_prefetch_count
    # Every worker registers predict; only one that consumes the inference queue (-Q) ever batches, so a trainer
    # (-Q training, prefetch 1) must still start.
    serves_inference = settings.inference_queue in (app.amqp.queues.consume_from or {})
    if serves_inference and prefetch and prefetch < settings.batch.max_batch_size:
        raise ConfigError(
            f"this worker prefetches {prefetch} messages but AGENT_WORKERS_MAX_BATCH_SIZE="
            f"{settings.batch.max_batch_size}, so a batch can never fill; start it with "
            f"--prefetch-multiplier {2 * settings.batch.max_batch_size} (agent-workers worker does this)"
        )
    old = _live.pop(id(app), None)
    if old is not None and old._tref is not None:
        old._tref.cancel()
    batcher = Batcher(task=task, app=app, consumer=consumer, engine=app.engine, policy=BatchPolicy(settings.batch))
    _live[id(app)] = batcher
    return batcher.on_message


def live_batcher(app: Any) -> Batcher | None:
    """The batcher serving ``app``'s consumer now, if any (the warm-shutdown step flushes it)."""
    return _live.get(id(app))
