"""Training data as columns: all rows of each input of a model, as an uploaded dataset holds them.

A column is a numpy array of all rows (fixed shape per row: uint8 pixels [n, 1, 8, 8], float32 features [n, f]) or
:class:`Ragged` rows of different lengths along their first dimension (values + offsets: token ids); a model of
several inputs has one column per name. Columns are stored as ONE safetensors blob (raw bytes and a JSON header,
never pickle): ``values`` (and ``offsets``) for one input, ``<name>/values`` (and ``<name>/offsets``) per input.
:mod:`agent_workers.training.inputs` collates selected rows into the batch a model trains on.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from agent_workers.errors import InputError


@dataclasses.dataclass(frozen=True)
class Ragged:
    """Rows of different lengths along their first dimension: row i is ``values[offsets[i]:offsets[i + 1]]``.

    Attributes:
        values: every row's elements, concatenated along the first dimension.
        offsets: int64 [rows + 1], starting at 0 and non-decreasing.
    """

    values: np.ndarray
    offsets: np.ndarray

    @classmethod
    def from_rows(cls, rows: Sequence[np.ndarray]) -> Ragged:
        """Concatenate ``rows`` (arrays of one rank and one dtype, at least 1-D)."""
        lengths = np.asarray([len(r) for r in rows], dtype=np.int64)
        offsets = np.concatenate([np.zeros(1, dtype=np.int64), np.cumsum(lengths)])
        return cls(np.concatenate(list(rows)), offsets)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    @property
    def nbytes(self) -> int:
        return int(self.values.nbytes + self.offsets.nbytes)

    @property
    def dtype(self) -> np.dtype[Any]:
        return self.values.dtype

    def take(self, index: np.ndarray) -> list[np.ndarray]:
        """The rows at ``index`` (views into ``values``)."""
        return [self.values[self.offsets[i] : self.offsets[i + 1]] for i in index]

    def widest(self) -> int:
        """Elements in the longest row."""
        lengths = np.diff(self.offsets)
        rest = math.prod(self.values.shape[1:])
        return int(lengths.max(initial=0)) * rest


#: All rows of one input: a fixed-shape array [rows, ...] or ragged rows.
Column = np.ndarray | Ragged
#: A dataset's (or a message's) x: one column (a model of one input) or name -> column.
Columns = Column | dict[str, Column]
#: Selected rows of x: per input an array [n, ...] or a list of row arrays.
Part = np.ndarray | list[np.ndarray]


def n_rows(x: Columns) -> int:
    """Rows of ``x``."""
    if isinstance(x, dict):
        return len(next(iter(x.values())))
    return len(x)


def row_width(x: Columns) -> int:
    """The most elements one row of ``x`` holds (all inputs together): what a batch is checked against the limit."""
    columns = x.values() if isinstance(x, dict) else [x]
    return sum(c.widest() if isinstance(c, Ragged) else math.prod(c.shape[1:]) for c in columns)


def take(x: Columns, index: np.ndarray) -> Part | dict[str, Part]:
    """The rows of ``x`` at ``index``."""
    if isinstance(x, dict):
        return {name: take(c, index) for name, c in x.items()}  # type: ignore[misc]
    return x.take(index) if isinstance(x, Ragged) else x[index]


def typed_columns(x: Any) -> Columns | None:
    """An upload's ``x`` as typed columns, or None for the legacy form (float rows × features, as before 1.3).

    Typed forms: a dict name -> column (a model of several inputs); a list of rows of different lengths (ragged);
    a numpy array whose dtype is not floating (uint8 pixels, int64 ids, bool) or of more than 2 dims or float16.

    Raises:
        InputError: a column that cannot be read, rows that disagree in rank or dtype, or a NaN/infinity.
    """
    if isinstance(x, Mapping):
        if not x:
            raise InputError("x as an object names at least one input")
        columns = {str(name): _column(str(name), value) for name, value in x.items()}
        counts = {len(c) for c in columns.values()}
        if len(counts) != 1:
            raise InputError(f"every input of x must hold the same number of rows, got {sorted(counts)}")
        return columns
    if isinstance(x, Ragged):
        return _column("x", x)
    if isinstance(x, np.ndarray):
        if x.dtype.kind in "biu" or x.dtype == np.float16 or x.ndim > 2:
            return _column("x", x)
        return None
    if isinstance(x, (list, tuple)) and x and _ragged_rows(x):
        return _column("x", list(x))
    return None


def _ragged_rows(rows: Sequence[Any]) -> bool:
    """Rows given as arrays (or lists) whose lengths differ: the only lists read as ragged."""
    if not all(isinstance(r, (np.ndarray, list, tuple)) for r in rows):
        return False
    return len({len(r) for r in rows}) > 1


def _column(name: str, value: Any) -> Column:
    if isinstance(value, Ragged):
        column: Column = _checked(name, value)
    elif isinstance(value, (list, tuple)) and value and _ragged_rows(value):
        try:
            arrays = [_exact(np.asarray(r)) for r in value]
        except (TypeError, ValueError, OverflowError) as exc:
            raise InputError(f"x input {name!r}: every row must be numbers: {exc}") from None
        if len({a.ndim for a in arrays}) != 1 or len({a.dtype for a in arrays}) != 1 or arrays[0].ndim == 0:
            raise InputError(f"x input {name!r}: rows must share one rank (at least 1) and one dtype")
        if any(len(a) == 0 for a in arrays):
            raise InputError(f"x input {name!r}: row {next(i for i, a in enumerate(arrays) if len(a) == 0)} is empty")
        column = Ragged.from_rows(arrays)
    else:
        try:
            column = _exact(np.asarray(value))
        except (TypeError, ValueError, OverflowError) as exc:
            raise InputError(f"x input {name!r} must be numbers of one shape per row (or ragged rows): {exc}") from None
        if column.ndim < 1 or len(column) == 0:
            raise InputError(f"x input {name!r} must hold at least one row, got shape {list(column.shape)}")
        if column.ndim == 1:
            column = column.reshape(-1, 1)
    values = column.values if isinstance(column, Ragged) else column
    if values.dtype.kind == "f" and not np.isfinite(values).all():
        raise InputError(f"x input {name!r} holds NaN or infinity (or a number too large for float32)")
    return column


def _checked(name: str, ragged: Ragged) -> Ragged:
    """A Ragged from outside (a .npz): offsets int64 from 0 to len(values), each row non-empty."""
    offsets = np.asarray(ragged.offsets)
    values = _exact(np.asarray(ragged.values))
    if offsets.ndim != 1 or len(offsets) < 2 or offsets.dtype.kind not in "iu":
        raise InputError(f"x input {name!r}: offsets must be a 1-D integer array of rows + 1 entries")
    if offsets[0] != 0 or offsets[-1] != len(values) or values.ndim < 1 or (np.diff(offsets) <= 0).any():
        raise InputError(
            f"x input {name!r}: offsets must rise strictly from 0 to len(values) = {len(values)} (no empty row)"
        )
    return Ragged(values, offsets.astype(np.int64))


def _exact(array: np.ndarray) -> np.ndarray:
    """A stored dtype for ``array``: float64 as float32, integers other than uint8/int32 as int64, bool as is."""
    if array.dtype.kind == "f":
        with np.errstate(over="ignore"):
            return array.astype(np.float16 if array.dtype == np.float16 else np.float32)
    if array.dtype.kind in "iu":
        return array if array.dtype in (np.uint8, np.int32) else array.astype(np.int64)
    if array.dtype.kind == "b":
        return array
    raise InputError(f"x must hold numbers or booleans, got {array.dtype.name} values")


def to_bytes(x: Columns) -> bytes:
    """Typed columns as one safetensors blob (raw bytes plus a JSON header; never pickle): ``values`` and
    ``offsets`` for one input, ``<name>/values`` and ``<name>/offsets`` for several."""
    from safetensors.numpy import save

    tensors: dict[str, np.ndarray] = {}
    for name, column in x.items() if isinstance(x, dict) else [("", x)]:
        prefix = f"{name}/" if name else ""
        if isinstance(column, Ragged):
            tensors[prefix + "values"] = np.ascontiguousarray(column.values)
            tensors[prefix + "offsets"] = np.ascontiguousarray(column.offsets)
        else:
            tensors[prefix + "values"] = np.ascontiguousarray(column)
    return save(tensors)


def from_bytes(data: bytes) -> Columns:
    """Typed columns from :func:`to_bytes`."""
    from safetensors.numpy import load

    tensors = load(data)
    grouped: dict[str, dict[str, np.ndarray]] = {}
    for key, array in tensors.items():
        name, _, part = key.rpartition("/")
        grouped.setdefault(name, {})[part] = array
    columns = {
        name: Ragged(parts["values"], parts["offsets"]) if "offsets" in parts else parts["values"]
        for name, parts in grouped.items()
    }
    return columns[""] if set(columns) == {""} else columns


def describe(x: Columns) -> dict[str, Any]:
    """name -> {dtype, shape per row (-1: ragged)} of typed columns (``""``: the one unnamed input)."""
    out = {}
    for name, column in x.items() if isinstance(x, dict) else [("", x)]:
        if isinstance(column, Ragged):
            out[name] = {"dtype": column.dtype.name, "shape": [-1, *column.values.shape[1:]]}
        else:
            out[name] = {"dtype": column.dtype.name, "shape": list(column.shape[1:])}
    return out
