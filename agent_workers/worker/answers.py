"""Each predict request's outcome from its output row: the result record's ``{"model", "version", "outputs"}``, or
the built-in outputs its ``options`` ask for and the architecture's postprocess hook (agent_workers/outputs.py,
agent_workers/hooks.py)."""

from __future__ import annotations

from typing import Any

import numpy as np
from celery import states

from agent_workers import hooks
from agent_workers.contract import PredictCall
from agent_workers.outputs import encoded_output
from agent_workers.worker.inference import InferenceEngine, LoadedModel
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
        else Outcome(req, states.SUCCESS, _with_usage({**head, **_encoded(f, req.output_encoding)}, used), elapsed)
        for (req, _), f, used in zip(pairs, fields, usage, strict=True)
    ]


def answer(
    req: Pending, model: str, version: int, value: Any, elapsed: float, usage: dict[str, Any] | None = None
) -> Outcome:
    """The plain outcome: the row as ``outputs`` (and its padded batch's ``batch`` metadata), or the row's error."""
    if isinstance(value, Exception):
        return Outcome(req, states.FAILURE, value, elapsed)
    # float64 prints exactly as json prints float(float32): the same digits as every other path (predict_many)
    result = {"model": model, "version": version, "outputs": encoded_output(value, req.output_encoding)}
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
    return {"model": call.model, "version": loaded.version, **_plain(_encoded(fields, call.output_encoding))}


def _encoded(fields: dict[str, Any], encoding: str) -> dict[str, Any]:
    """Answer fields with tensor ``outputs`` in the request's ``output_encoding`` (contract 1.3); what a postprocess
    hook or ``top_k`` answers (JSON of its own) is left as it is."""
    out = fields.get("outputs")
    if not _is_tensor(out):
        return fields
    if encoding != "json":  # softmax / normalize compute in float64; the binary form keeps the model's float32
        out = {k: _narrowed(v) for k, v in out.items()} if isinstance(out, dict) else _narrowed(out)
    return {**fields, "outputs": encoded_output(out, encoding)}


def _narrowed(array: np.ndarray) -> np.ndarray:
    return array.astype(np.float32) if array.dtype == np.float64 else array


def _is_tensor(value: Any) -> bool:
    if isinstance(value, dict):
        return bool(value) and all(isinstance(v, np.ndarray) for v in value.values())
    return isinstance(value, np.ndarray)


def _plain(value: Any) -> Any:
    """Arrays as lists, in dicts and lists too: what Celery's JSON serializer takes."""
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value
