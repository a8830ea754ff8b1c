"""Reading results from the Redis result backend: many at once, with one subscription and one MGET.

:class:`ResultReader` waits for a known set of task ids (the client's ``collect``); :class:`ResultListener` hears
every result published under a key prefix, in a thread (the tools' latency and duplicate counts).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import threading
import time
import weakref
from collections.abc import Callable, Sequence
from typing import Any
from urllib.parse import urlparse

import redis
from celery import Celery
from redis.backoff import NoBackoff
from redis.retry import Retry

from agent_workers.client.deadline import Deadline
from agent_workers.config import DEFAULT_SENTINEL_MASTER
from agent_workers.contract import READY_STATES, RESULT_KEY_PREFIX
from agent_workers.errors import ResultTimeout
from agent_workers.redis_clients import redis_client

#: Channels per SUBSCRIBE command.
SUBSCRIBE_CHUNK = 2000
#: While waiting, re-read still-missing results this often (seconds), in case a pub/sub message was lost.
RESYNC_INTERVAL = 1.0
#: Seconds between two tries to reach a result backend that went away.
RECONNECT_INTERVAL = 0.1
#: Result backends read directly (others go through Celery's own ``AsyncResult.get``).
REDIS_BACKEND_SCHEMES = frozenset({"redis", "rediss", "unix", "sentinel"})


class _Collection:
    """What one wait for many results knows, shared by the blocking and the asyncio loop: which keys are still
    pending, which subscriptions are unconfirmed, and the metas found so far (in id order; an id given twice gets
    its meta twice)."""

    def __init__(
        self, prefix: str, ids: Sequence[str], on_ready: Callable[[int, dict[str, Any]], None] | None = None
    ) -> None:
        self.ids = ids
        self.index: dict[str, list[int]] = {}
        for i, task_id in enumerate(ids):
            self.index.setdefault(prefix + task_id, []).append(i)
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
            for i in self.index[key]:
                self.metas[i] = meta
                if self.on_ready is not None:
                    self.on_ready(i, meta)

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

    def timeout(self, dl: Deadline, cause: BaseException | None = None) -> ResultTimeout:
        """The error at the deadline: it names the ids still pending, so they can be collected later."""
        pending = [task_id for task_id, meta in zip(self.ids, self.metas, strict=True) if meta is None]
        text = f"{len(pending)} of {len(self.ids)} results not ready after {dl.timeout:g}s"
        if cause is not None:
            text += f" (the result backend failed: {type(cause).__name__}: {cause})"
        error = ResultTimeout(text, list(self.ids), pending)
        error.metas = self.metas  # type: ignore[attr-defined]
        return error


class ResultReader:
    """Reads many results from the Redis result backend: one subscription, one MGET, then pub/sub messages.

    Subscribing first and reading the keys only once every subscription is confirmed loses nothing: the backend
    stores a result (SETEX) before it publishes it, on one connection, so a result published before we listened
    is already readable. Celery's Redis backend and our batcher both write ``celery-task-meta-<id>`` that way.

    A wait has one deadline: the backend going away (a restart, a killed connection) is retried on a fresh
    connection until then, and a socket still blocked at the deadline (a frozen server) is cut. Connections are
    per thread and per process (a forked child never shares its parent's subscription).
    """

    def __init__(self, app: Celery, url: str, *, sentinel_master: str = DEFAULT_SENTINEL_MASTER) -> None:
        self.app = app
        self.prefix = app.backend.get_key_for_task("x").decode()[:-1]  # celery-task-meta-, any global prefix
        self.url = url
        self.sentinel_master = sentinel_master
        #: redis.asyncio has no Sentinel client here: asyncio waits on sentinel:// run the blocking wait in a thread
        self.has_async = urlparse(url).scheme != "sentinel"
        self._local = threading.local()
        self._clients: weakref.WeakSet[Any] = weakref.WeakSet()
        self._aredis: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, Any] = weakref.WeakKeyDictionary()

    def _client(self) -> tuple[Any, Any]:
        """This thread's client and subscription (new ones after a fork)."""
        if getattr(self._local, "pid", None) != os.getpid():
            client = redis_client(self.url, sentinel_master=self.sentinel_master, retry=Retry(NoBackoff(), 0))
            self._local.client, self._local.pubsub, self._local.pid = client, client.pubsub(), os.getpid()
            self._clients.add(client)
        return self._local.client, self._local.pubsub

    def meta(self, task_id: str, dl: Deadline) -> dict[str, Any] | None:
        """One task's result record (``{"status": "PENDING"}`` when none is stored); None if the backend cannot be
        read before the deadline."""
        client, _ = self._client()
        while not dl.passed:
            try:
                with dl.guard(client.connection_pool.disconnect):
                    raw = client.get(self.prefix + task_id)
                return {"status": "PENDING"} if raw is None else json.loads(raw)
            except (redis.RedisError, OSError):
                time.sleep(min(RECONNECT_INTERVAL, dl.left()))  # noqa: sleep-ok - between tries of a bounded retry
        return None

    def collect(
        self, ids: Sequence[str], dl: Deadline, on_ready: Callable[[int, dict[str, Any]], None] | None = None
    ) -> list[dict[str, Any]]:
        """Wait for the result meta of every id (``status`` in SUCCESS/FAILURE/REVOKED); metas in id order.

        Raises:
            ResultTimeout: some results were not ready before the deadline (it carries the ids still pending).
        """
        state = _Collection(self.prefix, ids, on_ready)
        client, ps = self._client()

        def read_stored() -> None:
            keys = list(state.pending)
            for start in range(0, len(keys), SUBSCRIBE_CHUNK):
                chunk = keys[start : start + SUBSCRIBE_CHUNK]
                for key, raw in zip(chunk, client.mget(chunk), strict=True):
                    state.take(key, raw)

        def subscribe(keys: list[str]) -> None:
            state.unconfirmed = set(keys)
            for start in range(0, len(keys), SUBSCRIBE_CHUNK):
                ps.subscribe(*keys[start : start + SUBSCRIBE_CHUNK])

        keys = list(state.index)
        resync = time.monotonic() + RESYNC_INTERVAL
        listening = False
        clean = False
        try:
            with dl.guard(client.connection_pool.disconnect):  # a frozen backend: cut at the deadline
                while state.pending:
                    now = time.monotonic()
                    if now >= dl.at:
                        raise state.timeout(dl)
                    try:
                        if not listening:
                            subscribe(list(state.pending))
                            listening = True
                        message = ps.get_message(timeout=max(0.0, min(dl.at, resync) - now))  # hiredis: >= 0
                        if message is None:
                            if time.monotonic() >= resync:
                                read_stored()
                                resync = time.monotonic() + RESYNC_INTERVAL
                        elif state.on_message(message):
                            read_stored()
                    except (redis.RedisError, OSError) as exc:
                        # The backend went away (a restart, a killed connection) or was cut at the deadline: listen
                        # again on a fresh connection until the deadline; results stored meanwhile are read then.
                        ps.reset()
                        listening = False
                        if dl.left() <= RECONNECT_INTERVAL:
                            raise state.timeout(dl, exc) from exc
                        time.sleep(RECONNECT_INTERVAL)  # noqa: sleep-ok - between tries of a deadline-bounded retry
                clean = True
        finally:
            if clean:
                self._unsubscribe(ps, keys)
            else:
                ps.reset()  # the server drops a closed connection's subscriptions
        return state.metas  # type: ignore[return-value]

    def _unsubscribe(self, ps: Any, keys: list[str]) -> None:
        try:
            for start in range(0, len(keys), SUBSCRIBE_CHUNK):
                ps.unsubscribe(*keys[start : start + SUBSCRIBE_CHUNK])
        except redis.RedisError:
            ps.reset()  # a fresh connection next time; the server drops the old one's subscriptions

    async def collect_async(self, ids: Sequence[str], dl: Deadline) -> list[dict[str, Any]]:
        """asyncio form of :meth:`collect` (redis.asyncio; no thread per waiting request), with the same deadline
        and the same retry of a backend that went away."""
        client = self._async_client()
        state = _Collection(self.prefix, ids)
        last_error: BaseException | None = None

        async def read_stored() -> None:
            keys = list(state.pending)
            for key, raw in zip(keys, await client.mget(keys), strict=True):
                state.take(key, raw)

        async def listen() -> None:
            nonlocal last_error
            while state.pending:
                ps = client.pubsub()
                try:
                    state.unconfirmed = set(state.pending)
                    await ps.subscribe(*state.pending)
                    resync = time.monotonic() + RESYNC_INTERVAL
                    while state.pending:
                        now = time.monotonic()
                        message = await ps.get_message(timeout=max(0.0, min(dl.at, resync) - now))
                        if message is None:
                            if time.monotonic() >= resync:
                                await read_stored()
                                resync = time.monotonic() + RESYNC_INTERVAL
                        elif state.on_message(message):
                            await read_stored()
                except (redis.RedisError, OSError) as exc:
                    last_error = exc
                    await asyncio.sleep(RECONNECT_INTERVAL)
                finally:
                    with contextlib.suppress(Exception):
                        await ps.aclose()

        try:
            await asyncio.wait_for(listen(), dl.left())
        except TimeoutError:
            raise state.timeout(dl, last_error) from None
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
        for client in list(self._clients):
            client.close()


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
