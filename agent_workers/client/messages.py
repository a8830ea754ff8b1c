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
    model_json: str,
    model: str,
    inputs: Any,
    version: int | None,
    output_encoding: str = "json",
    options: dict[str, Any] | None = None,
) -> tuple[bytes, str]:
    """Body and kwargs repr of one ``agent_workers.predict`` message in JSON (kwargs: model, inputs[, version]
    [, output_encoding][, options]).

    numpy arrays travel in the compact encoding ``{"dtype", "shape", "b64"}`` (contract 1.2), also as the values
    of a mapping of named inputs; lists travel as they are.
    """
    inputs = compact(inputs)
    try:
        inputs_json = json.dumps(inputs)
    except TypeError:  # a list of numpy scalars: the slower walk, only when needed
        inputs_json = json.dumps(plain(inputs))
    extra = "" if version is None else f', "version": {int(version)}'
    if output_encoding != "json":
        extra += f', "output_encoding": {json.dumps(output_encoding)}'
    if options is not None:  # contract 1.3: built-in outputs (top_k, softmax, normalize, outputs)
        extra += f', "options": {json.dumps(options)}'
    body = wire.body("[]", f'{{"model": {model_json}, "inputs": {inputs_json}{extra}}}')
    shown = inputs_json if len(inputs_json) <= KWARGSREPR_LIMIT else inputs_json[: KWARGSREPR_LIMIT - 3] + "..."
    return body, f"{{'model': {model!r}, 'inputs': {shown}{extra.replace(chr(34), chr(39))}}}"


def predict_parts_msgpack(
    model: str, inputs: Any, version: int | None, output_encoding: str = "json", options: dict[str, Any] | None = None
) -> tuple[bytes, str]:
    """Body and kwargs repr of one ``agent_workers.predict`` message in msgpack (contract 1.3): numpy arrays as
    ``{"dtype", "shape", "data"}`` with their raw bytes, no base64."""
    kwargs: dict[str, Any] = {"model": model, "inputs": compact(inputs, raw=True)}
    if version is not None:
        kwargs["version"] = int(version)
    if output_encoding != "json":
        kwargs["output_encoding"] = output_encoding
    if options is not None:
        kwargs["options"] = options
    return wire.msgpack_body(plain(kwargs)), short_repr(_bytes_counted(kwargs))


def _bytes_counted(value: Any) -> Any:
    """``value`` with each ``bytes`` shown as its length: the repr of a 12 KB image's bytes alone is 48 KB of text,
    built only to be cut to :data:`KWARGSREPR_LIMIT` characters."""
    if isinstance(value, bytes):
        return f"<{len(value)} bytes>"
    if isinstance(value, dict):
        return {k: _bytes_counted(v) for k, v in value.items()}
    return value


def short_repr(kwargs: dict[str, Any]) -> str:
    """The ``kwargsrepr`` header: the call's repr, cut to :data:`KWARGSREPR_LIMIT` characters."""
    shown = repr(kwargs)
    return shown if len(shown) <= KWARGSREPR_LIMIT else shown[: KWARGSREPR_LIMIT - 3] + "..."


def compact(inputs: Any, *, raw: bool = False) -> Any:
    """numpy arrays (also in a mapping name -> tensor) in the compact encoding (``raw``: bytes, for msgpack);
    numpy scalars as numbers."""
    if isinstance(inputs, dict):
        return {k: compact(v, raw=raw) for k, v in inputs.items()}
    if getattr(inputs, "ndim", 0) > 0 and hasattr(inputs, "tobytes"):  # a numpy array
        return encode_tensor(inputs, raw=raw)
    return inputs.tolist() if hasattr(inputs, "tolist") else inputs


def kwargs_parts(kwargs: dict[str, Any], serializer: str = "json") -> tuple[bytes, str]:
    """Body and kwargs repr of a message that takes keyword arguments only (predict_many, train_step, fit), in
    JSON or msgpack."""
    if serializer == "msgpack":
        return wire.msgpack_body(plain(kwargs)), short_repr(kwargs)
    return wire.body("[]", json.dumps(plain(kwargs))), short_repr(kwargs)


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
    """numpy arrays and scalars to lists and numbers, so the JSON serializer takes them (also inside dicts); bytes
    stay bytes (msgpack bin)."""
    if hasattr(value, "tolist"):
        return value.tolist()
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    return value
