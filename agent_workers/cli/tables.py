"""Rows of numbers from the files operators have: .npy, .npz, .csv (a header row is skipped), .json, .parquet."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import click


def _number(text: str, path: Path, line: int, column: int) -> float:
    try:
        return float(text)
    except ValueError:
        raise click.ClickException(
            f"{path}:{line} column {column}: {text!r} is not a number; every row after an optional header must be "
            "numbers only"
        ) from None


def read_csv(path: Path) -> list[list[float]]:
    """The numeric rows of a CSV file; a first row that is not all numbers is taken as a header and skipped."""
    with path.open(newline="") as f:
        rows = [(i, row) for i, row in enumerate(csv.reader(f), start=1) if row]
    if rows and not _all_numbers(rows[0][1]):
        rows = rows[1:]
    return [[_number(v, path, line, col) for col, v in enumerate(row, start=1)] for line, row in rows]


def _all_numbers(row: list[str]) -> bool:
    try:
        [float(v) for v in row]
    except ValueError:
        return False
    return True


def read_array(path: Path) -> Any:
    """A 2-D numpy array from .npy, .csv, .json or .parquet (a 1-D .npy or JSON list is one row)."""
    import numpy as np

    suffix = path.suffix.lower()
    if suffix == ".npy":
        try:
            data = np.load(path, allow_pickle=False)
        except ValueError as exc:
            raise click.ClickException(f"{path}: not a numeric .npy file ({exc})") from None
    elif suffix == ".csv":
        data = np.asarray(read_csv(path), dtype=np.float64)
    elif suffix == ".parquet":
        data = _parquet(path)
    elif suffix == ".json":
        try:
            data = np.asarray(json.loads(path.read_text()), dtype=np.float64)
        except (ValueError, TypeError) as exc:
            raise click.ClickException(f"{path}: not a JSON list of numbers or of rows of numbers ({exc})") from None
    else:
        raise click.ClickException(f"{path}: unknown file type {suffix!r}; use .npy, .npz, .csv, .json or .parquet")
    if data.ndim == 1:
        data = data.reshape(1, -1)  # one example, not N one-number examples
    if data.ndim != 2:
        raise click.ClickException(f"{path}: expected rows × features, got shape {list(data.shape)}")
    return data


def _parquet(path: Path) -> Any:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise click.ClickException(f"{path}: reading parquet needs pyarrow (pip install pyarrow)") from None
    import numpy as np

    table = pq.read_table(path)
    return np.column_stack([table.column(i).to_numpy() for i in range(table.num_columns)]).astype(np.float64)


def read_rows(path: Path) -> list[Any]:
    """The rows to score: JSON rows are passed on as written (a bad row is the worker's to refuse, by index)."""
    if path.suffix.lower() == ".json":
        try:
            data = json.loads(path.read_text())
        except ValueError as exc:
            raise click.ClickException(f"{path}: not JSON ({exc})") from None
        if isinstance(data, list) and data and all(isinstance(r, list) for r in data):
            return data
        return [data]  # one example
    return read_array(path).tolist()


def read_xy(path: Path) -> tuple[Any, Any]:
    """A training dataset: ``x`` and ``y`` arrays of a .npz, or the last column of any table as ``y``."""
    import numpy as np

    if path.suffix.lower() == ".npz":
        with np.load(path, allow_pickle=False) as data:
            arrays = {name: data[name] for name in data.files}
        if "y" not in arrays or not any(name == "x" or name.startswith(("x_", "x.")) for name in arrays):
            raise click.ClickException(
                f"{path}: a .npz dataset needs arrays x and y (np.savez(f, x=, y=)); ragged rows as x_values and "
                "x_offsets; several inputs as x.NAME (or x.NAME.values and x.NAME.offsets)"
            )
        return _typed_x(arrays), arrays["y"]
    table = read_array(path)
    if table.shape[1] < 2:
        raise click.ClickException(f"{path}: needs at least two columns (features, then the target in the last)")
    return table[:, :-1], table[:, -1]


def _typed_x(arrays: dict[str, Any]) -> Any:
    """x of a .npz: ``x``; ragged ``x_values`` + ``x_offsets``; or ``x.NAME`` / ``x.NAME.values`` +
    ``x.NAME.offsets`` per input (docs/training.md, "Typed inputs")."""
    from agent_workers.training.columns import Ragged

    if "x" in arrays:
        return arrays["x"]
    if "x_values" in arrays and "x_offsets" in arrays:
        return Ragged(arrays["x_values"], arrays["x_offsets"])
    named: dict[str, Any] = {}
    for key, array in arrays.items():
        if key.startswith("x."):
            name, _, part = key[2:].partition(".")
            if part == "values":
                named[name] = Ragged(array, arrays[f"x.{name}.offsets"])
            elif not part:
                named[name] = array
    if not named:
        raise click.ClickException("a .npz dataset's x: x, x_values + x_offsets, or x.NAME per input")
    return named
