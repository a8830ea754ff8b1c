"""The commit lock of lock mode: one holder per model from read to commit (the compare-and-set still fences a
holder whose lock expired).

The lock lives ``timeout`` seconds (``AGENT_WORKERS_LOCK_TIMEOUT``, 5 by default) and its holder renews it every
third of that while it holds it, so a slow live holder keeps it while a dead one (SIGKILL, lost host) blocks the
others for at most ``timeout`` seconds. A worker never waits for it on its event loop: in lock mode the group
commits of ``train_step`` run in the intake's compute thread (agent_workers/worker/trainer.py).
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Iterator

import redis
from redis.exceptions import LockError
from redis.lock import Lock

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
        # thread_local=False: the renewing thread must see the token the holder's thread acquired with.
        lock = self.client.lock(
            self.keys.lock(name), timeout=self.timeout, sleep=LOCK_POLL, blocking_timeout=self.wait, thread_local=False
        )
        with unavailable():
            acquired = lock.acquire()
        if not acquired:
            raise StoreUnavailableError(f"commit lock of {name!r} not free within {self.wait:.0f}s")
        done = threading.Event()
        renewer = threading.Thread(target=_renew, args=(lock, self.timeout, done), name=f"lock-{name}", daemon=True)
        renewer.start()
        try:
            yield
        finally:
            done.set()
            renewer.join()
            try:
                with unavailable():
                    lock.release()
            except LockError:
                # Lost while we held it (a renewal failed, or someone deleted it); the compare-and-set already kept
                # our commit safe.
                log.warning(
                    "commit lock of %s was lost before release (a renewal within lock_timeout=%ss failed, or the key "
                    "was deleted)",
                    name,
                    self.timeout,
                )


def _renew(lock: Lock, timeout: float, done: threading.Event) -> None:
    """Reset ``lock``'s expiry to ``timeout`` every third of it until ``done``; stop once it is lost."""
    while not done.wait(timeout / 3):
        try:
            lock.reacquire()
        except (LockError, redis.RedisError):
            return  # lost (expired, or Redis unreachable): the compare-and-set fences our commit
