"""Inference tasks: ``agent_workers.predict`` (dynamically batched) and ``agent_workers.predict_many``."""

from __future__ import annotations

from typing import Any

from celery import Task

from agent_workers.contract import PREDICT, PREDICT_MANY, bind_predict
from agent_workers.errors import InputError, StoreUnavailableError
from agent_workers.worker.limits import LimitedTask
from tasks import app


class BatchedTask(Task):
    """A task whose messages the worker routes into the dynamic batcher instead of one pool job each."""

    Strategy = "agent_workers.worker.batcher:batch_strategy"


@app.task(name=PREDICT, base=BatchedTask, bind=True)
def predict(self: Task, *args: Any, **kwargs: Any) -> dict[str, Any]:
    """Score one example. In a worker this body is bypassed by the batcher; it serves direct and eager calls."""
    model, inputs, version = bind_predict(list(args), kwargs)
    engine = self.app.engine
    loaded = engine.current(model) if version is None else engine.pinned(model, version)
    result = engine.run_batch(loaded, [engine.validate(loaded, inputs)])[0]
    if isinstance(result, Exception):
        raise result
    return {"model": model, "version": loaded.version, "outputs": result}


@app.task(
    name=PREDICT_MANY,
    bind=True,
    base=LimitedTask,
    autoretry_for=(StoreUnavailableError,),
    max_retries=3,
    retry_backoff=True,
)
def predict_many(self: Task, model: str, inputs: Any, version: int | None = None) -> dict[str, Any]:
    """Score many examples in one message, in GPU-sized batches; outputs in input order."""
    if not isinstance(model, str):
        raise InputError(f"model must be a model name (a string), got {type(model).__name__}")
    return self.app.engine.predict_many(model, inputs, version)
