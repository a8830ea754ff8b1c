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
from agent_workers.errors import AgentWorkersError, ConfigError, InputError, ModelError, StoreUnavailableError
from agent_workers.worker import metrics
from agent_workers.worker.inference import InferenceEngine
from agent_workers.worker.kombu_redis import ack_all
from agent_workers.worker.policy import BatchPolicy
from agent_workers.worker.requests import Pending, decode_body, parse_time, revoked_error
from agent_workers.worker.results import Outcome, ResultWriter, short_repr

log = logging.getLogger(__name__)

MAX_RETRIES = 3
MAX_DELIVERIES = 3  # a request that took its worker down this many times is failed as poison
DELIVERIES_TTL = 24 * 3600


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
        self.eventer = consumer.event_dispatcher
        if self.eventer is not None:
            # One publish per batch: the dispatcher sends a buffered group when it reaches this many events.
            self.eventer.buffer_limit = max(self.eventer.buffer_limit, 8 * policy.settings.max_batch_size)
        self.hostname = consumer.hostname
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
        """Celery strategy entry point: called in the event loop for every predict message."""
        headers = message.headers or {}
        task_id = headers.get("id") or (body or {}).get("id")
        now = time.monotonic()
        try:
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
            return
        if not task_id:
            log.error("dropping a predict message without a task id: %s", saferepr(headers, 200))
            ack_all([message])
            return
        redelivered = bool((message.delivery_info or {}).get("redelivered") or headers.get("redelivered"))
        request = Pending(
            id=task_id,
            name=headers.get("task", self.task.name),
            message=message,
            args=args,
            kwargs=kw,
            headers=headers,
            received=now,
            expires=parse_time(headers.get("expires")),
            redelivered=redelivered,
        )
        eta = parse_time(headers.get("eta"))
        if eta is not None:
            delay = (eta - datetime.now(UTC)).total_seconds()
            if delay > 0:  # eta/countdown: held (unacknowledged) on the event-loop timer, then admitted
                self.timer.call_after(delay, self.admit, (request,))
                return
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
        log.warning("refusing message %s: %s", task_id, reason)
        if task_id:
            request = Pending(
                id=task_id,
                name=headers.get("task", "?"),
                message=message,
                args=[],
                kwargs={},
                headers=headers,
                received=time.monotonic(),
                expires=None,
            )
            self._finish([Outcome(request, states.FAILURE, reason)])
        else:
            ack_all([message])

    def _on_timer(self) -> None:
        self._tref = None
        self.flush()

    # -- flush ----------------------------------------------------------------------------------------------------

    def flush(self) -> None:
        """Serve everything buffered now."""
        if self._tref is not None:
            self._tref.cancel()
            self._tref = None
        batch, self.pending = self.pending, []
        if not batch:
            return
        for req in batch:
            # Announced here rather than on arrival: events are buffered and published once per batch, not once
            # per message (the event dispatcher flushes on every event-loop tick).
            self._event(
                "task-received",
                req,
                name=req.name,
                args=short_repr(req.args),
                kwargs=short_repr(req.kwargs),
                retries=req.retries,
                expires=req.headers.get("expires"),
                root_id=req.headers.get("root_id"),
                parent_id=req.headers.get("parent_id"),
            )
        solo: list[tuple[str, int | None, tuple[Pending, Any]]] = []
        try:
            outcomes, solo = self._serve(batch)
        except Exception as exc:  # noqa: BLE001 - never lose a batch to a bug: fail each request with the reason
            log.exception("batch of %d failed unexpectedly", len(batch))
            outcomes = [Outcome(r, states.FAILURE, exc) for r in batch]
        self._finish(outcomes)
        for model, version, member in solo:
            self._finish(self._serve_suspect(model, version, member))

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
            except InputError as exc:
                outcomes.append(Outcome(req, states.FAILURE, exc))
                continue
            groups.setdefault((model, version), []).append((req, inputs))
        solo = self._redelivered(groups)
        if self.track_started:
            self.writer.write(
                [
                    Outcome(r, states.STARTED, {"pid": None, "hostname": self.hostname})
                    for group in groups.values()
                    for r, _ in group
                ]
            )
        for (model, version), members in groups.items():
            outcomes.extend(self._serve_group(model, version, members))
        return outcomes, solo

    @staticmethod
    def _redelivered(
        groups: dict[tuple[str, int | None], list[tuple[Pending, Any]]],
    ) -> list[tuple[str, int | None, tuple[Pending, Any]]]:
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

    def _serve_suspect(self, model: str, version: int | None, member: tuple[Pending, Any]) -> list[Outcome]:
        """Serve a redelivered request alone, after everything else in its flush was stored and acknowledged.

        A redelivery means the worker holding the message died (or lost its connection) before acking it. Served
        alone, a request that crashes the process takes only itself down; each solo attempt is counted in Redis
        first (the broker keeps no count: Redis none, RabbitMQ only a flag), and after ``MAX_DELIVERIES - 1``
        solo attempts the request fails as poison instead of looping.
        """
        req = member[0]
        store = self.app.store
        key = store.keys.deliveries(req.id)
        pipe = store.client.pipeline(transaction=False)
        pipe.incr(key)
        pipe.expire(key, DELIVERIES_TTL)
        attempt = int(pipe.execute()[0])
        if attempt >= MAX_DELIVERIES:
            log.error("request %s took its worker down %d times; failing it as poison", req.id, attempt)
            return [
                Outcome(
                    req,
                    states.FAILURE,
                    ModelError(
                        f"request was delivered {attempt + 1} times and its worker died each time before finishing it "
                        "(poison message); not retried"
                    ),
                )
            ]
        return self._serve_group(model, version, [member])

    def _serve_group(self, model: str, version: int | None, members: list[tuple[Pending, Any]]) -> list[Outcome]:
        try:
            loaded = self.engine.current(model) if version is None else self.engine.pinned(model, version)
        except StoreUnavailableError as exc:
            return [self._retry_or_fail(req, exc) for req, _ in members]
        except AgentWorkersError as exc:
            return [Outcome(req, states.FAILURE, exc) for req, _ in members]
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
                self._event("task-started", req)
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
        """A transient failure: re-publish the same task id with ``retries + 1`` (bounded), else fail it."""
        if req.retries >= MAX_RETRIES:
            return Outcome(req, states.FAILURE, exc)
        self.app.send_task(
            req.name,
            args=req.args,
            kwargs=req.kwargs,
            task_id=req.id,
            retries=req.retries + 1,
            countdown=0.5 * 2**req.retries,
            expires=req.headers.get("expires"),
        )
        return Outcome(req, states.RETRY, exc)

    def _finish(self, outcomes: list[Outcome]) -> None:
        """Store results in one round trip, then ack in bulk, then announce (results before acks: at-least-once)."""
        try:
            self.writer.write(outcomes)
        except Exception:  # noqa: BLE001 - results not stored: leave the messages unacked so they come back
            log.exception("storing %d results failed; their messages are not acknowledged", len(outcomes))
            return
        ack_all([o.request.message for o in outcomes])
        counts: dict[tuple[str, str], int] = {}
        for o in outcomes:
            model = o.request.kwargs.get("model") or (o.request.args[0] if o.request.args else "?")
            key = (str(model)[:64], o.state.lower())
            counts[key] = counts.get(key, 0) + 1
        for (model, outcome), n in counts.items():
            metrics.REQUESTS.labels(model, outcome).inc(n)
        for o in outcomes:
            if o.state == states.SUCCESS:
                self._event("task-succeeded", o.request, result=short_repr(o.result), runtime=o.runtime)
            elif o.state == states.FAILURE:
                self._event("task-failed", o.request, exception=saferepr(o.result, 500), traceback=None)
            elif o.state == states.REVOKED:
                self._event(
                    "task-revoked",
                    o.request,
                    terminated=False,
                    signum=None,
                    expired=isinstance(o.result, Exception) and "expired" in str(o.result),
                )
            elif o.state == states.RETRY:
                self._event("task-retried", o.request, exception=saferepr(o.result, 500), traceback=None)

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

    def _event(self, type_: str, req: Pending, **fields: Any) -> None:
        eventer = self.eventer
        if eventer is not None and eventer.enabled:
            # Task events are buffered by the dispatcher ('task' buffer group) and sent as one message per group.
            eventer.send(type_, uuid=req.id, **fields)


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
