"""Identical predict inputs computed once, and an optional per-worker result cache that can never answer from a
stale version.

Inside one (model, version) group, requests with byte-identical inputs share one row of the forward pass and are
answered each under its own task id. Across batches, :class:`ResultCache` (``AGENT_WORKERS_RESULT_CACHE_SIZE``
entries, off by default) keeps outputs keyed by ``(model, incarnation, version, input digest)``. The batcher resolves
the version of a group *before* looking anything up, so a request is only ever answered from an entry of the very
version it would be computed with: after a commit the new version's key misses, and the old entries simply age out.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from typing import Any

import numpy as np

from agent_workers.worker.requests import Pending

CacheKey = tuple[str, str, int, bytes]


def digest(array: np.ndarray | dict[str, np.ndarray]) -> bytes:
    """A 128-bit digest of an input's bytes, shape and dtype (of every named input, for several)."""
    parts = sorted(array.items()) if isinstance(array, dict) else [("", array)]
    h = hashlib.blake2b(digest_size=16)
    for name, part in parts:
        h.update(part.tobytes())
        h.update(f"{name}:{part.shape}:{part.dtype.str};".encode())
    return h.digest()


def _raw_key(array: np.ndarray | dict[str, np.ndarray]) -> Any:
    """Equal exactly for equal inputs (shape and dtype included: variable dims and integer inputs share bytes)."""
    if isinstance(array, dict):
        return digest(array)
    return (array.shape, array.dtype.str, array.tobytes())


class Row:
    """One distinct input of a group: the array and every request that sent it."""

    __slots__ = ("array", "key", "requests")

    def __init__(self, array: Any, key: Any) -> None:
        self.array = array
        self.key = key
        self.requests: list[Pending] = []


def key_of(array: np.ndarray | dict[str, np.ndarray], *, keyed: bool) -> Any:
    """The key :func:`distinct` groups ``array`` by: its digest when ``keyed`` (the cache needs it), else its bytes."""
    return digest(array) if keyed else _raw_key(array)


def distinct(valid: list[tuple[Pending, np.ndarray]], *, keyed: bool) -> list[Row]:
    """Group identical inputs, in order of first appearance (by :func:`key_of`). A key the decode ahead made for
    that very array (``req.decoded``, beside the batch before: worker/decoding.py) is taken as it is."""
    rows: dict[Any, Row] = {}
    for req, array in valid:
        ahead = req.decoded
        key = ahead.key if ahead is not None and ahead.value is array else key_of(array, keyed=keyed)
        row = rows.get(key)
        if row is None:
            row = rows[key] = Row(array, key)
        row.requests.append(req)
    return list(rows.values())


class ResultCache:
    """An LRU of outputs by ``(model, incarnation, version, input digest)``; ``size`` 0 disables it."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._entries: OrderedDict[CacheKey, np.ndarray] = OrderedDict()

    @property
    def enabled(self) -> bool:
        return self.size > 0

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: CacheKey) -> np.ndarray | None:
        hit = self._entries.get(key)
        if hit is not None:
            self._entries.move_to_end(key)
        return hit

    def put(self, key: CacheKey, value: Any) -> None:
        """Keep a copy of ``value`` (a row of a batch's output) under ``key``; exceptions are not cached.

        The copy owns its memory: a row is a view of its batch's output, and keeping the view would pin the whole
        batch (200 MiB held for 6 MiB of cached rows, issue 18).
        """
        if isinstance(value, Exception):
            return  # failures are never cached: the next request retries
        if isinstance(value, dict):  # several named outputs
            self._entries[key] = {k: np.array(v, copy=True) for k, v in value.items()}  # type: ignore[assignment]
        else:
            self._entries[key] = np.array(value, copy=True)
        self._entries.move_to_end(key)
        while len(self._entries) > self.size:
            self._entries.popitem(last=False)
