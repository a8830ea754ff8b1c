"""Each predict request's outcome from its output row: the result record's ``{"model", "version", "outputs"}``, or
the built-in outputs its ``options`` ask for and the architecture's postprocess hook (agent_workers/outputs.py,
agent_workers/hooks.py)."""

from __future__ import annotations

from typing import Any

import numpy as np
from celery import states

from agent_workers import hooks
from agent_workers.contract import PredictCall
from agent_workers.worker.inference import InferenceEngine, LoadedModel, result_output
from agent_workers.worker.requests import Pending
from agent_workers.worker.results import Outcome


def outcomes(
    loaded: LoadedModel,
    pairs: list[tuple[Pending, Any]],
    elapsed: float,
    usage: list[dict[str, Any] | None] | None = None,
) -> list[Outcome]:
    """One outcome per ``(request, output row or error)`` of one (model, version), in order.

    Args:
        usage: per pair, the ``batch`` metadata of a padded batch (real and padded tokens, compute share), or None.

    A request without ``options`` of a model without a postprocess hook takes the plain path (no copy, no hook).
    """
    usage = usage or [None] * len(pairs)
    if loaded.hooks.postprocess is None and all(req.options is None for req, _ in pairs):
        return [
            answer(req, loaded.name, loaded.version, value, elapsed, used)
            for (req, value), used in zip(pairs, usage, strict=True)
        ]
    rows, options = [value for _, value in pairs], [req.options for req, _ in pairs]
    fields = hooks.answers(loaded.hooks, loaded.spec.signature, loaded.artifacts, rows, options)
    head = {"model": loaded.name, "version": loaded.version}
    return [
        Outcome(req, states.FAILURE, f, elapsed)
        if isinstance(f, Exception)
        else Outcome(req, states.SUCCESS, _with_usage({**head, **f}, used), elapsed)
        for (req, _), f, used in zip(pairs, fields, usage, strict=True)
    ]


def answer(
    req: Pending, model: str, version: int, value: Any, elapsed: float, usage: dict[str, Any] | None = None
) -> Outcome:
    """The plain outcome: the row as ``outputs`` (and its padded batch's ``batch`` metadata), or the row's error."""
    if isinstance(value, Exception):
        return Outcome(req, states.FAILURE, value, elapsed)
    # float64 prints exactly as json prints float(float32): the same digits as every other path (predict_many)
    result = {"model": model, "version": version, "outputs": result_output(value)}
    return Outcome(req, states.SUCCESS, _with_usage(result, usage), elapsed)


def _with_usage(result: dict[str, Any], usage: dict[str, Any] | None) -> dict[str, Any]:
    if usage is not None:
        result["batch"] = usage
    return result


def predict_one(engine: InferenceEngine, call: PredictCall) -> dict[str, Any]:
    """One predict call served on its own (the task body: eager and direct calls), hooks and options included.

    Raises:
        InputError / ModelError: as the batcher would answer the request.
    """
    loaded = engine.resolve(call.model, call.version, call.min_version)
    if loaded.hooks.preprocess is not None:
        limit = engine.settings.max_input_elements
        example = hooks.prepare(loaded.hooks, loaded.spec.signature, call.inputs, loaded.artifacts, max_elements=limit)
    else:
        example = engine.validate(loaded, call.inputs)
    row = engine.run_batch_arrays(loaded, [example])[0]
    (fields,) = hooks.answers(loaded.hooks, loaded.spec.signature, loaded.artifacts, [row], [call.options])
    if isinstance(fields, Exception):
        raise fields
    return {"model": call.model, "version": loaded.version, **_plain(fields)}


def _plain(value: Any) -> Any:
    """Arrays as lists, in dicts and lists too: what Celery's JSON serializer takes."""
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value
