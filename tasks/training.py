"""Training tasks: ``agent_workers.train_step`` (one optimistic step) and ``agent_workers.fit`` (a whole job)."""

from __future__ import annotations

from typing import Any

import numpy as np
from celery import Task

from agent_workers.app import FIT, TRAIN_STEP
from agent_workers.errors import InputError, StoreUnavailableError
from agent_workers.training import HyperParams
from agent_workers.training import train_step as run_step
from tasks import app

RETRY = {"autoretry_for": (StoreUnavailableError,), "max_retries": 5, "retry_backoff": True, "retry_jitter": True}


@app.task(name=TRAIN_STEP, bind=True, **RETRY)
def train_step(self: Task, model: str, x: Any = None, y: Any = None, hparams: dict[str, Any] | None = None,
               dataset: str | None = None, rows: Any = None, update_id: str | None = None) -> dict[str, Any]:
    """One step on a mini-batch given inline (``x``, ``y``) or as ``rows`` of an uploaded ``dataset``.

    The update id defaults to the task id, so a redelivered message is applied exactly once.
    """
    hp = HyperParams.from_json(hparams)
    if dataset is not None:
        x, y = self.app.datasets.rows(dataset, rows)
    elif x is None or y is None:
        raise InputError("train_step needs x and y, or dataset and rows")
    settings = self.app.settings
    result = run_step(self.app.store, model, x, y, hp, update_id=update_id or self.request.id,
                      max_staleness=settings.max_staleness)
    return result.to_json()


@app.task(name=FIT, bind=True, **RETRY)
def fit(self: Task, model: str, dataset: str, epochs: int = 10, batch_size: int = 100,
        hparams: dict[str, Any] | None = None, seed: int = 0) -> dict[str, Any]:
    """Train ``model`` on an uploaded dataset inside this worker, committing every step.

    Progress is readable as the task's ``PROGRESS`` state (meta: epoch, step, steps, loss, version). Each step's
    update id is derived from the task id, so a redelivered fit skips the steps it already committed. The result
    adds what coordination cost: ``conflicts``, ``recomputed``, ``duplicates`` and ``max_staleness_seen``.
    """
    hp = HyperParams.from_json(hparams)
    if not (isinstance(epochs, int) and epochs > 0 and isinstance(batch_size, int) and batch_size > 0):
        raise InputError("epochs and batch_size must be positive integers")
    x, y = self.app.datasets.load(dataset)
    rng = np.random.default_rng(seed)
    steps_per_epoch = (len(x) + batch_size - 1) // batch_size
    total = epochs * steps_per_epoch
    history: list[dict[str, Any]] = []
    done = 0
    version = -1
    cost = {"conflicts": 0, "recomputed": 0, "duplicates": 0, "max_staleness_seen": 0}
    for epoch in range(epochs):
        order = rng.permutation(len(x))
        losses = []
        for i in range(steps_per_epoch):
            rows = order[i * batch_size : (i + 1) * batch_size]
            result = run_step(self.app.store, model, x[rows], y[rows], hp,
                              update_id=f"{self.request.id}:{epoch}:{i}",
                              max_staleness=self.app.settings.max_staleness)
            losses.append(result.loss)
            version = result.version
            cost["conflicts"] += result.conflicts
            cost["recomputed"] += result.recomputed
            cost["duplicates"] += int(result.duplicate)
            cost["max_staleness_seen"] = max(cost["max_staleness_seen"], result.staleness)
            done += 1
            if done % 10 == 0 or done == total:
                self.update_state(state="PROGRESS", meta={"epoch": epoch + 1, "epochs": epochs, "step": done,
                                                          "steps": total, "loss": result.loss, "version": version})
        history.append({"epoch": epoch + 1, "loss": float(np.mean(losses)), "version": version})
    return {"model": model, "version": version, "steps": total, "history": history, **cost}
