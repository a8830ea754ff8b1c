"""Training tasks: ``agent_workers.train_step`` (one optimistic step; in a worker, queued steps of one model are
group-committed: see agent_workers/worker/trainer.py) and ``agent_workers.fit`` (a whole job, a normal task)."""

from __future__ import annotations

from typing import Any

from celery import Task

from agent_workers.contract import FIT, TRAIN_STEP
from agent_workers.errors import InputError, StoreUnavailableError
from agent_workers.training.optim import HyperParams
from agent_workers.training.steps import fit as run_fit
from agent_workers.training.steps import train_step as run_step
from agent_workers.worker.limits import LimitedTask, deadline
from tasks import app


class GroupedTask(LimitedTask):
    """A task whose messages the worker routes into group commits (``AGENT_WORKERS_TRAIN_GROUP`` > 1) instead of
    one pool job each; with a group of 1 it is a size-checked task like any other."""

    Strategy = "agent_workers.worker.trainer:train_strategy"


RETRY = {
    "base": LimitedTask,
    "autoretry_for": (StoreUnavailableError,),
    "max_retries": 5,
    "retry_backoff": True,
    "retry_jitter": True,
}


@app.task(name=TRAIN_STEP, bind=True, **{**RETRY, "base": GroupedTask})
def train_step(
    self: Task,
    model: str,
    x: Any = None,
    y: Any = None,
    hparams: dict[str, Any] | None = None,
    dataset: str | None = None,
    rows: Any = None,
    update_id: str | None = None,
) -> dict[str, Any]:
    """One step on a mini-batch given inline (``x``, ``y``) or as ``rows`` of an uploaded ``dataset``; typed inputs
    (token ids, uint8 pixels, rows of different lengths, named inputs) are decoded per the model's signature
    (contract 1.3, agent_workers/training/inputs.py).

    The update id defaults to the task id, so a redelivered message is applied exactly once. In a worker with
    ``AGENT_WORKERS_TRAIN_GROUP`` > 1 this body is bypassed by the group commit path (same arguments, same result);
    it serves the per-step path, direct and eager calls.
    """
    hp = HyperParams.from_json(hparams)
    if dataset is not None:
        x, y = self.app.datasets.rows(dataset, rows, max_elements=self.app.settings.max_input_elements)
    elif x is None or y is None:
        raise InputError("train_step needs x and y, or dataset and rows")
    settings = self.app.settings
    result = run_step(
        self.app.store,
        model,
        x,
        y,
        hp,
        update_id=update_id or self.request.id,
        max_staleness=settings.max_staleness,
        max_elements=settings.max_input_elements,
        deadline=deadline(self.app),
    )
    return result.to_json()


@app.task(name=FIT, bind=True, **RETRY)
def fit(
    self: Task,
    model: str,
    dataset: str,
    epochs: int = 10,
    batch_size: int = 100,
    hparams: dict[str, Any] | None = None,
    seed: int = 0,
) -> dict[str, Any]:
    """Train ``model`` on an uploaded dataset inside this worker, committing every step.

    Progress is readable as the task's ``PROGRESS`` state (meta: epoch, step, steps, loss, version). Each step's
    update id is derived from the task id, so a redelivered fit skips the steps it already committed. The result
    adds what coordination cost: ``conflicts``, ``recomputed``, ``duplicates`` and ``max_staleness_seen``, and
    which upload it trained on (``dataset``, ``upload``; also in each step's record of the model's history). The
    whole job is checked against the model before its first commit.
    """
    hp = HyperParams.from_json(hparams)
    data = self.app.datasets.get(dataset)  # the current upload (a re-upload is seen at once)
    trained_on = {"dataset": data.name, "upload": data.upload}

    def progress(meta: dict[str, Any]) -> None:
        self.update_state(state="PROGRESS", meta=meta)

    result = run_fit(
        self.app.store,
        model,
        data.x,
        data.y,
        hp,
        epochs=epochs,
        batch_size=batch_size,
        seed=seed,
        update_prefix=self.request.id,
        max_staleness=self.app.settings.max_staleness,
        on_progress=progress,
        max_elements=self.app.settings.max_input_elements,
        deadline=deadline(self.app),
        info=trained_on,
    )
    return {**result, **trained_on}
