"""What a producer calls: thin over ``send_task``, so other applications need only the broker and backend URLs.

    from agent_workers.client import Client
    client = Client.from_env()
    client.predict("linear", [0.1] * 10)            # {'model': 'linear', 'version': 3, 'outputs': [0.09]}

A producer that does not want this package sends the same messages itself: ``send_task("agent_workers.predict",
args=[model, inputs], queue="inference")`` (see docs/tasks.md).
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from celery import Celery
from celery.result import AsyncResult

from agent_workers.app import FIT, PREDICT, PREDICT_MANY, TRAIN_STEP, task_routes
from agent_workers.config import Settings
from agent_workers.errors import AgentWorkersError, InputError, ModelError, StoreError

DEFAULT_TIMEOUT = 60.0
_ERRORS: dict[str, type[AgentWorkersError]] = {
    "InputError": InputError, "ModelError": ModelError, "StoreError": StoreError,
}


def producer_app(settings: Settings) -> Celery:
    """A minimal Celery app for producing: JSON only, our routes, our result backend."""
    app = Celery("agent_workers_client", broker=settings.broker_url, backend=settings.result_backend,
                 set_as_current=False)
    app.conf.update(task_serializer="json", result_serializer="json", accept_content=["json"],
                    result_accept_content=["json"], task_routes=task_routes(settings),
                    broker_transport_options={"visibility_timeout": settings.visibility_timeout},
                    broker_connection_retry_on_startup=True)
    return app


class Client:
    """Send inference and training jobs and wait for their results.

    Args:
        settings: broker, backend and queue names (``Settings.from_env()`` when omitted).
        app: an existing Celery app to send with, instead of a new producer app.
    """

    def __init__(self, settings: Settings | None = None, *, app: Celery | None = None) -> None:
        self.settings = settings or Settings.from_env()
        self.app = app or producer_app(self.settings)

    @classmethod
    def from_env(cls) -> Client:
        return cls(Settings.from_env())

    # -- sending --------------------------------------------------------------------------------------------------

    def send_predict(self, model: str, inputs: Sequence[float], *, version: int | None = None,
                     expires: float | None = None) -> AsyncResult:
        """Enqueue one prediction; returns its result handle at once."""
        kwargs: dict[str, Any] = {"model": model, "inputs": list(inputs)}
        if version is not None:
            kwargs["version"] = version
        return self.app.send_task(PREDICT, kwargs=kwargs, expires=expires)

    def predict(self, model: str, inputs: Sequence[float], *, version: int | None = None,
                timeout: float = DEFAULT_TIMEOUT) -> dict[str, Any]:
        """Score one example and wait for it.

        Raises:
            InputError / ModelError / StoreError: the worker refused the request (message says why).
            celery.exceptions.TimeoutError: no result within ``timeout`` seconds.
        """
        return self.wait(self.send_predict(model, inputs, version=version), timeout)

    def predict_bulk(self, model: str, rows: Iterable[Sequence[float]], *, timeout: float = DEFAULT_TIMEOUT,
                     on_result: Callable[[int], None] | None = None) -> list[dict[str, Any]]:
        """Send many single-example predictions over one producer connection, then collect them in order."""
        handles = []
        with self.app.producer_or_acquire() as producer:
            for row in rows:
                handles.append(self.app.send_task(PREDICT, kwargs={"model": model, "inputs": list(row)},
                                                  producer=producer))
        results = []
        for i, handle in enumerate(handles):
            results.append(self.wait(handle, timeout))
            if on_result is not None:
                on_result(i)
        return results

    def predict_many(self, model: str, rows: Sequence[Sequence[float]], *, version: int | None = None,
                     timeout: float = DEFAULT_TIMEOUT) -> dict[str, Any]:
        """Score many examples carried by one message (offline scoring)."""
        kwargs: dict[str, Any] = {"model": model, "inputs": [list(r) for r in rows]}
        if version is not None:
            kwargs["version"] = version
        return self.wait(self.app.send_task(PREDICT_MANY, kwargs=kwargs), timeout)

    def send_train_step(self, model: str, *, x: Any = None, y: Any = None, dataset: str | None = None,
                        rows: Sequence[int] | None = None, hparams: dict[str, Any] | None = None,
                        update_id: str | None = None) -> AsyncResult:
        """Enqueue one training step (inline ``x``/``y`` or ``rows`` of an uploaded dataset)."""
        kwargs: dict[str, Any] = {"model": model, "hparams": hparams or {}}
        if dataset is not None:
            kwargs.update(dataset=dataset, rows=[int(r) for r in rows or ()])
        else:
            kwargs.update(x=x, y=y)
        if update_id is not None:
            kwargs["update_id"] = update_id
        return self.app.send_task(TRAIN_STEP, kwargs=kwargs)

    def send_fit(self, model: str, dataset: str, *, epochs: int = 10, batch_size: int = 100,
                 hparams: dict[str, Any] | None = None, seed: int = 0) -> AsyncResult:
        """Enqueue a whole training job that one worker runs (progress in the task's ``PROGRESS`` meta)."""
        return self.app.send_task(FIT, kwargs={"model": model, "dataset": dataset, "epochs": epochs,
                                               "batch_size": batch_size, "hparams": hparams or {}, "seed": seed})

    def train(self, model: str, dataset: str, n_rows: int, *, epochs: int, batch_size: int,
              hparams: dict[str, Any] | None = None, seed: int = 0, window: int = 8,
              timeout: float = DEFAULT_TIMEOUT, on_step: Callable[[dict[str, Any]], None] | None = None,
              ) -> list[dict[str, Any]]:
        """Data-parallel training through the queue: every mini-batch is its own ``train_step`` message.

        At most ``window`` steps are in flight, which bounds how stale a gradient can get with many workers.
        Returns the step results in completion order.
        """
        import numpy as np

        rng = np.random.default_rng(seed)
        steps = math.ceil(n_rows / batch_size)
        in_flight: list[AsyncResult] = []
        results: list[dict[str, Any]] = []

        def drain(keep: int) -> None:
            while len(in_flight) > keep:
                result = self.wait(in_flight.pop(0), timeout)
                results.append(result)
                if on_step is not None:
                    on_step(result)

        for _ in range(epochs):
            order = rng.permutation(n_rows)
            for i in range(steps):
                rows = order[i * batch_size : (i + 1) * batch_size]
                in_flight.append(self.send_train_step(model, dataset=dataset, rows=rows.tolist(), hparams=hparams))
                drain(window - 1)
        drain(0)
        return results

    # -- waiting --------------------------------------------------------------------------------------------------

    def wait(self, handle: AsyncResult, timeout: float = DEFAULT_TIMEOUT) -> dict[str, Any]:
        """Wait for a result; a task failure comes back as our typed error when the class is ours."""
        try:
            return handle.get(timeout=timeout, disable_sync_subtasks=False)
        except AgentWorkersError:
            raise
        except Exception as exc:
            mapped = _ERRORS.get(type(exc).__name__)
            if mapped is not None:
                raise mapped(str(exc)) from exc
            raise

    async def predict_async(self, model: str, inputs: Sequence[float], *, version: int | None = None,
                            timeout: float = DEFAULT_TIMEOUT) -> dict[str, Any]:
        """asyncio variant of :meth:`predict` (the blocking wait runs in a thread)."""
        handle = self.send_predict(model, inputs, version=version)
        return await asyncio.to_thread(self.wait, handle, timeout)
