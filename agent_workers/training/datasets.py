"""Training datasets uploaded once to Redis as ``.npy`` bytes (never pickled) and sliced by row indices.

A dataset has a name (a uuid when none is given), ``x`` (rows × features, float32; or typed columns, stored as one
safetensors blob: uint8 pixels, int64 token ids of different lengths as values + offsets, several named inputs; see
agent_workers/training/columns.py), ``y`` (one target per row) and
a small ``meta`` record (rows, features, upload time, upload id); all three keys are written together and expire
together, after ``DEFAULT_TTL`` (7 days) unless the upload says otherwise (``ttl=0``: never). Each upload gets an
id in ``meta``; a reader checks it on every read, so a re-upload or a delete is seen at once by every worker.
"""

from __future__ import annotations

import dataclasses
import io
import json
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Iterator
from typing import Any

import numpy as np
import redis

from agent_workers.config import Settings
from agent_workers.errors import InputError
from agent_workers.keys import Keys, name_problem
from agent_workers.redis_clients import redis_client
from agent_workers.training import columns
from agent_workers.training.columns import Columns

DEFAULT_TTL = 7 * 24 * 3600
DEFAULT_CACHE_BYTES = 1024 * 1024 * 1024  # config.DEFAULT_DATASET_CACHE_BYTES


def _to_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(array), allow_pickle=False)
    return buf.getvalue()


def _from_bytes(data: bytes) -> np.ndarray:
    return np.load(io.BytesIO(data), allow_pickle=False)


@dataclasses.dataclass(frozen=True)
class Dataset:
    """One upload of a dataset, decoded.

    Attributes:
        name: the dataset's name.
        upload: the id of this upload (a fresh uuid per upload): a re-upload under the same name has another.
        x: rows × features, float32; or typed columns (agent_workers/training/columns.py: an array of any signature
            dtype and shape per row, :class:`~agent_workers.training.columns.Ragged` rows, or name -> column).
        y: one target per row (1-D, or rows × outputs).
    """

    name: str
    upload: str
    x: Columns
    y: np.ndarray

    @property
    def nbytes(self) -> int:
        parts = self.x.values() if isinstance(self.x, dict) else [self.x]
        return int(sum(c.nbytes for c in parts) + self.y.nbytes)


def check_arrays(x: Any, y: Any) -> tuple[np.ndarray, np.ndarray]:
    """``x`` as a float32 rows × features array and ``y`` as a numeric array of one target (or row of targets) per
    row, every number finite.

    Raises:
        InputError: not numeric, wrong shapes, or a NaN/infinity, naming the first bad row.
    """
    try:
        with np.errstate(over="ignore"):  # a float64 too large for float32 becomes inf, refused below
            xa = np.asarray(x, dtype=np.float32)
        ya = np.asarray(y)
    except (TypeError, ValueError, OverflowError) as exc:
        raise InputError(f"x and y must be numeric arrays: {exc}") from None
    if xa.ndim == 1:
        xa = xa.reshape(-1, 1)
    if xa.ndim != 2 or len(xa) == 0:
        raise InputError(f"x must be a non-empty 2-D array (rows × features), got shape {list(xa.shape)}")
    if ya.dtype.kind not in "biuf":
        raise InputError(f"y must hold numbers, got {ya.dtype} values")
    if ya.ndim not in (1, 2):
        raise InputError(f"y must be one target per row (1-D) or rows × outputs (2-D), got shape {list(ya.shape)}")
    if len(xa) != len(ya):
        raise InputError(f"x has {len(xa)} rows but y has {len(ya)}")
    for what, array in (("x", xa), ("y", ya)):
        finite = np.isfinite(array).reshape(len(array), -1).all(axis=1)
        if not finite.all():
            row = int(np.flatnonzero(~finite)[0])
            raise InputError(
                f"{what} row {row} holds NaN or infinity (or a number too large for float32); "
                f"{int((~finite).sum())} row(s) in all: clean the data and upload again"
            )
    return xa, ya


class DatasetStore:
    """Upload and read training datasets.

    Every upload gets an id; a read checks the dataset's small ``meta`` record (one GET) against the cached upload,
    so a re-upload or a delete is seen by every worker at its next read. Decoded datasets are cached per (name,
    upload id), least recently used dropped beyond ``cache_bytes``.

    Args:
        client: redis-py client of the parameter store.
        keys: the namespace's key builder.
        cache_bytes: bytes of decoded datasets this process keeps (``AGENT_WORKERS_DATASET_CACHE_BYTES``; 0: none).
    """

    def __init__(self, *, client: redis.Redis, keys: Keys, cache_bytes: int = DEFAULT_CACHE_BYTES) -> None:
        self.client = client
        self.keys = keys
        self.cache_bytes = cache_bytes
        self._cache: OrderedDict[str, Dataset] = OrderedDict()  # name -> its newest upload read here
        self._lock = threading.Lock()  # pool threads share one store

    @classmethod
    def from_settings(cls, settings: Settings) -> DatasetStore:
        """A store on ``settings.params_url`` in ``settings.namespace``."""
        return cls(
            client=redis_client(settings.params_url, sentinel_master=settings.sentinel_master),
            keys=Keys(settings.namespace),
            cache_bytes=settings.dataset_cache_bytes,
        )

    def upload(self, x: Any, y: Any, *, dataset_id: str | None = None, ttl: int = DEFAULT_TTL) -> str:
        """Store ``x`` (rows × features; a 1-D ``x`` is one feature per row) and ``y`` (one target per row), checked
        once here (numeric, finite, shapes) so that training never meets a bad row halfway.

        Args:
            dataset_id: the dataset's name; an existing dataset of that name is replaced (every worker sees the new
                upload at its next read). A uuid when omitted.
            ttl: seconds until the dataset expires; 0 keeps it until deleted.
        Returns:
            The dataset id.
        Raises:
            InputError: a bad name; ``x`` and ``y`` disagree on the number of rows, are not numeric 1-D/2-D, or hold
                NaN or infinity (the first bad row is named).
        """
        if dataset_id is not None:
            problem = name_problem(dataset_id, "dataset name")
            if problem:
                raise InputError(problem)
        if ttl < 0:
            raise InputError("ttl must be >= 0 seconds (0: never expires)")
        typed = columns.typed_columns(x)
        if typed is None:
            xa, ya = check_arrays(x, y)
            rows, features, x_bytes = int(xa.shape[0]), int(xa.shape[1]), _to_bytes(xa)
        else:
            rows, features, x_bytes = columns.n_rows(typed), None, columns.to_bytes(typed)
            _, ya = check_arrays(np.zeros((rows, 1), dtype=np.float32), y)
        dataset_id = dataset_id or uuid.uuid4().hex
        meta: dict[str, Any] = {
            "rows": rows,
            "features": features,
            "y_shape": list(ya.shape),
            "at": time.time(),
            "upload": uuid.uuid4().hex,
        }
        if typed is not None:
            meta["inputs"] = columns.describe(typed)  # its presence marks x as typed columns (safetensors)
        ex = ttl or None
        pipe = self.client.pipeline(transaction=True)  # the three keys change together: a reader sees one upload
        pipe.set(self.keys.dataset(dataset_id, "x"), x_bytes, ex=ex)
        pipe.set(self.keys.dataset(dataset_id, "y"), _to_bytes(ya), ex=ex)
        pipe.set(self.keys.dataset(dataset_id, "meta"), json.dumps(meta), ex=ex)
        pipe.execute()
        with self._lock:
            self._cache.pop(dataset_id, None)
        return dataset_id

    def info(self, dataset_id: str) -> DatasetInfo:
        """Rows, features, size and remaining lifetime of one dataset.

        Raises:
            InputError: no such dataset (or it expired).
        """
        keys = [self.keys.dataset(dataset_id, part) for part in ("x", "y", "meta")]
        pipe = self.client.pipeline(transaction=False)
        for key in keys[:2]:
            pipe.strlen(key)
        pipe.get(keys[2])
        pipe.ttl(keys[0])
        x_bytes, y_bytes, raw_meta, ttl = pipe.execute()
        if not x_bytes:
            raise InputError(f"dataset {dataset_id!r} does not exist or expired; upload it again")
        meta = json.loads(raw_meta) if raw_meta else {}
        return DatasetInfo(
            name=dataset_id,
            rows=meta.get("rows"),
            features=meta.get("features"),
            bytes=int(x_bytes) + int(y_bytes),
            expires_in=None if ttl < 0 else int(ttl),
            uploaded_at=meta.get("at"),
            upload=meta.get("upload"),
            inputs=meta.get("inputs"),
        )

    def list(self) -> list[DatasetInfo]:
        """Every dataset of the namespace, by name."""
        prefix, suffix = self.keys.dataset("", "x").split("{}")
        names = sorted(
            raw.decode()[len(prefix) + 1 : -len(suffix) - 1]
            for raw in self.client.scan_iter(match=prefix + "*" + suffix, count=1000)
        )
        found = []
        for name in names:
            try:
                found.append(self.info(name))
            except InputError:
                continue  # expired between the scan and the read
        return found

    def delete(self, dataset_id: str) -> bool:
        """Delete a dataset; False when there was none. Every worker sees it gone at its next read."""
        with self._lock:
            self._cache.pop(dataset_id, None)
        return bool(self.client.delete(*(self.keys.dataset(dataset_id, part) for part in ("x", "y", "meta"))))

    def get(self, dataset_id: str) -> Dataset:
        """The dataset's current upload: one small GET of its ``meta`` when this process holds that upload, else
        one MGET of the three keys (written together, so they are one upload).

        Raises:
            InputError: no such dataset (deleted, or expired).
        """
        if not isinstance(dataset_id, str):
            raise InputError(f"dataset must be a dataset name (a string), got {type(dataset_id).__name__}")
        meta_key = self.keys.dataset(dataset_id, "meta")
        with self._lock:
            hit = self._cache.get(dataset_id)
        if hit is not None:
            current = _upload_of(self.client.get(meta_key))
            if current == hit.upload:
                with self._lock:
                    if dataset_id in self._cache:
                        self._cache.move_to_end(dataset_id)
                return hit
        raw_meta, x, y = self.client.mget(
            meta_key, self.keys.dataset(dataset_id, "x"), self.keys.dataset(dataset_id, "y")
        )
        if x is None or y is None:
            with self._lock:
                self._cache.pop(dataset_id, None)
            raise InputError(f"dataset {dataset_id!r} does not exist (deleted or expired); upload it again")
        typed = raw_meta is not None and "inputs" in json.loads(raw_meta)
        data = Dataset(
            dataset_id, _upload_of(raw_meta) or "", columns.from_bytes(x) if typed else _from_bytes(x), _from_bytes(y)
        )
        self._remember(data)
        return data

    def load(self, dataset_id: str) -> tuple[Columns, np.ndarray]:
        """The whole dataset's current upload as ``(x, y)`` (see :meth:`get`)."""
        data = self.get(dataset_id)
        return data.x, data.y

    def _remember(self, data: Dataset) -> None:
        with self._lock:
            self._cache.pop(data.name, None)
            if data.nbytes > self.cache_bytes:
                return
            self._cache[data.name] = data
            total = sum(d.nbytes for d in self._cache.values())
            while total > self.cache_bytes:
                _, dropped = self._cache.popitem(last=False)
                total -= dropped.nbytes

    @property
    def cached_bytes(self) -> int:
        """Bytes of decoded datasets this process holds now."""
        with self._lock:
            return sum(d.nbytes for d in self._cache.values())

    def rows(self, dataset_id: str, rows: Any, *, max_elements: int | None = None) -> tuple[Any, np.ndarray]:
        """The rows ``rows`` (a list of indices) of a dataset's current upload (of typed columns: per input an array
        or a list of ragged rows, as :func:`agent_workers.training.columns.take` selects them).

        Args:
            max_elements: the most numbers the selected ``x`` (and ``y``) may hold
                (``AGENT_WORKERS_MAX_INPUT_ELEMENTS``), checked before anything is allocated.

        Raises:
            InputError: no such dataset, ``rows`` not a non-empty list of indices in range, or too many numbers.
        """
        if not isinstance(rows, (list, tuple, np.ndarray)) or len(rows) == 0:
            raise InputError("rows must be a non-empty list of integer row indices")
        data = self.get(dataset_id)
        width = max(columns.row_width(data.x), row_width(data.y))
        if max_elements is not None and len(rows) * width > max_elements:
            raise InputError(
                f"{len(rows)} rows × {width} numbers each exceed AGENT_WORKERS_MAX_INPUT_ELEMENTS={max_elements}; "
                "send fewer rows per step"
            )
        try:
            index = np.asarray(rows)
        except (TypeError, ValueError, OverflowError):
            index = np.asarray([None])
        if index.dtype.kind not in "iu":  # floats, booleans, strings, huge ints (object): never cast silently
            raise InputError("rows must be a list of integer row indices")
        n = columns.n_rows(data.x)
        if index.ndim != 1 or index.min() < 0 or index.max() >= n:
            raise InputError(f"rows must be a non-empty list of indices in [0, {n})")
        return columns.take(data.x, index), data.y[index]


def row_width(array: np.ndarray) -> int:
    """Numbers per row of ``array`` (1 for a 1-D array)."""
    return int(np.prod(array.shape[1:])) if array.ndim > 1 else 1


def _upload_of(raw_meta: bytes | None) -> str | None:
    """The upload id in a ``meta`` record (its upload time for a dataset uploaded before ids; None: no dataset)."""
    if raw_meta is None:
        return None
    meta = json.loads(raw_meta)
    return str(meta.get("upload") or meta.get("at") or "")


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
    """What ``agent-workers datasets list/show`` print about one dataset.

    Attributes:
        expires_in: seconds until it expires; None when it never does.
        uploaded_at: Unix time of the upload (None for a dataset uploaded before this was recorded).
        upload: the upload's id (None for a dataset uploaded before ids).
        inputs: for typed columns, name -> {dtype, shape per row (-1: ragged)} (``""``: one unnamed input); None
            for float32 rows × features (``features`` is then their width).
    """

    name: str
    rows: int | None
    features: int | None
    bytes: int
    expires_in: int | None
    uploaded_at: float | None
    upload: str | None = None
    inputs: dict[str, Any] | None = None


def epoch_batches(n_rows: int, *, epochs: int, batch_size: int, seed: int = 0) -> Iterator[tuple[int, int, np.ndarray]]:
    """The mini-batches of a training run: ``(epoch, step, row indices)``, a fresh permutation per epoch.

    ``fit`` in a worker and ``Client.train`` through the queue walk the same schedule for the same seed.
    """
    rng = np.random.default_rng(seed)
    steps = (n_rows + batch_size - 1) // batch_size
    for epoch in range(epochs):
        order = rng.permutation(n_rows)
        for step in range(steps):
            yield epoch, step, order[step * batch_size : (step + 1) * batch_size]
