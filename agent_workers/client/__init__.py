"""What a producer calls: inference and training jobs by task name, results from the Redis result backend.

    from agent_workers.client import Client
    client = Client.from_env()
    client.predict("linear", [0.1] * 10)                 # {'model': 'linear', 'version': 3, 'outputs': [0.09]}
    client.predict_bulk("linear", rows)                  # one result per row, in order
    await client.predict_async("linear", [0.1] * 10)
    client.upload_dataset("houses", x, y)                # then fit/train on it by name
    client.fit("linear", "houses", epochs=10, on_progress=print)

Predictions take a cheap path: the client builds the Celery protocol-v2 message itself (exactly the envelope
kombu puts on the wire, see :mod:`agent_workers.wire`) and publishes it without ``apply_async``'s routing, signals
and repr work; a bulk of them goes out in one pipelined Redis round trip (or one confirmed burst on one AMQP
channel). Results are read straight from the Redis result backend (:mod:`agent_workers.client.results`): one pub/sub
subscription for a whole bulk plus one MGET for those already stored. ``agent-workers bench-producer`` measures the
producer CPU this saves. Every call has one deadline, enforced on every socket (:mod:`agent_workers.client.deadline`),
and a publish that fails says exactly which rows went out (:class:`PublishError`; the guarantees are in
docs/tasks.md). Training jobs are in :mod:`agent_workers.client.training`.

A producer that does not want this package sends the same messages with any Celery client:
``send_task("agent_workers.predict", args=[model, inputs], queue="inference")`` (the contract is docs/tasks.md).
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Callable, Iterable, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import urlparse

from celery import Celery
from celery.result import AsyncResult

from agent_workers.client.deadline import DEFAULT_TIMEOUT, Deadline
from agent_workers.client.failures import error_from, outcome, unwrap_celery
from agent_workers.client.messages import kwargs_parts, plain, predict_parts, producer_app
from agent_workers.client.publisher import Publisher
from agent_workers.client.results import REDIS_BACKEND_SCHEMES, ResultReader
from agent_workers.client.training import Training
from agent_workers.config import Settings
from agent_workers.contract import FIT, PREDICT, PREDICT_MANY, TRAIN_STEP
from agent_workers.errors import PublishError, ResultTimeout
from agent_workers.training.datasets import DatasetStore
from agent_workers.wire import Envelope

__all__ = ["DEFAULT_TIMEOUT", "Client", "PublishError", "ResultTimeout", "producer_app"]


class Client(Training):
    """Send inference and training jobs and wait for their results.

    Args:
        settings: broker, backend and queue names (``Settings.from_env()`` when omitted).
        app: an existing Celery app to send training jobs with, instead of a new producer app.

    Every ``wait``-ing method raises our typed errors for a task that failed on our side (:class:`InputError`,
    :class:`ModelError`, :class:`StoreError` and its subclasses), Celery's exception otherwise (e.g.
    ``TaskRevokedError``), and :class:`ResultTimeout` (also ``celery.exceptions.TimeoutError``; it carries the task
    ids) when no result came within ``timeout`` seconds. ``timeout`` is one deadline for the whole call: publish,
    confirm and wait all fit in it, whatever the network does. A publish that fails raises :class:`PublishError`,
    which says exactly which rows were queued, which were not and which are unknown (docs/tasks.md).
    """

    def __init__(self, settings: Settings | None = None, *, app: Celery | None = None) -> None:
        self.settings = settings or Settings.from_env()
        self.app = app or producer_app(self.settings)
        self.id = str(uuid.uuid4())
        self._datasets: DatasetStore | None = None
        inference, training = self.settings.inference_queue, self.settings.training_queue
        self._predict = Envelope(task=PREDICT, queue=inference, reply_to=self.id)
        self._envelopes = {
            task: Envelope(task=task, queue=queue, reply_to=self.id)
            for task, queue in ((PREDICT_MANY, inference), (TRAIN_STEP, training), (FIT, training))
        }
        self._publisher = Publisher(self.app, self.settings)
        self._results = (
            ResultReader(self.app, self.settings.result_backend, sentinel_master=self.settings.sentinel_master)
            if urlparse(self.settings.result_backend).scheme in REDIS_BACKEND_SCHEMES
            else None
        )

    @classmethod
    def from_env(cls) -> Client:
        return cls(Settings.from_env())

    def close(self) -> None:
        """Release the broker and backend connections."""
        self._publisher.close()
        if self._results is not None:
            self._results.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- predict --------------------------------------------------------------------------------------------------

    def send_predict(
        self,
        model: str,
        inputs: Any,
        *,
        version: int | None = None,
        expires: float | None = None,
        timeout: float = DEFAULT_TIMEOUT,
        options: dict[str, Any] | None = None,
    ) -> AsyncResult:
        """Enqueue one prediction (the cheap path: no ``apply_async``); returns its result handle at once."""
        task_id = self._send_rows(model, [inputs], version, expires, Deadline(timeout), options)[0]
        return AsyncResult(task_id, app=self.app)

    def send_predict_bulk(
        self,
        model: str,
        rows: Iterable[Sequence[float]],
        *,
        version: int | None = None,
        expires: float | None = None,
        timeout: float = DEFAULT_TIMEOUT,
    ) -> list[str]:
        """Enqueue one ``agent_workers.predict`` message per row in one round trip; returns their task ids.

        Args:
            version: pin a parameter version (default: the newest when the request is served).
            expires: seconds from now after which workers drop a request unserved (state REVOKED).
            timeout: seconds the publish (and RabbitMQ's confirms) may take.
        Raises:
            PublishError: not every row is known queued; ``queued``, ``not_sent`` and ``unknown`` say which rows.
        """
        return self._send_rows(model, rows, version, expires, Deadline(timeout))

    def _send_rows(
        self,
        model: str,
        rows: Iterable[Sequence[float]],
        version: int | None,
        expires: float | None,
        dl: Deadline,
        options: dict[str, Any] | None = None,
    ) -> list[str]:
        model_json = json.dumps(model)
        items = []
        for row in rows:
            body, kwrepr = predict_parts(model_json, model, row, version, options)
            items.append((str(uuid.uuid4()), body, kwrepr))
        self._publisher.publish(self._predict, items, _expires_at(expires), dl)
        return [task_id for task_id, _, _ in items]

    def _send(self, task: str, kwargs: dict[str, Any], dl: Deadline) -> AsyncResult:
        """Publish one message of ``task`` (kwargs only) through the confirmed, deadline-bound publisher."""
        task_id = str(uuid.uuid4())
        self._publisher.publish(self._envelopes[task], [(task_id, *kwargs_parts(kwargs))], None, dl)
        return AsyncResult(task_id, app=self.app)

    def predict(
        self,
        model: str,
        inputs: Any,
        *,
        version: int | None = None,
        timeout: float = DEFAULT_TIMEOUT,
        options: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        """Score one example and wait for it: ``{"model", "version", "outputs"}`` (``"top_k"`` in place of
        ``"outputs"`` when ``options`` asks for it: contract 1.3's built-in outputs, docs/tasks.md).

        ``inputs`` is a nested list, a numpy array (sent as ``{"dtype", "shape", "b64"}``, the compact encoding of
        contract 1.2: uint8 / int / bool / float16 arrays keep their dtype, float64 becomes float32), or for a
        model of several inputs a mapping name -> list or array. :meth:`predict_bulk` takes rows of the same kinds.

        Raises:
            InputError / ModelError / StoreError: the worker refused the request (message says why).
            ResultTimeout: no result within ``timeout`` seconds.
        """
        dl = Deadline(timeout)
        ids = self._send_rows(model, [inputs], version, None, dl, options)
        return self._collect(ids, dl)[0]

    def predict_bulk(
        self,
        model: str,
        rows: Iterable[Sequence[float]],
        *,
        version: int | None = None,
        timeout: float = DEFAULT_TIMEOUT,
        on_result: Callable[[int], None] | None = None,
        return_exceptions: bool = False,
        expires: float | None = None,
    ) -> list[Any]:
        """Score many examples, one message each (the workers batch them), published and collected together.

        Args:
            timeout: seconds for the whole call (publish and wait).
            on_result: called with a row's index as its result arrives.
            return_exceptions: put a failed row's error in its place instead of raising the first one.
            expires: seconds from now after which workers drop a row unserved (``timeout`` is a good value: a row
                nobody waits for any more is then not computed).
        Returns:
            One result per row, in row order (``[]`` for no rows).
        Raises:
            PublishError: not every row is known queued (it says which were); collect ``ids[i]`` of its ``queued``
                rows, send only its ``not_sent`` rows again.
            ResultTimeout: not every result came within ``timeout``; it carries the ids to collect later.
        """
        dl = Deadline(timeout)
        ids = self._send_rows(model, rows, version, expires, dl)
        return self._collect(ids, dl, on_result=on_result, return_exceptions=return_exceptions)

    def predict_many(
        self,
        model: str,
        rows: Sequence[Sequence[float]],
        *,
        version: int | None = None,
        timeout: float = DEFAULT_TIMEOUT,
    ) -> dict[str, Any]:
        """Score many examples carried by one message (offline scoring)."""
        dl = Deadline(timeout)
        return self._collect([self._send_many(model, rows, version, dl).id], dl)[0]

    def send_predict_many(
        self,
        model: str,
        rows: Sequence[Sequence[float]],
        *,
        version: int | None = None,
        timeout: float = DEFAULT_TIMEOUT,
    ) -> AsyncResult:
        """Enqueue one ``agent_workers.predict_many`` message carrying every row."""
        return self._send_many(model, rows, version, Deadline(timeout))

    def _send_many(self, model: str, rows: Sequence[Sequence[float]], version: int | None, dl: Deadline) -> AsyncResult:
        kwargs: dict[str, Any] = {"model": model, "inputs": [plain(r) for r in rows]}
        if version is not None:
            kwargs["version"] = version
        return self._send(PREDICT_MANY, kwargs, dl)

    # -- waiting --------------------------------------------------------------------------------------------------

    def wait(self, handle: AsyncResult | str, timeout: float = DEFAULT_TIMEOUT) -> Any:
        """Wait for one result; a task failure comes back as our typed error when the class is ours."""
        task_id = handle if isinstance(handle, str) else handle.id
        return self.collect([task_id], timeout)[0]

    def collect(
        self,
        ids: Sequence[str],
        timeout: float = DEFAULT_TIMEOUT,
        *,
        on_result: Callable[[int], None] | None = None,
        return_exceptions: bool = False,
    ) -> list[Any]:
        """Wait for the results of many task ids together (an id may appear more than once); results in id order.

        Transient backend errors (a restart, a lost connection) are retried until the deadline.

        Raises:
            the first failed task's error (unless ``return_exceptions``), or ResultTimeout (with ``ids``,
            ``pending`` and the ``partial`` outcomes).
        """
        return self._collect(ids, Deadline(timeout), on_result=on_result, return_exceptions=return_exceptions)

    def _collect(
        self,
        ids: Sequence[str],
        dl: Deadline,
        *,
        on_result: Callable[[int], None] | None = None,
        return_exceptions: bool = False,
    ) -> list[Any]:
        if self._results is None:  # not a Redis backend: Celery's own, one by one
            return [self._unwrap_celery(AsyncResult(i, app=self.app), dl.left(), return_exceptions) for i in ids]
        try:
            metas = self._results.collect(ids, dl, None if on_result is None else lambda i, _m: on_result(i))
        except ResultTimeout as exc:
            exc.partial = {i: self._outcome(meta, ids[i], True) for i, meta in enumerate(exc.metas) if meta is not None}
            raise
        return [self._outcome(meta, task_id, return_exceptions) for meta, task_id in zip(metas, ids, strict=True)]

    def _outcome(self, meta: dict[str, Any], task_id: str, return_exceptions: bool) -> Any:
        return outcome(self.app, meta, task_id, return_exceptions)

    def _unwrap_celery(self, handle: AsyncResult, timeout: float, return_exceptions: bool) -> Any:
        return unwrap_celery(handle, timeout, return_exceptions)

    def error_from(self, payload: Any) -> BaseException:
        """The exception a stored failure stands for (:func:`agent_workers.client.failures.error_from`)."""
        return error_from(self.app, payload)

    # -- asyncio --------------------------------------------------------------------------------------------------

    async def collect_async(
        self, ids: Sequence[str], timeout: float = DEFAULT_TIMEOUT, *, return_exceptions: bool = False
    ) -> list[Any]:
        """asyncio variant of :meth:`collect`."""
        return await self._collect_async(ids, Deadline(timeout), return_exceptions)

    async def _collect_async(self, ids: Sequence[str], dl: Deadline, return_exceptions: bool = False) -> list[Any]:
        if self._results is None or not self._results.has_async:
            return await asyncio.to_thread(self._collect, ids, dl, return_exceptions=return_exceptions)
        metas = await self._results.collect_async(ids, dl)
        return [self._outcome(meta, task_id, return_exceptions) for meta, task_id in zip(metas, ids, strict=True)]

    async def predict_async(
        self, model: str, inputs: Any, *, version: int | None = None, timeout: float = DEFAULT_TIMEOUT
    ) -> dict[str, Any]:
        """asyncio variant of :meth:`predict` (the publish runs in a thread: a stalled broker never blocks the
        loop; the wait is native asyncio)."""
        dl = Deadline(timeout)
        ids = await asyncio.to_thread(self._send_rows, model, [inputs], version, None, dl)
        return (await self._collect_async(ids, dl))[0]

    async def predict_bulk_async(
        self,
        model: str,
        rows: Iterable[Sequence[float]],
        *,
        version: int | None = None,
        timeout: float = DEFAULT_TIMEOUT,
        return_exceptions: bool = False,
    ) -> list[Any]:
        """asyncio variant of :meth:`predict_bulk` (the publish runs in a thread)."""
        dl = Deadline(timeout)
        ids = await asyncio.to_thread(self._send_rows, model, list(rows), version, None, dl)
        return await self._collect_async(ids, dl, return_exceptions)

    async def predict_many_async(
        self,
        model: str,
        rows: Sequence[Sequence[float]],
        *,
        version: int | None = None,
        timeout: float = DEFAULT_TIMEOUT,
    ) -> dict[str, Any]:
        """asyncio variant of :meth:`predict_many`."""
        dl = Deadline(timeout)
        handle = await asyncio.to_thread(self._send_many, model, rows, version, dl)
        return (await self._collect_async([handle.id], dl))[0]

    async def fit_async(self, model: str, dataset: str, *, timeout: float = 600.0, **kwargs: Any) -> dict[str, Any]:
        """asyncio variant of :meth:`fit` (one deadline for publish and wait)."""
        dl = Deadline(timeout)
        handle = await asyncio.to_thread(self.send_fit, model, dataset, timeout=timeout, **kwargs)
        return (await self._collect_async([handle.id], dl))[0]


def _expires_at(expires: float | None) -> str | None:
    """``expires`` seconds from now, as the ISO 8601 time a message's ``expires`` header takes."""
    return None if expires is None else (datetime.now(UTC) + timedelta(seconds=expires)).isoformat()
