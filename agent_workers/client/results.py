"""Reading results from the Redis result backend: many at once, with one subscription and one MGET.

:class:`ResultReader` waits for a known set of task ids (the client's ``collect``); :class:`ResultListener` hears
every result published under a key prefix, in a thread (the tools' latency and duplicate counts).
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
import weakref
from collections.abc import Callable, Sequence
from typing import Any

import redis
from celery import Celery
from celery.exceptions import TimeoutError as ResultTimeout

from agent_workers.contract import READY_STATES, RESULT_KEY_PREFIX

#: Channels per SUBSCRIBE command.
SUBSCRIBE_CHUNK = 2000
#: While waiting, re-read still-missing results this often (seconds), in case a pub/sub message was lost.
RESYNC_INTERVAL = 1.0


class _Collection:
    """What one wait for many results knows, shared by the blocking and the asyncio loop: which keys are still
    pending, which subscriptions are unconfirmed, and the metas found so far (in id order)."""

    def __init__(
        self, prefix: str, ids: Sequence[str], on_ready: Callable[[int, dict[str, Any]], None] | None = None
    ) -> None:
        self.ids = ids
        self.index = {prefix + task_id: i for i, task_id in enumerate(ids)}
        self.metas: list[dict[str, Any] | None] = [None] * len(ids)
        self.pending = set(self.index)
        self.unconfirmed: set[str] = set()
        self.on_ready = on_ready

    def take(self, key: str, raw: Any) -> None:
        """Record a stored or published result record if it is final."""
        if raw is None or key not in self.pending:
            return
        meta = json.loads(raw)
        if meta.get("status") in READY_STATES:
            self.pending.discard(key)
            self.metas[self.index[key]] = meta
            if self.on_ready is not None:
                self.on_ready(self.index[key], meta)

    def on_message(self, message: dict[str, Any]) -> bool:
        """Handle one pub/sub message; True when every subscription is confirmed and stored results must be read
        (a result published before we listened is already stored: the backend SETs before it PUBLISHes)."""
        channel = message["channel"].decode()
        if message["type"] == "message":
            self.take(channel, message["data"])
        elif message["type"] == "subscribe" and self.unconfirmed:
            self.unconfirmed.discard(channel)
            return not self.unconfirmed
        return False

    def check_deadline(self, now: float, deadline: float, timeout: float) -> None:
        if now >= deadline:
            raise ResultTimeout(f"{len(self.pending)} of {len(self.ids)} results not ready after {timeout:g}s")


class ResultReader:
    """Reads many results from the Redis result backend: one subscription, one MGET, then pub/sub messages.

    Subscribing first and reading the keys only once every subscription is confirmed loses nothing: the backend
    stores a result (SETEX) before it publishes it, on one connection, so a result published before we listened
    is already readable. Celery's Redis backend and our batcher both write ``celery-task-meta-<id>`` that way.
    """

    def __init__(self, app: Celery, url: str) -> None:
        self.app = app
        self.prefix = app.backend.get_key_for_task("x").decode()[:-1]  # celery-task-meta-, any global prefix
        self.url = url
        self.redis = redis.Redis.from_url(url)
        self._local = threading.local()
        self._pubsubs: weakref.WeakSet[Any] = weakref.WeakSet()
        self._aredis: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, Any] = weakref.WeakKeyDictionary()

    def _pubsub(self) -> Any:
        ps = getattr(self._local, "pubsub", None)
        if ps is None:
            ps = self._local.pubsub = self.redis.pubsub()
            self._pubsubs.add(ps)
        return ps

    def collect(
        self, ids: Sequence[str], timeout: float, on_ready: Callable[[int, dict[str, Any]], None] | None = None
    ) -> list[dict[str, Any]]:
        """Wait for the result meta of every id (``status`` in SUCCESS/FAILURE/REVOKED); metas in id order.

        Raises:
            ResultTimeout: some results were not ready within ``timeout`` seconds.
        """
        deadline = time.monotonic() + timeout
        state = _Collection(self.prefix, ids, on_ready)

        def read_stored() -> None:
            keys = list(state.pending)
            for start in range(0, len(keys), SUBSCRIBE_CHUNK):
                chunk = keys[start : start + SUBSCRIBE_CHUNK]
                for key, raw in zip(chunk, self.redis.mget(chunk), strict=True):
                    state.take(key, raw)

        def subscribe(keys: list[str]) -> None:
            state.unconfirmed.update(keys)
            for start in range(0, len(keys), SUBSCRIBE_CHUNK):
                ps.subscribe(*keys[start : start + SUBSCRIBE_CHUNK])

        ps = self._pubsub()
        keys = list(state.index)
        resync = time.monotonic() + RESYNC_INTERVAL
        try:
            subscribe(keys)
            while state.pending:
                now = time.monotonic()
                state.check_deadline(now, deadline, timeout)
                try:
                    message = ps.get_message(
                        timeout=max(0.0, min(deadline, resync) - now)
                    )  # >= 0: hiredis refuses less
                except (redis.ConnectionError, redis.TimeoutError):
                    if time.monotonic() >= deadline:
                        raise
                    ps.reset()  # Redis went away: listen again on a fresh connection, then re-read
                    state.unconfirmed.clear()
                    subscribe(list(state.pending))
                    continue
                if message is None:
                    if time.monotonic() >= resync:
                        read_stored()
                        resync = time.monotonic() + RESYNC_INTERVAL
                elif state.on_message(message):
                    read_stored()
        finally:
            self._unsubscribe(ps, keys)
        return state.metas  # type: ignore[return-value]

    def _unsubscribe(self, ps: Any, keys: list[str]) -> None:
        try:
            for start in range(0, len(keys), SUBSCRIBE_CHUNK):
                ps.unsubscribe(*keys[start : start + SUBSCRIBE_CHUNK])
        except redis.RedisError:
            ps.reset()  # a fresh connection next time; the server drops the old one's subscriptions

    async def collect_async(self, ids: Sequence[str], timeout: float) -> list[dict[str, Any]]:
        """asyncio form of :meth:`collect` (redis.asyncio; no thread per waiting request)."""
        client = self._async_client()
        deadline = time.monotonic() + timeout
        state = _Collection(self.prefix, ids)
        state.unconfirmed.update(state.index)

        async def read_stored() -> None:
            keys = list(state.pending)
            for key, raw in zip(keys, await client.mget(keys), strict=True):
                state.take(key, raw)

        ps = client.pubsub()
        try:
            await ps.subscribe(*state.index)
            resync = time.monotonic() + RESYNC_INTERVAL
            while state.pending:
                now = time.monotonic()
                state.check_deadline(now, deadline, timeout)
                message = await ps.get_message(timeout=max(0.0, min(deadline, resync) - now))
                if message is None:
                    if time.monotonic() >= resync:
                        await read_stored()
                        resync = time.monotonic() + RESYNC_INTERVAL
                elif state.on_message(message):
                    await read_stored()
        finally:
            await ps.aclose()
        return state.metas  # type: ignore[return-value]

    def _async_client(self) -> Any:
        """One redis.asyncio client per event loop (a client is bound to the loop that created it)."""
        import redis.asyncio as aioredis

        loop = asyncio.get_running_loop()
        client = self._aredis.get(loop)
        if client is None:
            client = self._aredis[loop] = aioredis.Redis.from_url(self.url)
        return client

    def close(self) -> None:
        for ps in list(self._pubsubs):
            ps.close()
        self.redis.close()


class ResultListener:
    """Hears every result record published under ``celery-task-meta-<prefix>*`` and calls
    ``on_result(task_id, record)`` in a background thread (``record`` is the raw JSON, parse it as you need).

    The batcher and Celery's Redis backend both PUBLISH a record on its key when they store it, so a task computed
    twice is heard twice.
    """

    def __init__(self, url: str, on_result: Callable[[str, bytes], None], *, prefix: str = "") -> None:
        self._client = redis.Redis.from_url(url)
        self._pubsub = self._client.pubsub(ignore_subscribe_messages=True)
        self._pubsub.psubscribe(f"{RESULT_KEY_PREFIX}{prefix}*")
        self._pubsub.get_message(timeout=1.0)  # the subscription is active before the caller sends anything
        self._on_result = on_result
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="aw-results", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        cut = len(RESULT_KEY_PREFIX)
        while not self._stop.is_set():
            message = self._pubsub.get_message(timeout=0.1)
            if message is not None and message["type"] == "pmessage":
                self._on_result(message["channel"][cut:].decode(), message["data"])

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self._pubsub.close()
        self._client.close()


def is_final(record: bytes) -> bool:
    """True when a raw result record is in a final state (a cheap look at its ``status``, no JSON parse)."""
    head = record[:40]
    return any(f'"{state}"'.encode() in head for state in READY_STATES)
