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
#: An optimistic trainer's turn: how long it lives (never renewed) and how long a trainer waits for it before it
#: goes ahead without one. Long enough for a group's walk and commit of small models; a longer walk outlives its
#: turn and costs at most a conflict, and a dead holder delays the others by at most this.
TURN_LEASE = 0.5


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

    @contextlib.contextmanager
    def turn(self, name: str, *, lease: float = TURN_LEASE, wait: float | None = None) -> Iterator[None]:
        """Take ``name``'s lock for the block as a short, best-effort turn (optimistic mode's conflict avoidance).

        Trainers that take turns walk one after the other instead of all at once on the same head, so their
        compare-and-sets stop colliding, while the rest of their work (receiving, decoding, results) overlaps. A turn
        is never required: it lives ``lease`` seconds without renewal and a trainer that waited ``lease`` for it goes
        ahead without one; the compare-and-set decides either way. ``wait`` (seconds, at most ``lease``) shortens
        that wait, for a trainer whose event loop also serves predictions.

        Raises:
            StoreUnavailableError: Redis unreachable.
        """
        lock = self.client.lock(
            self.keys.lock(name),
            timeout=lease,
            sleep=LOCK_POLL,
            blocking_timeout=lease if wait is None else min(wait, lease),
            thread_local=False,
        )
        with unavailable():
            acquired = lock.acquire()
        try:
            yield
        finally:
            if acquired:
                try:
                    with unavailable():
                        lock.release()
                except LockError:
                    pass  # the lease ran out first: another trainer may hold a turn now, which is all it means


def _renew(lock: Lock, timeout: float, done: threading.Event) -> None:
    """Reset ``lock``'s expiry to ``timeout`` every third of it until ``done``; stop once it is lost."""
    while not done.wait(timeout / 3):
        try:
            lock.reacquire()
        except (LockError, redis.RedisError):
            return  # lost (expired, or Redis unreachable): the compare-and-set fences our commit
