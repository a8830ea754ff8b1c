"""Built-in outputs a predict request can ask for (contract 1.3, docs/tasks.md "Outputs"): ``top_k`` with labels,
``softmax``, ``normalize`` and ``outputs``.

A request names them in its ``options`` argument, e.g. ``{"top_k": 3, "softmax": true}``; they are checked with
the request's other arguments (:func:`parse_options`, a bad one fails that request alone) and applied to each
example's outputs after the forward pass (:func:`apply`):

* ``outputs``: a list of output names; the answer carries only those (a model of several named outputs).
* ``softmax``: the softmax of each floating output over its last axis.
* ``normalize``: each floating output divided by its L2 norm over its last axis (embeddings).
* ``top_k``: the k largest values of the one output left (1-D per example), after ``softmax`` when asked, as
  ``[{"label", "index", "score"}]`` best first, labels from the model's ``labels`` artifact (null without one).
  The answer then carries ``top_k`` in place of ``outputs``.

It also owns how a result carries an output row: :func:`result_output` (JSON), :func:`encoded_output` (the
request's ``output_encoding``), :func:`plain_output` (Python lists). numpy only: producers import this module
through the contract.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import numpy as np

from agent_workers.errors import InputError, ModelError
from agent_workers.tensors import Signature, encode_tensor

BUILT_IN = ("top_k", "softmax", "normalize", "outputs")
MAX_TOP_K = 1000
#: The smallest norm ``normalize`` divides by (as ``torch.nn.functional.normalize``): a zero vector stays zero.
NORM_EPS = 1e-12


@dataclasses.dataclass(frozen=True)
class OutputOptions:
    """One request's checked ``options``. ``extra`` holds keys that are not built in, for a postprocess hook."""

    top_k: int | None = None
    softmax: bool = False
    normalize: bool = False
    outputs: tuple[str, ...] | None = None
    extra: Mapping[str, Any] = dataclasses.field(default_factory=dict)


def parse_options(value: Any) -> OutputOptions | None:
    """Check a request's ``options`` (None when it has none).

    Raises:
        InputError: naming the option and what is wrong.
    """
    if value is None:
        return None
    if not isinstance(value, Mapping):
        raise InputError(f'options must be an object such as {{"top_k": 5}}, got {type(value).__name__}')
    top_k = value.get("top_k")
    if top_k is not None and (type(top_k) is not int or not 1 <= top_k <= MAX_TOP_K):
        raise InputError(f"options.top_k must be an integer from 1 to {MAX_TOP_K}, got {top_k!r:.40}")
    flags = {}
    for name in ("softmax", "normalize"):
        flags[name] = value.get(name, False)
        if not isinstance(flags[name], bool):
            raise InputError(f"options.{name} must be true or false, got {flags[name]!r:.40}")
    outputs = value.get("outputs")
    if outputs is not None:
        if not isinstance(outputs, list) or not outputs or not all(isinstance(n, str) for n in outputs):
            raise InputError(f"options.outputs must be a non-empty list of output names, got {outputs!r:.80}")
        if len(set(outputs)) != len(outputs):
            raise InputError(f"options.outputs names an output twice: {outputs!r:.80}")
        outputs = tuple(outputs)
    extra = {k: v for k, v in value.items() if k not in BUILT_IN}
    return OutputOptions(top_k, flags["softmax"], flags["normalize"], outputs, extra)


def apply(row: Any, signature: Signature, labels: list[str] | None, options: OutputOptions | None) -> dict[str, Any]:
    """One example's answer fields: ``{"outputs": ...}`` (arrays, encoded for the result by :func:`encoded_output`),
    or ``{"top_k": [...]}`` when ``top_k`` was asked.

    Args:
        row: the example's output, an array or a mapping name -> array (several named outputs).
        signature: the model's, whose output names ``outputs`` may select.
        labels: the model's ``labels`` artifact, or None.

    Raises:
        InputError: the options do not fit this model's outputs (an unknown name, top_k of several outputs).
        ModelError: the labels do not match the classes of the output.
    """
    if options is None:
        return {"outputs": row}
    if options.extra:
        raise InputError(
            f"options {sorted(options.extra)} are not built in ({', '.join(BUILT_IN)}) and this model's "
            "architecture declares no postprocess hook to read them"
        )
    if options.outputs is not None:
        row = _select(row, signature, options.outputs)
    for flag, fn in (("softmax", softmax), ("normalize", normalize)):
        if getattr(options, flag):
            row = {k: _floating(v, fn) for k, v in row.items()} if isinstance(row, dict) else _floating(row, fn)
    if options.top_k is None:
        return {"outputs": row}
    return {"top_k": top_k(_one(row), options.top_k, labels)}


def softmax(x: np.ndarray) -> np.ndarray:
    """Softmax over the last axis, in float64."""
    z = x.astype(np.float64) - x.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def normalize(x: np.ndarray) -> np.ndarray:
    """``x`` over its L2 norm along the last axis, in float64 (a zero vector stays zero)."""
    x = x.astype(np.float64)
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), NORM_EPS)


def top_k(scores: np.ndarray, k: int, labels: list[str] | None) -> list[dict[str, Any]]:
    """The ``k`` best of one example's 1-D ``scores``: ``[{"label", "index", "score"}]``, best first (ties: lower
    index first).

    Raises:
        InputError: ``scores`` is not 1-D or has fewer than ``k`` entries.
        ModelError: ``labels`` does not name every class.
    """
    if scores.ndim != 1:
        raise InputError(f"top_k needs an output of one dimension per example, this one has shape {list(scores.shape)}")
    if k > scores.shape[0]:
        raise InputError(f"top_k={k} but the output has {scores.shape[0]} classes")
    if labels is not None and len(labels) != scores.shape[0]:
        raise ModelError(f"the model's labels artifact names {len(labels)} classes; its output has {scores.shape[0]}")
    order = np.argsort(-scores.astype(np.float64), kind="stable")[:k]
    return [{"label": None if labels is None else labels[i], "index": int(i), "score": float(scores[i])} for i in order]


def _select(row: Any, signature: Signature, names: tuple[str, ...]) -> Any:
    if not isinstance(row, dict):
        declared = [t.name for t in signature.outputs]
        if len(declared) == 1 and names == (declared[0],):
            return row
        raise InputError(f"options.outputs {list(names)}: this model returns one output named {declared or 'nothing'}")
    unknown = [n for n in names if n not in row]
    if unknown:
        raise InputError(f"options.outputs names {unknown}; this model's outputs are {sorted(row)}")
    return {n: row[n] for n in names}


def _one(row: Any) -> np.ndarray:
    if not isinstance(row, dict):
        return row
    if len(row) != 1:
        raise InputError(f"top_k ranks one output: name it with options.outputs (this model returns {sorted(row)})")
    return next(iter(row.values()))


def _floating(x: np.ndarray, fn: Any) -> np.ndarray:
    return fn(x) if x.dtype.kind == "f" else x


def plain_output(row: Any) -> Any:
    """One output row as JSON-ready lists (floats as float64 print exactly as float32 does through json)."""
    if isinstance(row, dict):
        return {k: v.tolist() for k, v in row.items()}
    return row.tolist()


def result_output(row: Any) -> Any:
    """One output row for the result record, serialized by orjson: float32 widened so it prints the same digits
    as every other path (``json`` of ``float(float32)``); ints and bools as they are."""
    if isinstance(row, dict):
        return {k: _widened(v) for k, v in row.items()}
    return _widened(row)


def encoded_output(row: Any, encoding: str) -> Any:
    """One output row as the request's ``output_encoding`` asks (contract 1.3): ``"json"`` as
    :func:`result_output`, ``"b64"`` as ``{"dtype", "shape", "b64"}`` per output (float32 stays float32: 4 bytes a
    number in 5.3 characters of base64, where JSON prints up to 24)."""
    if encoding == "json":
        return result_output(row)
    if isinstance(row, dict):
        return {k: encode_tensor(v) for k, v in row.items()}
    return encode_tensor(row)


def _widened(array: np.ndarray) -> np.ndarray:
    return array.astype(np.float64) if array.dtype.kind == "f" else array
