"""Each predict request's outcome from its output row: the result record's ``{"model", "version", "outputs"}``, or
the built-in outputs its ``options`` ask for and the architecture's postprocess hook (agent_workers/outputs.py,
agent_workers/hooks.py)."""

from __future__ import annotations

from typing import Any

from celery import states

from agent_workers import hooks
from agent_workers.worker.inference import LoadedModel, result_output
from agent_workers.worker.requests import Pending
from agent_workers.worker.results import Outcome


def outcomes(loaded: LoadedModel, pairs: list[tuple[Pending, Any]], elapsed: float) -> list[Outcome]:
    """One outcome per ``(request, output row or error)`` of one (model, version), in order.

    A request without ``options`` of a model without a postprocess hook takes the plain path (no copy, no hook).
    """
    if loaded.hooks.postprocess is None and all(req.options is None for req, _ in pairs):
        return [answer(req, loaded.name, loaded.version, value, elapsed) for req, value in pairs]
    rows, options = [value for _, value in pairs], [req.options for req, _ in pairs]
    fields = hooks.answers(loaded.hooks, loaded.spec.signature, loaded.artifacts, rows, options)
    head = {"model": loaded.name, "version": loaded.version}
    return [
        Outcome(req, states.FAILURE, f, elapsed)
        if isinstance(f, Exception)
        else Outcome(req, states.SUCCESS, {**head, **f}, elapsed)
        for (req, _), f in zip(pairs, fields, strict=True)
    ]


def answer(req: Pending, model: str, version: int, value: Any, elapsed: float) -> Outcome:
    """The plain outcome: the row as ``outputs``, or the row's error."""
    if isinstance(value, Exception):
        return Outcome(req, states.FAILURE, value, elapsed)
    # float64 prints exactly as json prints float(float32): the same digits as every other path (predict_many)
    return Outcome(req, states.SUCCESS, {"model": model, "version": version, "outputs": result_output(value)}, elapsed)
