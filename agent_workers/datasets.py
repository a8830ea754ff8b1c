"""Training datasets uploaded once to Redis as ``.npy`` bytes (never pickled) and sliced by row indices."""

from __future__ import annotations

import io
import threading
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

    def upload(self, x: np.ndarray, y: np.ndarray, *, dataset_id: str | None = None, ttl: int = DEFAULT_TTL) -> str:
        """Store ``x`` (rows × features) and ``y`` (one target per row); returns the dataset id."""
        if len(x) != len(y):
            raise InputError(f"x has {len(x)} rows but y has {len(y)}")
        dataset_id = dataset_id or uuid.uuid4().hex
        pipe = self.client.pipeline(transaction=True)
        pipe.set(self.keys.dataset(dataset_id, "x"), _to_bytes(np.asarray(x, dtype=np.float32)), ex=ttl)
        pipe.set(self.keys.dataset(dataset_id, "y"), _to_bytes(np.asarray(y)), ex=ttl)
        pipe.execute()
        return dataset_id

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
