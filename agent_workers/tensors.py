"""Model signatures and the tensor codec: what a model takes and returns, and how one request's tensors are checked.

A signature names a model's inputs and outputs, each with a dtype and a per-example shape (the batch dimension is
implied; ``-1`` is a variable dimension). Its JSON form, as ``models create --signature`` takes it::

    {"inputs": [{"name": "pixels", "dtype": "uint8", "shape": [3, 64, 64]}],
     "outputs": [{"name": "logits", "dtype": "float32", "shape": [10]}]}

A request carries each input tensor in one of these encodings (contracts 1.2 and 1.3, docs/tasks.md): a nested JSON
list, or ``{"dtype": ..., "shape": [...], "b64": ...}``, the base64 of the raw little-endian row-major bytes (the
only way to send float16 and bfloat16 in JSON), or, in a msgpack message only, ``{"dtype", "shape", "data"}`` with
those bytes as msgpack ``bin`` (no base64 at all). A single-input model takes its tensor as ``inputs`` directly; a
model of several inputs takes a mapping name -> tensor. :func:`decode_inputs` checks one request alone, before any
batch forms, and decodes with ``numpy.frombuffer`` (sizes are checked against the limit before anything is decoded).

numpy has no bfloat16: a bfloat16 tensor is held as its raw ``uint16`` bits and viewed as ``torch.bfloat16`` where
the model is called. This module never imports torch (producers import it through :func:`encode_tensor`).
"""

from __future__ import annotations

import binascii
import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import numpy as np
import pybase64

from agent_workers.errors import InputError, ModelError
from agent_workers.wire import b64_text

#: Every dtype a signature may name -> the numpy dtype that holds it (bfloat16: its raw bits, little-endian).
DTYPES: dict[str, np.dtype[Any]] = {
    "bool": np.dtype(np.bool_),
    "uint8": np.dtype("<u1"),
    "int32": np.dtype("<i4"),
    "int64": np.dtype("<i8"),
    "float16": np.dtype("<f2"),
    "bfloat16": np.dtype("<u2"),
    "float32": np.dtype("<f4"),
}
#: Dtypes a nested JSON list may carry; float16 and bfloat16 travel as base64 only.
LIST_DTYPES = frozenset({"bool", "uint8", "int32", "int64", "float32"})
LEGACY_INPUT = "x"
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
_ENTRY_KEYS = {"name", "dtype", "shape", "pad"}


@dataclasses.dataclass(frozen=True)
class TensorSpec:
    """One named input or output: its dtype and its shape per example (``-1``: variable)."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    #: what a variable dim is padded with in a batch (contract 1.3, worker/padding.py); written only when not 0
    pad: int | float = 0

    def to_json(self) -> dict[str, Any]:
        data = {"name": self.name, "dtype": self.dtype, "shape": list(self.shape)}
        return {**data, "pad": self.pad} if self.pad else data

    @classmethod
    def from_json(cls, data: Any) -> TensorSpec:
        """Raises: ModelError: naming what is wrong with the entry."""
        if not isinstance(data, Mapping) or not {"name", "dtype", "shape"} <= set(data) <= _ENTRY_KEYS:
            raise ModelError(f"a signature entry is {{name, dtype, shape}} (and an optional pad), got {data!r:.80}")
        name, dtype, shape = data["name"], data["dtype"], data["shape"]
        if not isinstance(name, str) or not name.isidentifier():
            raise ModelError(f"a tensor name must be an identifier (a keyword argument of forward), got {name!r:.40}")
        if dtype not in DTYPES:
            raise ModelError(f"tensor {name!r}: dtype {dtype!r:.20} is not one of {', '.join(DTYPES)}")
        if not isinstance(shape, list) or not all(type(d) is int and (d >= 1 or d == -1) for d in shape):
            raise ModelError(f"tensor {name!r}: shape must be a list of sizes >= 1 or -1 (variable), got {shape!r:.40}")
        pad = data.get("pad", 0)
        if type(pad) not in (int, float) or not math.isfinite(pad) or (DTYPES[dtype].kind != "f" and pad != int(pad)):
            raise ModelError(f"tensor {name!r}: pad must be a finite number ({dtype}), got {pad!r:.40}")
        return cls(name, dtype, tuple(shape), pad if DTYPES[dtype].kind == "f" else int(pad))


@dataclasses.dataclass(frozen=True)
class Signature:
    """A model's named, typed inputs and outputs. ``outputs`` may be empty: one unnamed float32 output."""

    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...] = ()

    def to_json(self) -> dict[str, Any]:
        return {"inputs": [t.to_json() for t in self.inputs], "outputs": [t.to_json() for t in self.outputs]}

    @classmethod
    def from_json(cls, data: Any) -> Signature:
        """Parse the JSON form (a dict, or its text).

        Raises:
            ModelError: naming what is wrong.
        """
        if isinstance(data, Signature):
            return data
        if not isinstance(data, Mapping) or not set(data) <= {"inputs", "outputs"} or "inputs" not in data:
            raise ModelError(f'a signature is {{"inputs": [...], "outputs": [...]}}, got {data!r:.80}')
        parts = []
        for part in ("inputs", "outputs"):
            entries = data.get(part, [])
            if not isinstance(entries, list):
                raise ModelError(f"signature {part} must be a list, got {type(entries).__name__}")
            parts.append(tuple(TensorSpec.from_json(e) for e in entries))
        inputs, outputs = parts
        if not inputs:
            raise ModelError("a signature needs at least one input")
        for specs in (inputs, outputs):
            names = [t.name for t in specs]
            if len(set(names)) != len(names):
                raise ModelError(f"signature names repeat: {names}")
        return cls(inputs, outputs)

    @classmethod
    def legacy(cls, input_shape: tuple[int, ...]) -> Signature:
        """An ``input_shape`` model of before signatures: one float32 input named ``x``."""
        return cls((TensorSpec(LEGACY_INPUT, "float32", tuple(input_shape)),))

    def zeros(self) -> np.ndarray | dict[str, np.ndarray]:
        """One example of zeros (variable dims of 1), as :func:`decode_inputs` returns it: to warm a model."""
        rows = {t.name: np.zeros([abs(d) for d in t.shape], dtype=DTYPES[t.dtype]) for t in self.inputs}
        return rows[self.inputs[0].name] if len(self.inputs) == 1 else rows


def decode_inputs(signature: Signature, value: Any, *, max_elements: int) -> np.ndarray | dict[str, np.ndarray]:
    """Check one request's ``inputs`` against ``signature`` and decode it: an array for a single-input model, a
    dict name -> array for several inputs.

    Raises:
        InputError: naming the input and what is wrong (encoding, dtype, shape, size, range, NaN/inf).
    """
    if len(signature.inputs) == 1:
        return decode_tensor(signature.inputs[0], value, max_elements=max_elements)
    names = [t.name for t in signature.inputs]
    if not isinstance(value, Mapping):
        raise InputError(f"this model takes several inputs: inputs must be a mapping of {names}, got {_kind(value)}")
    if set(value) != set(names):
        raise InputError(f"inputs must name exactly {names}, got {sorted(map(str, value))}")
    rows: dict[str, np.ndarray] = {}
    budget = max_elements
    for spec in signature.inputs:
        rows[spec.name] = decode_tensor(spec, value[spec.name], max_elements=budget)
        budget -= rows[spec.name].size
    return rows


def decode_tensor(spec: TensorSpec, value: Any, *, max_elements: int) -> np.ndarray:
    """One tensor, a nested list or a base64 object, checked against ``spec`` and decoded.

    Raises:
        InputError: naming ``spec.name`` and what is wrong.
    """
    if isinstance(value, Mapping):
        array = _from_bytes(spec, value, max_elements)
    elif isinstance(value, (list, tuple)):
        array = _from_list(spec, value, max_elements)
    else:
        raise InputError(
            f"input {spec.name!r} must be a nested list or {{dtype, shape, b64}} of shape {list(spec.shape)}, "
            f"got {_kind(value)}"
        )
    _check_dims(spec, array.shape)
    if array.dtype.kind == "f" and not np.isfinite(array).all():
        raise InputError(f"input {spec.name!r} contains NaN or infinity")
    if spec.dtype == "bfloat16" and not _bf16_finite(array):
        raise InputError(f"input {spec.name!r} contains NaN or infinity")
    return array


def encode_tensor(array: Any, *, raw: bool = False) -> dict[str, Any]:
    """A numpy array (or anything ``numpy.asarray`` takes) in the compact encoding ``{"dtype", "shape", "b64"}``,
    or with ``raw`` as ``{"dtype", "shape", "data"}`` holding the bytes themselves (for a msgpack message).

    float64 becomes float32 (no signature takes float64) and int types other than uint8/int32 become int64.
    """
    array = np.asarray(array)
    if array.dtype.kind == "f" and array.dtype != np.float16:
        array = array.astype("<f4")
    elif array.dtype.kind in "iu" and array.dtype not in (np.uint8, np.int32):
        array = array.astype("<i8")
    array = np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<"))
    dtype = next(name for name, dt in DTYPES.items() if dt == array.dtype and name != "bfloat16")
    if raw:
        return {"dtype": dtype, "shape": list(array.shape), "data": array.tobytes()}
    return {"dtype": dtype, "shape": list(array.shape), "b64": b64_text(array.tobytes())}


def decode_tensor_object(value: Mapping[str, Any]) -> np.ndarray:
    """A ``{dtype, shape, b64}`` (or ``data``) object as a numpy array, with no signature to check it against: for
    producers reading outputs the worker encoded (``output_encoding="b64"``). bfloat16 stays its uint16 bits.

    Raises:
        InputError: the object is not a well-formed binary tensor.
    """
    if not isinstance(value, Mapping) or set(value) not in BINARY_KEYS or value.get("dtype") not in DTYPES:
        raise InputError(f"not a binary tensor {{dtype, shape, b64}}: {value!r:.80}")
    shape = value["shape"]
    spec = TensorSpec("output", value["dtype"], tuple(-1 for _ in shape) if isinstance(shape, list) else ())
    return _from_bytes(spec, value, max_elements=2**62)


#: The keys of a binary tensor: base64 text (JSON or msgpack) or raw bytes (msgpack ``bin`` only).
BINARY_KEYS = (frozenset({"dtype", "shape", "b64"}), frozenset({"dtype", "shape", "data"}))


def _from_bytes(spec: TensorSpec, value: Mapping[str, Any], max_elements: int) -> np.ndarray:
    """A ``{dtype, shape, b64}`` or ``{dtype, shape, data}`` tensor: every size is checked against the limit and
    the shape before a byte is decoded, then the bytes are viewed in place (``numpy.frombuffer``)."""
    name = spec.name
    if set(value) not in BINARY_KEYS:
        keys = sorted(map(str, value))
        raise InputError(
            f"input {name!r}: a binary tensor is {{dtype, shape, b64}} or {{dtype, shape, data}}, got keys {keys}"
        )
    dtype, shape = value["dtype"], value["shape"]
    if dtype != spec.dtype:
        raise InputError(f"input {name!r} takes dtype {spec.dtype}, got {dtype!r:.20}")
    if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
        raise InputError(f"input {name!r}: shape must be a list of sizes >= 0, got {shape!r:.40}")
    if len(shape) != len(spec.shape):
        raise InputError(f"input {name!r} must have shape {list(spec.shape)}, got {shape}")
    count = math.prod(shape)
    if count > max_elements:
        raise InputError(f"input {name!r} has {count} elements; the limit is {max_elements}")
    want = count * DTYPES[dtype].itemsize
    raw = _raw(name, value["data"], want) if "data" in value else _unbase64(name, value["b64"], dtype, shape, want)
    return np.frombuffer(raw, dtype=DTYPES[dtype]).reshape(shape)


def _raw(name: str, data: Any, want: int) -> bytes:
    if not isinstance(data, bytes):
        raise InputError(
            f"input {name!r}: data must be raw bytes (msgpack bin; a JSON message sends b64), got {_kind(data)}"
        )
    if len(data) != want:
        raise InputError(f"input {name!r}: its shape and dtype take {want} bytes; data carries {len(data)}")
    return data


def _unbase64(name: str, text: Any, dtype: str, shape: list[int], want: int) -> bytes:
    if not isinstance(text, str):
        raise InputError(f"input {name!r}: b64 must be a base64 string, got {_kind(text)}")
    size = len(text) // 4 * 3 - text[-2:].count("=") if len(text) % 4 == 0 else -1
    if size != want:  # before decoding: the length alone says whether the bytes can fit the shape
        raise InputError(
            f"input {name!r}: shape {shape} of {dtype} takes {want} bytes; b64 carries "
            + (f"{size}" if size >= 0 else "an invalid length of base64")
        )
    try:
        return pybase64.b64decode(text, validate=True)  # SIMD: ~1 µs for 16 KB, where base64's regex takes ~30
    except (binascii.Error, ValueError) as exc:
        raise InputError(f"input {name!r}: b64 is not valid base64: {exc}") from None


def _from_list(spec: TensorSpec, value: list[Any] | tuple[Any, ...], max_elements: int) -> np.ndarray:
    name = spec.name
    if spec.dtype not in LIST_DTYPES:
        raise InputError(f"input {name!r} takes {spec.dtype}, which travels as {{dtype, shape, b64}} only")
    if spec.shape and spec.shape[0] != -1 and len(value) != spec.shape[0]:
        raise InputError(f"input {name!r} must have shape {list(spec.shape)}, got length {len(value)}")
    if len(value) > max_elements:
        raise InputError(f"input {name!r} has more than {max_elements} elements (the limit)")
    target = DTYPES[spec.dtype]
    try:
        if target.kind == "f":
            with np.errstate(over="ignore"):  # past float32's range becomes inf, refused by the caller
                array = np.asarray(value, dtype=target)
        else:
            array = np.asarray(value)
    except (ValueError, TypeError, OverflowError) as exc:  # ragged, non-numbers, an int past the float range
        raise InputError(f"input {name!r} must be numbers of shape {list(spec.shape)}: {exc}") from None
    if array.size > max_elements:
        raise InputError(f"input {name!r} has {array.size} elements; the limit is {max_elements}")
    if target.kind == "f":
        return array
    return _to_integers(spec, array, value)


def _to_integers(spec: TensorSpec, array: np.ndarray, value: Any) -> np.ndarray:
    """A list parsed by numpy, as ``spec``'s bool or integer dtype: every element in that dtype's range."""
    target = DTYPES[spec.dtype]
    if array.dtype.kind not in "biu" and array.size:  # floats, or ints past int64 (numpy makes them float64 or objects)
        past = _past_int64(value)
        if past is not None:
            raise InputError(f"input {spec.name!r} takes {spec.dtype}: {past} is past int64")
        raise InputError(
            f"input {spec.name!r} takes {spec.dtype}: every element must be an integer, got {array.dtype.name} "
            "(JSON integers past 64 bits arrive as floats)"
        )
    if array.size:
        low, high = (0, 1) if target.kind == "b" else (np.iinfo(target).min, np.iinfo(target).max)
        if array.min() < low or array.max() > high:
            raise InputError(f"input {spec.name!r} takes {spec.dtype}: elements must be from {low} to {high}")
    return array.astype(target)


def _past_int64(value: Any) -> int | None:
    """The first integer past int64 in a nested list (walked on the error path only), or None."""
    if isinstance(value, (list, tuple)):
        return next((p for p in map(_past_int64, value) if p is not None), None)
    if isinstance(value, int) and not isinstance(value, bool) and not INT64_MIN <= value <= INT64_MAX:
        return value
    return None


def _check_dims(spec: TensorSpec, shape: tuple[int, ...]) -> None:
    if len(shape) != len(spec.shape) or any(d not in (-1, s) for d, s in zip(spec.shape, shape, strict=True)):
        raise InputError(f"input {spec.name!r} must have shape {list(spec.shape)}, got {list(shape)}")
    if 0 in shape:
        raise InputError(f"input {spec.name!r} is empty (shape {list(shape)})")


def _bf16_finite(bits: np.ndarray) -> bool:
    """bfloat16 held as uint16: exponent bits all set means infinity or NaN."""
    return not bool(((bits & 0x7F80) == 0x7F80).any())


def _kind(value: Any) -> str:
    return type(value).__name__
