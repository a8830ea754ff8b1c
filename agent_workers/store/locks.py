"""The commit lock of lock mode: one holder per model from read to commit (the compare-and-set still fences a
holder whose lock expired)."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator

import redis
from redis.exceptions import LockError

from agent_workers.errors import StoreUnavailableError
from agent_workers.keys import Keys
from agent_workers.redis_clients import unavailable

log = logging.getLogger(__name__)

DEFAULT_LOCK_WAIT = 120.0
LOCK_POLL = 0.002


class CommitLock:
    """A Redis lock per model (redis-py's ``Lock``: a token under ``keys.lock(name)`` with an expiry).

    Args:
        timeout: seconds a lock lives unless released.
        wait: seconds to wait for a held lock before giving up.
    """

    def __init__(self, client: redis.Redis, keys: Keys, *, timeout: float, wait: float = DEFAULT_LOCK_WAIT) -> None:
        self.client = client
        self.keys = keys
        self.timeout = timeout
        self.wait = wait

    @contextlib.contextmanager
    def hold(self, name: str) -> Iterator[None]:
        """Hold ``name``'s lock for the block.

        Raises:
            StoreUnavailableError: not free within ``wait`` seconds (transient: retry).
        """
        lock = self.client.lock(self.keys.lock(name), timeout=self.timeout, sleep=LOCK_POLL, blocking_timeout=self.wait)
        with unavailable():
            acquired = lock.acquire()
        if not acquired:
            raise StoreUnavailableError(f"commit lock of {name!r} not free within {self.wait:.0f}s")
        try:
            yield
        finally:
            try:
                with unavailable():
                    lock.release()
            except LockError:
                # It expired while we held it; the compare-and-set already kept our commit safe.
                log.warning(
                    "commit lock of %s expired before release (lock_timeout=%ss is short for this step)",
                    name,
                    self.timeout,
                )
