"""Pre- and post-processing hooks an architecture declares with its registration (TorchServe's handler, LitServe's
``decode_request``/``batch``/``unbatch``): what turns what an application has into tensors and back.

* ``preprocess(raw, artifacts) -> tensors``: one request's raw ``inputs`` (contract 1.3: by convention an object of
  named fields, text as a string, bytes as ``{"b64": ...}``) into the example the signature describes, an array or
  name -> array. It runs in the worker's preprocessing threads (``AGENT_WORKERS_PREPROCESS_THREADS``), never on
  the event loop; whatever it raises fails that request alone.
* ``collate(examples) -> batch``: the examples of one forward pass as one batch (default: stack them).
* ``postprocess(outputs, artifacts, options) -> answers``: a batch's per-example outputs, with each request's
  :class:`~agent_workers.outputs.OutputOptions`, into one JSON-ready answer each (default: the built-in outputs).

Declared in one registration::

    from agent_workers import register_architecture
    from agent_workers.hooks import raw_bytes

    def decode_png(raw, artifacts):
        image = PIL.Image.open(io.BytesIO(raw_bytes(raw, "image"))).convert("L").resize((8, 8))
        return numpy.asarray(image, dtype=numpy.uint8)[None]

    @register_architecture("digits_cnn", signature=..., preprocess=decode_png)
    def build(**config): ...

``artifacts`` is the model version's :class:`~agent_workers.store.artifacts.Artifacts` (labels, a tokenizer, ...).
"""

from __future__ import annotations

import binascii
import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import pybase64

from agent_workers import outputs
from agent_workers.errors import AgentWorkersError, InputError, ModelError
from agent_workers.store.artifacts import Artifacts
from agent_workers.tensors import DTYPES, Signature, TensorSpec

Preprocess = Callable[[Any, Artifacts], Any]
Collate = Callable[[list[Any]], Any]
Postprocess = Callable[[list[Any], Artifacts, list["outputs.OutputOptions | None"]], list[Any]]


@dataclasses.dataclass(frozen=True)
class Hooks:
    """An architecture's hooks; None is the default (decode the tensors / stack / the built-in outputs)."""

    preprocess: Preprocess | None = None
    collate: Collate | None = None
    postprocess: Postprocess | None = None


NO_HOOKS = Hooks()
_HOOKS: dict[str, Hooks] = {}


def register(arch: str, hooks: Hooks) -> None:
    """Declare ``arch``'s hooks (called by :func:`~agent_workers.models.register_architecture`)."""
    if hooks == NO_HOOKS:
        _HOOKS.pop(arch, None)
    else:
        _HOOKS[arch] = hooks


def hooks_of(arch: str) -> Hooks:
    """The hooks ``arch`` registered (:data:`NO_HOOKS` when none)."""
    return _HOOKS.get(arch, NO_HOOKS)


def raw_bytes(raw: Any, field: str, *, max_bytes: int = 16 * 1024 * 1024) -> bytes:
    """The bytes of raw input field ``field`` sent as ``{"field": {"b64": "..."}}``: for preprocess hooks.

    Raises:
        InputError: the field is missing, not ``{"b64": str}``, not base64, or over ``max_bytes``.
    """
    value = raw.get(field) if isinstance(raw, Mapping) else None
    if not isinstance(value, Mapping) or set(value) != {"b64"} or not isinstance(value["b64"], str):
        raise InputError(f'inputs must be {{"{field}": {{"b64": "<base64 bytes>"}}}}, got {_shown(raw)}')
    if len(value["b64"]) // 4 * 3 > max_bytes:
        raise InputError(f"inputs.{field} is over {max_bytes} bytes")
    try:
        return pybase64.b64decode(value["b64"], validate=True)
    except (binascii.Error, ValueError) as exc:
        raise InputError(f"inputs.{field}.b64 is not valid base64: {exc}") from None


def raw_text(raw: Any, field: str, *, max_chars: int = 1_000_000) -> str:
    """The text of raw input field ``field`` sent as ``{"field": "..."}``: for preprocess hooks.

    Raises:
        InputError: the field is missing, not a string, or over ``max_chars``.
    """
    value = raw.get(field) if isinstance(raw, Mapping) else None
    if not isinstance(value, str):
        raise InputError(f'inputs must be {{"{field}": "<text>"}}, got {_shown(raw)}')
    if len(value) > max_chars:
        raise InputError(f"inputs.{field} is {len(value)} characters; at most {max_chars}")
    return value


def prepare(hooks: Hooks, signature: Signature, raw: Any, artifacts: Artifacts, *, max_elements: int) -> Any:
    """Run ``hooks.preprocess`` on one request's raw inputs and check what it made against ``signature``.

    Returns:
        The example, as :func:`~agent_workers.tensors.decode_inputs` returns it (an array, or name -> array).
    Raises:
        InputError: the hook refused the input (any exception of its own is reported as the input's fault).
        ModelError: what the hook made does not fit the signature (a bug in the hook), or an artifact is missing.
    """
    assert hooks.preprocess is not None
    try:
        made = hooks.preprocess(raw, artifacts)
    except AgentWorkersError:
        raise
    except Exception as exc:  # noqa: BLE001 - a bad image or text: this request alone fails, with the reason
        raise InputError(f"preprocessing refused this input: {type(exc).__name__}: {str(exc)[:300]}") from None
    if len(signature.inputs) == 1:
        made = {signature.inputs[0].name: made.get(signature.inputs[0].name) if isinstance(made, dict) else made}
    if not isinstance(made, Mapping) or set(made) != {t.name for t in signature.inputs}:
        raise ModelError(f"preprocess must return the inputs {[t.name for t in signature.inputs]}, got {_shown(made)}")
    rows = {t.name: _conform(t, made[t.name]) for t in signature.inputs}
    if sum(a.size for a in rows.values()) > max_elements:
        raise InputError(f"this input preprocesses to more than {max_elements} numbers (the limit)")
    return rows[signature.inputs[0].name] if len(rows) == 1 else rows


def answers(
    hooks: Hooks,
    signature: Signature,
    artifacts: Artifacts,
    rows: list[Any],
    options: list[outputs.OutputOptions | None],
) -> list[dict[str, Any] | Exception]:
    """The answer fields of each example of a batch (``{"outputs": ...}`` or ``{"top_k": ...}``), or its error.

    A row that is already an error stays one. A postprocess hook gets the batch's rows together; if it raises, the
    rows are bisected so only the culprits fail.
    """
    result: list[dict[str, Any] | Exception] = list(rows)
    live = [i for i, r in enumerate(rows) if not isinstance(r, Exception)]
    if hooks.postprocess is None:
        for i in live:
            try:
                result[i] = outputs.apply(rows[i], signature, artifacts.labels, options[i])
            except AgentWorkersError as exc:
                result[i] = exc
        return result
    if live:
        made = _postprocess(hooks, artifacts, [rows[i] for i in live], [options[i] for i in live])
        for i, answer in zip(live, made, strict=True):
            result[i] = answer
    return result


def _postprocess(
    hooks: Hooks, artifacts: Artifacts, rows: list[Any], options: list[outputs.OutputOptions | None]
) -> list[dict[str, Any] | Exception]:
    """The postprocess hook over ``rows`` together; if it raises, over each half, down to the culprits."""
    assert hooks.postprocess is not None
    try:
        made = hooks.postprocess(rows, artifacts, options)
        if not isinstance(made, list) or len(made) != len(rows):
            raise ModelError(f"postprocess must return a list of {len(rows)} answers, got {_shown(made)}")
        return [{"outputs": answer} for answer in made]
    except Exception as exc:  # noqa: BLE001 - isolated by bisection, like a failing forward pass
        if len(rows) == 1:
            return [exc if isinstance(exc, AgentWorkersError) else ModelError(f"postprocess failed: {exc}")]
        mid = len(rows) // 2
        return _postprocess(hooks, artifacts, rows[:mid], options[:mid]) + _postprocess(
            hooks, artifacts, rows[mid:], options[mid:]
        )


def _conform(spec: TensorSpec, value: Any) -> np.ndarray:
    """What a preprocess hook made for input ``spec``, as that input's dtype and shape."""
    array = np.asarray(value)
    target = DTYPES[spec.dtype]
    if array.dtype != target:
        if not np.can_cast(array.dtype, target, "same_kind"):
            raise ModelError(f"preprocess made {spec.name!r} as {array.dtype}; the signature takes {spec.dtype}")
        array = array.astype(target)
    if array.ndim != len(spec.shape) or any(d not in (-1, s) for d, s in zip(spec.shape, array.shape, strict=True)):
        raise ModelError(
            f"preprocess made {spec.name!r} of shape {list(array.shape)}; the signature takes {list(spec.shape)}"
        )
    if 0 in array.shape:
        raise InputError(f"this input preprocesses to an empty {spec.name!r} (shape {list(array.shape)})")
    return np.ascontiguousarray(array)


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."
