"""Typed training inputs: a mini-batch's ``x`` and ``y`` decoded against the model's signature and collated.

A train step's ``x`` uses the tensor encodings of inference (contract 1.3, docs/tasks.md; agent_workers/tensors.py):

* for a model of one input: a **list of rows**, each row a tensor (a nested JSON list, or ``{"dtype", "shape",
  "b64"}``), or ONE binary tensor holding the whole batch (its first dimension is the rows);
* for a model of several inputs: an object name -> (a list of rows, or one binary tensor of the batch).

Rows of a variable-length input (``-1`` in the signature) may differ in length: the batch is padded to its longest
row and carries an ``attention_mask`` (agent_workers/padding.py). ``y`` is a nested list or a binary tensor: integer
class indices stay int64 (cross-entropy), floats are float32 targets (mse).

An uploaded dataset holds the same thing as columns (agent_workers/training/columns.py); the rows a step selects
from them are collated here exactly as a message's rows are. A model of before signatures (one float32 input ``x``)
keeps its exact float32 path (:func:`agent_workers.training.steps.as_batch`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from agent_workers.errors import InputError
from agent_workers.models import ModelSpec
from agent_workers.padding import Batch, masks_of, pad_rows, pad_value
from agent_workers.tensors import DTYPES, TensorSpec, decode_tensor
from agent_workers.training.columns import Columns, Part, Ragged


def decode_x(spec: ModelSpec, x: Any, *, max_elements: int) -> Part | dict[str, Part]:
    """A message's ``x`` decoded per the model's signature (see the module doc), each row checked alone.

    Raises:
        InputError: naming the input (and the row) and what is wrong.
    """
    inputs = spec.signature.inputs
    if len(inputs) == 1:
        return _decode_part(inputs[0], x, max_elements)
    names = [t.name for t in inputs]
    if not isinstance(x, Mapping) or set(x) != set(names):
        got = sorted(map(str, x)) if isinstance(x, Mapping) else type(x).__name__
        raise InputError(f"this model takes several inputs: x must be an object naming exactly {names}, got {got}")
    parts: dict[str, Part] = {}
    budget = max_elements
    for t in inputs:
        parts[t.name] = _decode_part(t, x[t.name], budget)
        budget -= sum(p.size for p in parts[t.name]) if isinstance(parts[t.name], list) else parts[t.name].size
    return parts


def _decode_part(spec: TensorSpec, value: Any, budget: int) -> Part:
    if isinstance(value, Mapping):  # one binary tensor of the whole batch
        batch = TensorSpec(spec.name, spec.dtype, (-1, *spec.shape))
        return decode_tensor(batch, value, max_elements=budget)
    if not isinstance(value, (list, tuple)) or not value:
        raise InputError(
            f"x for input {spec.name!r} must be a non-empty list of rows or one {{dtype, shape, b64}} tensor of the "
            f"batch, got {type(value).__name__}"
        )
    rows = []
    for i, row in enumerate(value):
        try:
            rows.append(decode_tensor(spec, row, max_elements=budget))
        except InputError as exc:
            raise InputError(f"x row {i}: {exc}") from None
        budget -= rows[-1].size
    return rows


def decode_y(y: Any, rows: int, *, max_elements: int | None) -> np.ndarray:
    """A message's (or a dataset's) ``y``: integer class indices as int64, numbers as float32; one per row.

    Raises:
        InputError: not numbers, not finite, too many, or not one target (row) per row of x.
    """
    if isinstance(y, Mapping):
        dtype = y.get("dtype")
        shape = y.get("shape")
        if dtype not in DTYPES or dtype == "bfloat16" or not isinstance(shape, list) or len(shape) not in (1, 2):
            raise InputError(f"y as a binary tensor takes a dtype of {sorted(set(DTYPES) - {'bfloat16'})} and 1-2 dims")
        array = decode_tensor(TensorSpec("y", dtype, (-1,) * len(shape)), y, max_elements=max_elements or 2**62)
    else:
        try:
            array = np.asarray(y)
        except (TypeError, ValueError, OverflowError) as exc:
            raise InputError(f"y must be numbers: {exc}") from None
    if array.dtype.kind in "biu":
        array = array.astype(np.int64)
    elif array.dtype.kind == "f":
        with np.errstate(over="ignore"):
            array = array.astype(np.float32)
        if not np.isfinite(array).all():
            raise InputError("y contains NaN or infinity (or a number past float32's range, 3.4e38)")
    else:
        raise InputError(f"y must be numbers (class indices or targets), got {array.dtype.name} values")
    if array.ndim not in (1, 2) or len(array) != rows:
        raise InputError(f"y must hold one target (or row of targets) per row of x: {rows} rows, y {list(array.shape)}")
    if max_elements is not None and array.size > max_elements:
        raise InputError(
            f"y holds {array.size} numbers; the limit is {max_elements} (AGENT_WORKERS_MAX_INPUT_ELEMENTS)"
        )
    return array


def collate(spec: ModelSpec, part: Part | dict[str, Part]) -> tuple[Batch, int]:
    """Selected rows as the batch the model takes: name -> array in the signature's dtypes, rows of a variable
    input padded to the longest, and ``attention_mask`` and ``lengths`` when an input has a variable dimension
    (agent_workers/padding.py).

    Returns:
        ``(batch, rows)``.

    Raises:
        InputError: names, dtypes or shapes that do not fit the signature.
    """
    inputs = spec.signature.inputs
    if not isinstance(part, dict):
        part = {inputs[0].name: part}
    names = [t.name for t in inputs]
    if set(part) != set(names):
        raise InputError(f"the data names inputs {sorted(part)}; the model takes {names}")
    batch: dict[str, np.ndarray] = {}
    masks: dict[str, np.ndarray] | None = None
    counts = set()
    for t in inputs:
        rows = part[t.name]
        counts.add(len(rows))
        variable = [d for d, size in enumerate(t.shape) if size == -1]
        if isinstance(rows, list):
            for i, row in enumerate(rows):
                _check_shape(t, row.shape, f"row {i} of ")
            array = pad_rows([_cast(t, r) for r in rows], DTYPES[t.dtype], pad_value(t))
            if variable and masks is None:
                lengths = np.asarray([r.shape[variable[0]] for r in rows])
                masks = masks_of(lengths, array.shape[1 + variable[0]])
        else:
            _check_shape(t, rows.shape[1:], "")
            array = _cast(t, rows)
            if variable and masks is None:
                longest = rows.shape[1 + variable[0]]
                masks = masks_of(np.full(len(rows), longest), longest)
        batch[t.name] = array
    if len(counts) != 1:
        raise InputError(f"every input must hold the same number of rows, got {sorted(counts)}")
    for name, array in (masks or {}).items():
        batch.setdefault(name, array)  # an input the signature declares under that name stays the producer's
    return batch, counts.pop()


def check_columns(spec: ModelSpec, x: Columns) -> None:
    """A whole dataset's columns against the signature before a job's first commit: names, per-row shapes and
    dtypes (every value within the input's dtype), without padding anything.

    Raises:
        InputError: naming the input and what does not fit.
    """
    inputs = spec.signature.inputs
    columns = x if isinstance(x, dict) else {inputs[0].name: x}
    names = [t.name for t in inputs]
    if set(columns) != set(names):
        raise InputError(f"the dataset names inputs {sorted(columns)}; the model takes {names}")
    for t in inputs:
        column = columns[t.name]
        if isinstance(column, Ragged):
            if t.shape[:1] != (-1,):
                raise InputError(f"input {t.name!r} has shape {list(t.shape)}: its rows cannot differ in length")
            _check_shape(t, (-1, *column.values.shape[1:]), "rows of ")
            _cast(t, column.values)
        else:
            _check_shape(t, column.shape[1:], "rows of ")
            _cast(t, column)


def _check_shape(t: TensorSpec, shape: tuple[int, ...], where: str) -> None:
    if len(shape) != len(t.shape) or any(d not in (-1, s) for d, s in zip(t.shape, shape, strict=True)):
        raise InputError(f"{where}input {t.name!r} must have shape {list(t.shape)}, got {list(shape)}")
    if 0 in shape:
        raise InputError(f"{where}input {t.name!r} is empty (shape {list(shape)})")


def _cast(t: TensorSpec, array: np.ndarray) -> np.ndarray:
    """``array`` in input ``t``'s dtype: safe casts (uint8 pixels to float32), and integral floats to an integer
    dtype within its range (a dataset of token ids uploaded as float32 lists); anything else is refused."""
    target = DTYPES[t.dtype]
    if array.dtype == target or np.can_cast(array.dtype, target, "safe"):
        return array.astype(target, copy=False)
    if target.kind in "iu" and array.dtype.kind in "iuf" and array.size:
        info = np.iinfo(target)
        if (array.dtype.kind in "iu" or bool((array == np.round(array)).all())) and (
            array.min() >= info.min and array.max() <= info.max
        ):
            return array.astype(target)
    raise InputError(f"input {t.name!r} takes {t.dtype}; the data holds {array.dtype.name} that does not fit it")
