"""Inference tasks: ``agent_workers.predict`` (dynamically batched) and ``agent_workers.predict_many``."""

from __future__ import annotations

from typing import Any

from celery import Task

from agent_workers import numbers
from agent_workers.contract import PREDICT, PREDICT_MANY, bind_predict_call
from agent_workers.errors import InputError, StoreUnavailableError
from agent_workers.worker import answers
from agent_workers.worker.limits import LimitedTask
from tasks import app


class BatchedTask(Task):
    """A task whose messages the worker routes into the dynamic batcher instead of one pool job each."""

    Strategy = "agent_workers.worker.batcher:batch_strategy"


@app.task(name=PREDICT, base=BatchedTask, bind=True)
def predict(self: Task, *args: Any, **kwargs: Any) -> dict[str, Any]:
    """Score one example. In a worker this body is bypassed by the batcher; it serves direct and eager calls."""
    return answers.predict_one(self.app.engine, bind_predict_call(list(args), kwargs))


@app.task(
    name=PREDICT_MANY,
    bind=True,
    base=LimitedTask,
    autoretry_for=(StoreUnavailableError,),
    max_retries=3,
    retry_backoff=True,
)
def predict_many(
    self: Task, model: str, inputs: Any, version: int | None = None, min_version: int | None = None
) -> dict[str, Any]:
    """Score many examples in one message, in GPU-sized batches; outputs in input order (from a version at least
    ``min_version`` when given: read-your-writes)."""
    if not isinstance(model, str):
        raise InputError(f"model must be a model name (a string), got {type(model).__name__}")
    version = None if version is None else numbers.integer("version", version, low=0)
    min_version = None if min_version is None else numbers.integer("min_version", min_version, low=0)
    return self.app.engine.predict_many(model, inputs, version, min_version)
