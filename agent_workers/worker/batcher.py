"""The dynamic batcher: many single-example ``agent_workers.predict`` messages, few forward passes.

It replaces Celery's per-message strategy for the predict task (``Task.Strategy``), so it runs in the worker's event
loop, where messages arrive. The receiving half (check, decode, hold, buffer, store, ack, announce) is
:class:`~agent_workers.worker.intake.Intake`; this module serves a batch:

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

import logging
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from celery import states

from agent_workers import metrics
from agent_workers.errors import AgentWorkersError, ConfigError, InputError, ModelError, StoreUnavailableError
from agent_workers.worker import answers, deadlines, forming, padding, redelivery
from agent_workers.worker.cache import ResultCache, digest, distinct
from agent_workers.worker.decoding import Decoder, example_of
from agent_workers.worker.inference import InferenceEngine
from agent_workers.worker.intake import INLINE_BELOW_S, PROBE_EVERY, Intake, register
from agent_workers.worker.policy import BatchPolicy
from agent_workers.worker.preprocessing import Preprocessing
from agent_workers.worker.requests import Pending
from agent_workers.worker.results import Outcome
from agent_workers.worker.version_waits import VersionWaits

log = logging.getLogger(__name__)

#: at most this many cost-probe ids are remembered (a probe shed before compute leaves its id behind)
PROBES_KEPT = 1024


class Batcher(Intake):
    """Buffers predict requests in a worker's event loop and serves them in batches: one forward pass per
    (model, version) group, redelivered requests alone afterwards (poison isolation).

    One batcher exists per consumer connection; Celery builds a new one when the consumer restarts after a broker
    reconnect, and the old one's buffered messages (on a dead channel) are simply redelivered by the broker.
    """

    #: some buffered request has a deadline or a priority: order the next flush (see deadlines.py)
    _ordered = False
    #: a forward pass releases the GIL: with torch's threads below the cores, messaging overlaps it on CPU too
    cpu_pipeline_depth = 2

    def __init__(self, *, task: Any, app: Any, consumer: Any, engine: InferenceEngine, policy: BatchPolicy) -> None:
        super().__init__(task=task, app=app, consumer=consumer, policy=policy)
        self.engine = engine
        settings = app.settings
        self.broker_is_redis = settings.broker_is_redis
        self._pushed = not settings.broker_is_redis  # drain batches stay whole on RabbitMQ (see Intake._on_timer)
        self.max_queue_size = settings.max_queue_size
        self.min_version_wait = settings.min_version_wait_ms / 1000.0
        self.costs = deadlines.CostModels()
        self.results = ResultCache(settings.result_cache_size)
        self.decoder = Decoder(engine, keyed=self.results.enabled)
        self._late: list[Outcome] = []  # revoked on arrival, answered at the end of the burst (_revoke_soon)
        self._on_loop = deadlines.CostModels()  # forward passes timed on the loop, all models as one
        self._since_probe = 0
        self._padded: set[str] = set()  # models with a variable-length input: their batches cost by tokens, not size
        self._probes: set[str] = set()  # ids admitted as cost probes despite their prediction (see admit)
        self.versions = VersionWaits(
            timer=self.timer,
            head=lambda model: int(engine.store.head(model).version),
            admit=self._version_reached,
            fail=self._version_not_reached,
            wait_s=self.min_version_wait,
        )
        self.preprocessing = Preprocessing(
            engine=engine,
            threads=settings.preprocess_threads,
            hub=getattr(consumer, "hub", None),
            admit=self.admit,
            fail=lambda request, exc: self._finish([Outcome(request, states.FAILURE, exc)]),
            # nothing more arriving and nothing left decoding: no reason to wait for company (one flush, not one
            # per request the pool hands back)
            settled=lambda: self.flush() if self._idle and not self.preprocessing.in_flight else None,
        )

    def admit(self, request: Pending) -> None:
        """Preprocess raw inputs off the loop first (worker/preprocessing.py); stamp the request's deadline and rank
        (only when it has one), cap the buffer, then buffer it."""
        if self.preprocessing.wants(request):
            self.preprocessing.submit(request)
            return
        if (
            request.expires is not None
            or len(request.args) > 4
            or "deadline_ms" in request.kwargs
            or (getattr(request.message, "properties", None) or {}).get("priority")
        ) and deadlines.stamp(request, broker_is_redis=self.broker_is_redis):
            self._ordered = True
            cost = self.costs.ahead(request, self.pending)
            now = time.time()
            late = deadlines.too_late(request, now, cost)
            if late is not None:
                # Revoked on a prediction alone (the deadline is still ahead): now and then compute one anyway, so
                # one slow batch cannot make the model look too slow for ever.
                if (
                    request.deadline is not None
                    and request.deadline > now
                    and self.costs.probe(deadlines.model_of(request))
                ):
                    if len(self._probes) > PROBES_KEPT:  # ids of probes shed before compute: never served
                        self._probes.clear()
                    self._probes.add(request.id)
                else:
                    self._revoke_soon(late)
                    return
        if self.max_queue_size and len(self.pending) + len(self.held) + len(self.versions) >= self.max_queue_size:
            self.pending, outcomes, admitted = deadlines.shed(self.pending, request, self.max_queue_size)
            for o in outcomes:
                metrics.REVOKED.labels("overload" if "overloaded" in str(o.result) else "deadline").inc()
            self._finish(outcomes)
            if not admitted:
                return
        super().admit(request)

    def _refuse_hold(self, request: Pending, delay: float) -> Outcome | None:
        """Held requests count against ``AGENT_WORKERS_MAX_QUEUE_SIZE`` too: each widens the prefetch window, so
        uncounted they would grow the worker without bound. Past the cap a new held request is revoked."""
        refused = super()._refuse_hold(request, delay)
        if refused is None and self.max_queue_size and len(self.pending) + len(self.held) >= self.max_queue_size:
            metrics.REVOKED.labels("overload").inc()
            refused = deadlines.revoke(
                request,
                f"overloaded: this worker holds {self.max_queue_size} requests (AGENT_WORKERS_MAX_QUEUE_SIZE); "
                "no room to hold one more for its eta",
            )
        return refused

    def _revoke_soon(self, outcome: Outcome) -> None:
        """Answer a request revoked on arrival together with the others revoked in the same burst of deliveries:
        one result write and one bulk ack for all of them (under overload most arrivals are revoked, and answering
        each alone would cost the intake more than they take to arrive)."""
        metrics.REVOKED.labels("deadline").inc()
        self._late.append(outcome)
        if len(self._late) >= self.policy.max_batch_size:
            self._finish_late()
        elif len(self._late) == 1:
            hub = getattr(self.consumer, "hub", None)
            if hub is None:
                self._finish_late()
            else:
                hub.call_soon(self._finish_late)

    def drain(self) -> None:
        self.preprocessing.drain()
        self._finish_late()
        super().drain()

    def _finish_late(self) -> None:
        late, self._late = self._late, []
        if late:
            self._finish(late)

    def _cheap(self, batch: list[Pending]) -> bool:
        """Whether to compute ``batch`` on the loop: from forward passes timed on the loop alone (a forward pass in
        the compute thread waits for the GIL behind the busy loop, so its time says nothing about its cost); with
        none timed yet, and every ``PROBE_EVERY`` batches otherwise, it is computed on the loop to find out."""
        if self._padded and any(deadlines.model_of(r) in self._padded for r in batch):
            return False  # one long request makes a small batch slow: never block the loop on a guess by size
        if self._on_loop.predicted("", len(batch)) < INLINE_BELOW_S:  # 0 until a second pass was timed
            return True
        self._since_probe += 1
        if self._since_probe >= PROBE_EVERY:
            self._since_probe = 0
            return True
        return False

    def _form_late(self) -> bool:
        return self._ordered

    def _flush(self, batch: list[Pending]) -> None:
        if self._ordered:  # on the event loop, where the flag is set: the next request's stamp cannot be missed
            self._ordered = False
            batch = deadlines.order(batch)
        if self.pipeline.in_flight and self.pipeline.depth > 1:  # it waits for the compute thread: decode meanwhile
            decoding = self.decoder.submit(batch)
            for req in batch:
                req.decoding = decoding
        super()._flush(batch)

    def oldest_age(self) -> float:
        """Seconds the oldest buffered request has waited in this worker (0 when none): a scrape-time gauge."""
        pending = self.pending
        return time.monotonic() - min(r.received for r in pending) if pending else 0.0

    def _serve_later(self, item: Any) -> list[Outcome]:
        return self._serve_suspect(*item)

    def _serve(self, batch: list[Pending]) -> tuple[list[Outcome], list[tuple[str, int | None, tuple[Pending, Any]]]]:
        outcomes: list[Outcome] = []
        groups: dict[tuple[str, int | None], list[tuple[Pending, Any]]] = {}
        heads: dict[str, Any] = {}
        if batch and batch[0].decoding is not None:
            heads = batch[0].decoding.result()  # decoded beside the batch before; never raises (Decoder._decode)
        now_utc = datetime.now(UTC)
        for req in batch:
            dropped = self._revoked_or_expired(req, now_utc)
            if dropped is not None:
                outcomes.append(dropped)
                continue
            try:
                call = req.predict_call()
                req.min_version = call.min_version
                # a preprocessed request is served by the version whose artifacts made its tensors
                version = call.version if req.prepared is None or req.prepared.version is None else req.prepared.version
                groups.setdefault((call.model, version), []).append((req, call.inputs))
            except Exception as exc:  # noqa: BLE001 - InputError, or arguments no one expected: this request alone
                outcomes.append(Outcome(req, states.FAILURE, exc))
        solo = redelivery.split_redelivered(groups)
        self._store_started([r for group in groups.values() for r, _ in group])
        for (model, version), members in groups.items():
            try:
                outcomes.extend(self._serve_group(model, version, members, heads.get(model)))
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

    def _serve_group(
        self, model: str, version: int | None, members: list[tuple[Pending, Any]], head: Any = None
    ) -> list[Outcome]:
        """Serve one (model, version) group; ``head``: the newest version, read for this batch by its decode."""
        try:
            if version is not None:
                loaded = self.engine.pinned(model, version)
            else:
                loaded = head if head is not None else self.engine.current(model)
        except StoreUnavailableError as exc:
            return [self._retry_or_fail(req, exc) for req, _ in members]
        except AgentWorkersError as exc:
            return [Outcome(req, states.FAILURE, exc) for req, _ in members]
        self.labels.known(model)
        outcomes: list[Outcome] = []
        if any(req.min_version is not None and req.min_version > loaded.version for req, _ in members):
            members = self._behind(model, loaded.version, members, outcomes)
        valid: list[tuple[Pending, Any]] = []
        for req, inputs in members:
            try:
                valid.append((req, example_of(self.engine, loaded, req, inputs)))
            except (InputError, ModelError) as exc:
                outcomes.append(Outcome(req, states.FAILURE, exc))
        size = max(1, self.policy.max_batch_size)
        if any(req.deadline is not None for req, _ in valid):
            probing = [req.id for req, _ in valid if req.id in self._probes]
            cost = 0.0 if probing else self.costs.predicted(model, min(size, len(valid)))
            self._probes.difference_update(probing)
            valid, late = deadlines.drop_late(valid, chunk=size, cost=cost)
            metrics.REVOKED.labels("deadline").inc(len(late))
            outcomes.extend(late)
        cache = self.results
        if cache.enabled:
            valid = self._from_cache(model, loaded, valid, outcomes)
        rows = distinct(valid, keyed=cache.enabled)
        m = metrics.of_model(model)
        if len(rows) < len(valid):
            metrics.DEDUPLICATED.labels(model).inc(len(valid) - len(rows))
        batching = self.policy.settings
        spec = padding.length_input(loaded.spec.signature)  # None: fixed shapes, sliced by size alone as ever
        if spec is not None:
            self._padded.add(model)
        chunks = forming.plan(
            rows,
            max_batch_size=size,
            length=None if spec is None else (lambda row: padding.tokens(spec, row.array)),
            max_tokens=batching.max_batch_tokens,
            by_length=batching.length_batching,
        )
        for chunk in chunks:
            started = time.monotonic()
            for row in chunk:  # Flower shows received / started / succeeded times per request
                for req in row.requests:
                    self.reporter.event("task-started", req)
            results = self.engine.run_batch_arrays(loaded, [row.array for row in chunk])
            elapsed = time.monotonic() - started
            if spec is None and not self.pipeline.in_compute_thread():
                self._on_loop.observe("", len(chunk), elapsed)
            self.policy.observe(len(chunk), elapsed)
            self.costs.observe(model, len(chunk), elapsed)
            answered = sum(len(row.requests) for row in chunk)
            m.batch_size.observe(len(chunk))
            m.compute.observe(elapsed)
            m.fill.observe(len(chunk) / size)
            m.per_request.observe(elapsed / answered)
            m.version.set(loaded.version)
            usage = [None] * len(chunk)
            if spec is not None:  # a padded batch: its tokens, padding, shares (contract 1.3's ``batch``)
                usage = forming.usage(model, [padding.sizes(spec, row.array) for row in chunk], elapsed)
            pairs, used_by = [], []
            for row, value, used in zip(chunk, results, usage, strict=True):
                if cache.enabled:
                    cache.put((model, loaded.epoch, loaded.version, row.key), value)
                for req in row.requests:
                    m.queue_wait.observe(started - req.received)
                    pairs.append((req, value))
                    used_by.append(used)
            outcomes.extend(answers.outcomes(loaded, pairs, elapsed, used_by))
        return outcomes

    def _from_cache(
        self, model: str, loaded: Any, valid: list[tuple[Pending, Any]], outcomes: list[Outcome]
    ) -> list[tuple[Pending, Any]]:
        """Answer the requests whose (model, incarnation, resolved version, input) is cached; return the rest."""
        misses: list[tuple[Pending, Any]] = []
        hits = 0
        for req, array in valid:
            value = self.results.get((model, loaded.epoch, loaded.version, digest(array)))
            if value is None:
                misses.append((req, array))
            else:
                hits += 1
                outcomes.extend(answers.outcomes(loaded, [(req, value)], 0.0))
        if hits:
            metrics.CACHE_LOOKUPS.labels(model, "hit").inc(hits)
        if misses:
            metrics.CACHE_LOOKUPS.labels(model, "miss").inc(len(misses))
        return misses

    def _behind(
        self, model: str, version: int, members: list[tuple[Pending, Any]], outcomes: list[Outcome]
    ) -> list[tuple[Pending, Any]]:
        """Requests whose ``min_version`` the store has not reached wait (unacknowledged, on the event loop: see
        version_waits.py) up to ``AGENT_WORKERS_MIN_VERSION_WAIT_MS``, then fail; the others are served now."""
        now = time.monotonic()
        ready: list[tuple[Pending, Any]] = []
        waiting: list[Pending] = []
        for member in members:
            req = member[0]
            if req.min_version is None or req.min_version <= version:
                ready.append(member)
            elif req.behind_since is not None and now - req.behind_since >= self.min_version_wait:
                outcomes.append(Outcome(req, states.FAILURE, self._not_reached(model, version, req)))
            else:
                waiting.append(req)
        if waiting:  # kombu's timer belongs to the loop: never touched from the compute thread
            self._call_on_loop(self.versions.add, model, waiting)
        return ready

    def _not_reached(self, model: str, version: int | None, req: Pending) -> ModelError:
        at = f"is at version {version}" if version is not None else "has no readable head"
        return ModelError(
            f"model {model!r} {at}; min_version {req.min_version} was not reached within "
            f"{self.min_version_wait:g} s (AGENT_WORKERS_MIN_VERSION_WAIT_MS)"
        )

    def _version_not_reached(self, model: str, version: int | None, requests: list[Pending]) -> None:
        self._finish([Outcome(r, states.FAILURE, self._not_reached(model, version, r)) for r in requests])

    def _version_reached(self, request: Pending) -> None:
        self.admit(request)
        if self._idle:  # nothing else is arriving: no reason to wait for company
            self.flush()

    def _call_on_loop(self, fn: Callable[..., Any], *args: Any) -> None:
        """Call ``fn(*args)`` on the event loop: now when already there, else through the hub's thread-safe
        ``call_soon``."""
        hub = getattr(self.consumer, "hub", None)
        if hub is not None and self.pipeline.in_compute_thread():
            hub.call_soon(fn, *args)
        else:
            fn(*args)

    def close(self) -> None:
        super().close()
        self.versions.close()
        self.preprocessing.close()
        self.decoder.close()


def check_prefetch(app: Any, prefetch: int | None) -> None:
    """Refuse a worker of the inference queue whose prefetch (messages) cannot hold one batch.

    Raises:
        ConfigError: naming the ``--prefetch-multiplier`` to use.
    """
    settings = app.settings
    # Every worker registers predict; only one that consumes the inference queue (-Q) ever batches, so a trainer
    # (-Q training, prefetch 1) must still start.
    serves_inference = settings.inference_queue in (app.amqp.queues.consume_from or {})
    if serves_inference and prefetch and prefetch < settings.batch.max_batch_size:
        raise ConfigError(
            f"this worker prefetches {prefetch} messages but AGENT_WORKERS_MAX_BATCH_SIZE="
            f"{settings.batch.max_batch_size}, so a batch can never fill; start it with "
            f"--prefetch-multiplier {2 * settings.batch.max_batch_size} (agent-workers worker does this)"
        )


def batch_strategy(task: Any, app: Any, consumer: Any, **kwargs: Any) -> Callable[..., None]:
    """The ``Task.Strategy`` of ``agent_workers.predict``: route its messages into a :class:`Batcher`."""
    settings = app.settings
    check_prefetch(app, consumer.initial_prefetch_count)  # already refused at start-up (StartupChecks), in one line
    batcher = Batcher(task=task, app=app, consumer=consumer, engine=app.engine, policy=BatchPolicy(settings.batch))
    # Read at scrape time: nothing on the hot path.
    metrics.OLDEST_REQUEST_AGE.labels(settings.inference_queue).set_function(batcher.oldest_age)
    engine = app.engine
    metrics.MODEL_CACHE_BYTES.labels("engine").set_function(lambda: engine.nbytes)
    metrics.MODEL_CACHE_BYTES.labels("store").set_function(lambda: engine.store.cache_bytes)
    return register(app, task.name, batcher).on_message
