"""The producer's Celery app and the messages it builds without Celery: predict bodies and their reprs."""

from __future__ import annotations

import json
from typing import Any
from urllib.parse import urlparse

from celery import Celery

from agent_workers import wire
from agent_workers.config import Settings
from agent_workers.contract import queues, task_routes
from agent_workers.tensors import encode_tensor

KWARGSREPR_LIMIT = 120


def producer_app(settings: Settings) -> Celery:
    """A minimal Celery app for producing: JSON only, our routes, our result backend."""
    app = Celery(
        "agent_workers_client", broker=settings.broker_url, backend=settings.result_backend, set_as_current=False
    )
    app.conf.update(
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        result_accept_content=["json"],
        task_routes=task_routes(settings),
        task_queues=list(queues(settings).values()),
        broker_transport_options={"visibility_timeout": settings.visibility_timeout},
        broker_connection_retry_on_startup=True,
    )
    if urlparse(settings.broker_url).scheme == "sentinel":
        app.conf.broker_transport_options["master_name"] = settings.sentinel_master
    if urlparse(settings.result_backend).scheme == "sentinel":
        app.conf.result_backend_transport_options = {"master_name": settings.sentinel_master}
    return app


def predict_parts(
    model_json: str, model: str, inputs: Any, version: int | None, options: dict[str, Any] | None = None
) -> tuple[bytes, str]:
    """Body and kwargs repr of one ``agent_workers.predict`` message (kwargs: model, inputs[, version][, options]).

    numpy arrays travel in the compact encoding ``{"dtype", "shape", "b64"}`` (contract 1.2), also as the values
    of a mapping of named inputs; lists travel as they are.
    """
    inputs = compact(inputs)
    try:
        inputs_json = json.dumps(inputs)
    except TypeError:  # a list of numpy scalars: the slower walk, only when needed
        inputs_json = json.dumps(plain(inputs))
    extra = "" if version is None else f', "version": {int(version)}'
    if options is not None:  # contract 1.3: built-in outputs (top_k, softmax, normalize, outputs)
        extra += f', "options": {json.dumps(options)}'
    body = wire.body("[]", f'{{"model": {model_json}, "inputs": {inputs_json}{extra}}}')
    shown = inputs_json if len(inputs_json) <= KWARGSREPR_LIMIT else inputs_json[: KWARGSREPR_LIMIT - 3] + "..."
    return body, f"{{'model': {model!r}, 'inputs': {shown}{extra.replace(chr(34), chr(39))}}}"


def compact(inputs: Any) -> Any:
    """numpy arrays (also in a mapping name -> tensor) in the compact encoding; numpy scalars as numbers."""
    if isinstance(inputs, dict):
        return {k: compact(v) for k, v in inputs.items()}
    if getattr(inputs, "ndim", 0) > 0 and hasattr(inputs, "tobytes"):  # a numpy array
        return encode_tensor(inputs)
    return inputs.tolist() if hasattr(inputs, "tolist") else inputs


def kwargs_parts(kwargs: dict[str, Any]) -> tuple[bytes, str]:
    """Body and kwargs repr of a message that takes keyword arguments only (predict_many, train_step, fit)."""
    shown = repr(kwargs)
    if len(shown) > KWARGSREPR_LIMIT:
        shown = shown[: KWARGSREPR_LIMIT - 3] + "..."
    return wire.body("[]", json.dumps(plain(kwargs))), shown


def training_x(x: Any) -> Any:
    """A train step's ``x`` for the wire (contract 1.3): float rows × features (a 2-D float array, or lists) as
    plain lists, exactly as before typed inputs; any other numpy array (uint8 pixels, int64 ids, more dims) as ONE
    binary tensor of the batch; a list of arrays (rows of different lengths) as one binary tensor per row; a dict
    per input name."""
    if isinstance(x, dict):
        return {k: training_x(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)) and x and all(getattr(r, "ndim", 0) > 0 for r in x):
        return [compact(r) for r in x]
    if getattr(x, "ndim", 0) > 0 and hasattr(x, "tobytes"):
        legacy = x.ndim == 2 and x.dtype.kind == "f" and x.dtype.itemsize >= 4
        return plain(x) if legacy else compact(x)
    return plain(x)


def plain(value: Any) -> Any:
    """numpy arrays and scalars to lists and numbers, so the JSON serializer takes them (also inside dicts)."""
    if hasattr(value, "tolist"):
        return value.tolist()
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    return value
