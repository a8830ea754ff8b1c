"""The training side of :class:`~agent_workers.client.Client`: datasets, single steps, queued data-parallel
training and whole ``fit`` jobs with progress (a mixin: the publish and the wait are the client's own)."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

from celery import Celery
from celery.result import AsyncResult

from agent_workers.client.deadline import DEFAULT_TIMEOUT, Deadline
from agent_workers.client.messages import plain, training_x
from agent_workers.config import Settings
from agent_workers.contract import FIT, TRAIN_STEP
from agent_workers.training.datasets import DEFAULT_TTL, DatasetStore, epoch_batches

#: Seconds between two looks at a running fit's ``PROGRESS`` meta.
PROGRESS_POLL_INTERVAL = 0.25


class Training:
    """Training jobs: see :class:`~agent_workers.client.Client` (which this is a part of)."""

    settings: Settings
    app: Celery
    _datasets: DatasetStore | None
    _results: Any

    def _send(self, task: str, kwargs: dict[str, Any], dl: Deadline) -> AsyncResult:
        raise NotImplementedError

    def _collect(self, ids: Sequence[str], dl: Deadline, **kwargs: Any) -> list[Any]:
        raise NotImplementedError

    def upload_dataset(self, name: str | None, x: Any, y: Any, *, ttl: int = DEFAULT_TTL) -> str:
        """Upload a training dataset to the parameter store's Redis; returns its name (a uuid when ``name`` is None).

        Args:
            x: rows × features (a numpy array or nested lists); or typed columns: a numpy array of any dtype a
                signature takes and any shape per row (uint8 pixels [n, 1, 8, 8]), a list of rows of different
                lengths (token ids; stored ragged, values + offsets), or name -> one of those for several inputs.
            y: one target per row (integer class indices stay integers).
            ttl: seconds until it expires (default 7 days); 0 keeps it until ``agent-workers datasets delete``.
        Raises:
            InputError: x and y disagree on the rows, or are not numeric.
        """
        if self._datasets is None:
            self._datasets = DatasetStore.from_settings(self.settings)
        return self._datasets.upload(x, y, dataset_id=name, ttl=ttl)

    def put_artifacts(self, model: str, files: dict[str, bytes | str], *, version: int | None = None) -> int:
        """Store artifacts (labels, tokenizer, ...: name -> bytes or text) that hold from ``version`` on (default:
        the next version committed); returns that version. ``labels`` is a JSON list of strings.

        Raises:
            InputError: a bad artifact. ModelError: no such model.
            StoreError: ``version`` is not above the model's head (workers may have cached its artifacts).
        """
        from agent_workers.keys import Keys
        from agent_workers.redis_clients import redis_client
        from agent_workers.store.artifacts import RedisArtifactStore

        client = redis_client(self.settings.params_url, sentinel_master=self.settings.sentinel_master)
        try:
            return RedisArtifactStore(client=client, keys=Keys(self.settings.namespace)).put(
                model, files, version=version
            )
        finally:
            client.close()

    def send_train_step(
        self,
        model: str,
        *,
        x: Any = None,
        y: Any = None,
        dataset: str | None = None,
        rows: Sequence[int] | None = None,
        hparams: dict[str, Any] | None = None,
        update_id: str | None = None,
        timeout: float = DEFAULT_TIMEOUT,
    ) -> AsyncResult:
        """Enqueue one training step (inline ``x``/``y`` or ``rows`` of an uploaded dataset); ``timeout`` bounds
        the publish. A typed ``x`` (uint8 pixels, int64 token ids, a list of rows of different lengths, or name ->
        one of those) travels in the compact tensor encoding (contract 1.3)."""
        kwargs: dict[str, Any] = {"model": model, "hparams": hparams or {}}
        if dataset is not None:
            kwargs.update(dataset=dataset, rows=[int(r) for r in rows or ()])
        else:
            kwargs.update(x=training_x(x), y=plain(y))
        if update_id is not None:
            kwargs["update_id"] = update_id
        return self._send(TRAIN_STEP, kwargs, Deadline(timeout))

    def train_step(self, model: str, *, timeout: float = DEFAULT_TIMEOUT, **kwargs: Any) -> dict[str, Any]:
        """One training step, sent and waited for within ``timeout`` (arguments as :meth:`send_train_step`)."""
        dl = Deadline(timeout)
        handle = self.send_train_step(model, timeout=timeout, **kwargs)
        return self._collect([handle.id], dl)[0]

    def send_fit(
        self,
        model: str,
        dataset: str,
        *,
        epochs: int = 10,
        batch_size: int = 100,
        hparams: dict[str, Any] | None = None,
        seed: int = 0,
        timeout: float = DEFAULT_TIMEOUT,
    ) -> AsyncResult:
        """Enqueue a whole training job that one worker runs (progress in the task's ``PROGRESS`` meta);
        ``timeout`` bounds the publish."""
        kwargs = {
            "model": model,
            "dataset": dataset,
            "epochs": epochs,
            "batch_size": batch_size,
            "hparams": hparams or {},
            "seed": seed,
        }
        return self._send(FIT, kwargs, Deadline(timeout))

    def fit(
        self,
        model: str,
        dataset: str,
        *,
        timeout: float = 600.0,
        on_progress: Callable[[dict[str, Any]], None] | None = None,
        **kwargs: Any,
    ) -> dict[str, Any]:
        """Run a whole training job and wait for it: ``{"model", "version", "steps", "history"}``.

        Args:
            timeout: seconds for the whole call (publish, progress and result: one deadline).
            on_progress: called with each new ``PROGRESS`` meta the worker reports (``epoch`` (1-based), ``epochs``,
                ``step``, ``steps``, ``loss``, ``version``; every 10 steps and after the last), polled every
                ``PROGRESS_POLL_INTERVAL`` seconds while the job runs. An exception it raises stops the wait (not
                the job) and carries the job's ``task_id``, so it can still be waited for or revoked.
            kwargs: as :meth:`send_fit` (``epochs``, ``batch_size``, ``hparams``, ``seed``).
        """
        dl = Deadline(timeout)
        handle = self.send_fit(model, dataset, timeout=timeout, **kwargs)
        if on_progress is None:
            return self._collect([handle.id], dl)[0]
        try:
            return self._fit_progress(handle, dl, on_progress, int(kwargs.get("epochs", 10)))
        except BaseException as exc:  # a callback that raised (even ^C): the caller still holds the job's id
            if not hasattr(exc, "task_id"):
                exc.task_id = handle.id  # type: ignore[attr-defined]
            raise

    def _fit_progress(
        self, handle: AsyncResult, dl: Deadline, on_progress: Callable[[dict[str, Any]], None], epochs: int
    ) -> dict[str, Any]:
        last = self._follow(handle, dl, on_progress)
        result = self._collect([handle.id], dl)[0]
        if last is None or last.get("step") != result["steps"]:
            # A short job can finish between two polls: report its end, so a progress bar always completes.
            history = result.get("history") or [{}]
            on_progress(
                {
                    "epoch": epochs,
                    "epochs": epochs,
                    "step": result["steps"],
                    "steps": result["steps"],
                    "loss": history[-1].get("loss"),
                    "version": result["version"],
                }
            )
        return result

    def _follow(
        self, handle: AsyncResult, dl: Deadline, on_progress: Callable[[dict[str, Any]], None]
    ) -> dict[str, Any] | None:
        """Report ``PROGRESS`` metas until the task is done (or the deadline passes; the wait then decides).

        Returns the last meta reported, if any.
        """
        last: Any = None
        while not dl.passed:
            if self._results is not None:
                meta = self._results.meta(handle.id, dl)
                if meta is None:
                    break  # the backend is unreachable right now: the wait for the result decides
            else:
                meta = self.app.backend.get_task_meta(handle.id)
            if meta.get("status") == "PROGRESS" and meta.get("result") != last:
                last = meta.get("result")
                on_progress(dict(last))
            elif meta.get("status") in {"SUCCESS", "FAILURE", "REVOKED"}:
                break
            time.sleep(min(PROGRESS_POLL_INTERVAL, dl.left()))  # noqa: sleep-ok - the poll interval of a bounded wait
        return last

    def train(
        self,
        model: str,
        dataset: str,
        n_rows: int,
        *,
        epochs: int,
        batch_size: int,
        hparams: dict[str, Any] | None = None,
        seed: int = 0,
        window: int = 8,
        timeout: float = DEFAULT_TIMEOUT,
        on_step: Callable[[dict[str, Any]], None] | None = None,
        on_progress: Callable[[dict[str, Any]], None] | None = None,
    ) -> list[dict[str, Any]]:
        """Data-parallel training through the queue: every mini-batch is its own ``train_step`` message.

        At most ``window`` steps are in flight, which bounds how stale a gradient can get with many workers.
        Returns the step results in completion order.

        Args:
            timeout: seconds each step may take, from its publish to its result (steps are waited for in order).
            on_step: called with each step's result (``loss``, ``version``, ...).
            on_progress: called after each step with the same fields as :meth:`fit`'s progress: ``epoch``
                (1-based), ``epochs``, ``step`` (steps done so far), ``steps`` (in all), ``loss``, ``version``.
        """
        total = epochs * -(-n_rows // batch_size)
        in_flight: list[AsyncResult] = []
        results: list[dict[str, Any]] = []

        def drain(keep: int) -> None:
            while len(in_flight) > keep:
                result = self.wait(in_flight.pop(0), timeout)
                results.append(result)
                if on_step is not None:
                    on_step(result)
                if on_progress is not None:
                    done = len(results)
                    on_progress(
                        {
                            "epoch": (done - 1) * epochs // total + 1,
                            "epochs": epochs,
                            "step": done,
                            "steps": total,
                            "loss": result.get("loss"),
                            "version": result.get("version"),
                        }
                    )

        for _epoch, _step, rows in epoch_batches(n_rows, epochs=epochs, batch_size=batch_size, seed=seed):
            step = self.send_train_step(model, dataset=dataset, rows=rows.tolist(), hparams=hparams, timeout=timeout)
            in_flight.append(step)
            drain(window - 1)
        drain(0)
        return results
