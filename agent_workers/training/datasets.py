"""Training datasets uploaded once to Redis as ``.npy`` bytes (never pickled) and sliced by row indices.

A dataset has a name (a uuid when none is given), ``x`` (rows × features, float32), ``y`` (one target per row) and
a small ``meta`` record (rows, features, upload time); all three keys expire together, after ``DEFAULT_TTL``
(7 days) unless the upload says otherwise (``ttl=0``: never).
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
from agent_workers.keys import Keys
from agent_workers.redis_clients import redis_client

DEFAULT_TTL = 7 * 24 * 3600
CACHE_SIZE = 8


def _to_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(array), allow_pickle=False)
    return buf.getvalue()


def _from_bytes(data: bytes) -> np.ndarray:
    return np.load(io.BytesIO(data), allow_pickle=False)


class DatasetStore:
    """Upload and read training datasets.

    Args:
        client: redis-py client of the parameter store.
        keys: the namespace's key builder.
    """

    def __init__(self, *, client: redis.Redis, keys: Keys) -> None:
        self.client = client
        self.keys = keys
        self._cache: OrderedDict[str, tuple[np.ndarray, np.ndarray]] = OrderedDict()
        self._lock = threading.Lock()  # pool threads share one store

    @classmethod
    def from_settings(cls, settings: Settings) -> DatasetStore:
        """A store on ``settings.params_url`` in ``settings.namespace``."""
        return cls(
            client=redis_client(settings.params_url, sentinel_master=settings.sentinel_master),
            keys=Keys(settings.namespace),
        )

    def upload(self, x: Any, y: Any, *, dataset_id: str | None = None, ttl: int = DEFAULT_TTL) -> str:
        """Store ``x`` (rows × features; a 1-D ``x`` is one feature per row) and ``y`` (one target per row).

        Args:
            dataset_id: the dataset's name; an existing dataset of that name is replaced. A uuid when omitted.
            ttl: seconds until the dataset expires; 0 keeps it until deleted.
        Returns:
            The dataset id.
        Raises:
            InputError: ``x`` and ``y`` disagree on the number of rows, or ``x`` is not numeric 1-D/2-D.
        """
        try:
            xa = np.asarray(x, dtype=np.float32)
            ya = np.asarray(y)
        except (TypeError, ValueError) as exc:
            raise InputError(f"x and y must be numeric arrays: {exc}") from None
        if xa.ndim == 1:
            xa = xa.reshape(-1, 1)
        if xa.ndim != 2 or len(xa) == 0:
            raise InputError(f"x must be a non-empty 2-D array (rows × features), got shape {list(xa.shape)}")
        if len(xa) != len(ya):
            raise InputError(f"x has {len(xa)} rows but y has {len(ya)}")
        if ttl < 0:
            raise InputError("ttl must be >= 0 seconds (0: never expires)")
        dataset_id = dataset_id or uuid.uuid4().hex
        meta = {"rows": int(xa.shape[0]), "features": int(xa.shape[1]), "y_shape": list(ya.shape), "at": time.time()}
        ex = ttl or None
        pipe = self.client.pipeline(transaction=True)
        pipe.set(self.keys.dataset(dataset_id, "x"), _to_bytes(xa), ex=ex)
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
        """Delete a dataset; False when there was none."""
        with self._lock:
            self._cache.pop(dataset_id, None)
        return bool(self.client.delete(*(self.keys.dataset(dataset_id, part) for part in ("x", "y", "meta"))))

    def load(self, dataset_id: str) -> tuple[np.ndarray, np.ndarray]:
        """The whole dataset (the ``CACHE_SIZE`` most recent are cached in this process: datasets are immutable)."""
        with self._lock:
            hit = self._cache.get(dataset_id)
            if hit is not None:
                self._cache.move_to_end(dataset_id)
                return hit
        x, y = self.client.mget(self.keys.dataset(dataset_id, "x"), self.keys.dataset(dataset_id, "y"))
        if x is None or y is None:
            raise InputError(f"dataset {dataset_id!r} does not exist or expired; upload it again")
        data = (_from_bytes(x), _from_bytes(y))
        with self._lock:
            self._cache[dataset_id] = data
            while len(self._cache) > CACHE_SIZE:
                self._cache.popitem(last=False)
        return data

    def rows(self, dataset_id: str, rows: Any) -> tuple[np.ndarray, np.ndarray]:
        """The rows ``rows`` (a list of indices) of a dataset."""
        x, y = self.load(dataset_id)
        try:
            index = np.asarray(rows, dtype=np.int64)
        except (TypeError, ValueError):
            raise InputError("rows must be a list of integer row indices") from None
        if index.ndim != 1 or index.size == 0 or index.min() < 0 or index.max() >= len(x):
            raise InputError(f"rows must be a non-empty list of indices in [0, {len(x)})")
        return x[index], y[index]


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
    """What ``agent-workers datasets list/show`` print about one dataset.

    Attributes:
        expires_in: seconds until it expires; None when it never does.
        uploaded_at: Unix time of the upload (None for a dataset uploaded before this was recorded).
    """

    name: str
    rows: int | None
    features: int | None
    bytes: int
    expires_in: int | None
    uploaded_at: float | None


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
