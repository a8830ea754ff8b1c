"""The versioned parameter store: immutable safetensors blobs, a head pointer, an atomic compare-and-set commit.

A commit uploads the new blob to fresh staging keys (chunks of at most ``chunk_bytes``), then ONE script
(``lua/commit.lua``) checks the incarnation, the update ids and the expected version, renames the chunks into place,
moves the head and collects the version that left the retention window: ``committed``, ``conflict`` (re-read and
retry) or ``duplicate`` (an update id applied before; nothing changes). Blobs are immutable and carry model, version
and incarnation in their header, so a reader that follows the head never returns a torn or mixed version; it pays
one ``HMGET`` per call and downloads only a changed version. Modes: ``optimistic`` (trainers race, the
compare-and-set picks one winner) and ``lock`` (:meth:`RedisParamStore.exclusive`; the compare-and-set still
fences a holder whose lock expired). Keys are laid out in :mod:`agent_workers.keys`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import time
import uuid
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any
from urllib.parse import urlparse

import redis

from agent_workers import lua
from agent_workers.config import DEFAULT_CHUNK_BYTES, DEFAULT_DEDUP_WINDOW, DEFAULT_LOCK_TIMEOUT, Settings
from agent_workers.errors import ConfigError, ModelError, StoreError, StoreUnavailableError
from agent_workers.keys import Keys, name_problem
from agent_workers.models import ModelSpec, load_plugins
from agent_workers.redis_clients import CLUSTER_SCHEMES, bulk_packer, glob_escape, redis_client, unavailable
from agent_workers.store import blobs, maintenance
from agent_workers.store.artifacts import RedisArtifactStore, check_artifacts
from agent_workers.store.blobs import PARAM_PREFIX, EncodedVersion, Snapshot, blob_metadata, chunk_keys, snapshot_of
from agent_workers.store.locks import DEFAULT_LOCK_WAIT, CommitLock
from agent_workers.store.maintenance import STAGING_TTL, staging_ttl  # noqa: F401 - STAGING_TTL re-exported
from agent_workers.store.versions import HEAD_FIELDS, CommitOutcome, CommitResult, Head, first_head

if TYPE_CHECKING:  # torch is imported where tensors are made, so listing models (the CLI) stays fast
    import torch

log = logging.getLogger(__name__)

HISTORY_LENGTH = 1000
READ_ATTEMPTS = 8
COMMIT_MODES = ("optimistic", "lock")


class RedisParamStore:
    """Versioned model parameters in Redis.

    Args:
        client: a redis-py client (bytes responses).
        keys: the key builder of this deployment's namespace.
        keep_versions: how many most recent versions stay readable; older blobs are deleted on commit.
        mode: ``optimistic`` or ``lock`` (see :meth:`exclusive`).
        chunk_bytes: blobs above this size are stored as several keys (Redis caps a value at 512 MiB, and big
            values hurt replication buffers and latency).
        wait_aof: after a commit, wait until Redis fsynced it to its AOF (``WAITAOF 1 0``) before returning.
        lock_timeout: seconds a commit lock lives unless released (lock mode).
        lock_wait: seconds to wait for the commit lock before giving up (lock mode).
        cache: keep the newest snapshot of each model, so an unchanged version is never downloaded twice.
        dedup_window: how many applied update ids are remembered (the newest ones, whatever the group sizes); a
            redelivery of an id that has left this window would apply again.
        cache_bytes: drop the least recently used cached snapshots beyond this many bytes (0: no cap).

    Raises:
        ConfigError: ``wait_aof`` on a Redis that cannot do it (older than 7.2, or AOF off).
    """

    def __init__(
        self,
        *,
        client: redis.Redis,
        keys: Keys,
        keep_versions: int = 10,
        mode: str = "optimistic",
        chunk_bytes: int = DEFAULT_CHUNK_BYTES,
        wait_aof: bool = False,
        lock_timeout: float = DEFAULT_LOCK_TIMEOUT,
        lock_wait: float = DEFAULT_LOCK_WAIT,
        cache: bool = True,
        dedup_window: int = DEFAULT_DEDUP_WINDOW,
        cache_bytes: int = 0,
    ) -> None:
        if mode not in COMMIT_MODES:
            raise ConfigError(f"commit mode {mode!r} is not one of {', '.join(COMMIT_MODES)}")
        if keep_versions < 1 or chunk_bytes < 1:
            raise ConfigError("keep_versions and chunk_bytes must be positive")
        self.client = client
        self.keys = keys
        self.keep_versions = keep_versions
        self.mode = mode
        self.chunk_bytes = chunk_bytes
        self.wait_aof = wait_aof
        self.lock_timeout = lock_timeout
        self._lock = CommitLock(client, keys, timeout=lock_timeout, wait=lock_wait)
        self.dedup_window = dedup_window
        self._commit = client.register_script(lua.source("commit"))
        self._specs: dict[tuple[str, str], ModelSpec] = {}
        self._cache = blobs.SnapshotCache(enabled=cache, max_bytes=cache_bytes)
        self.artifacts = RedisArtifactStore(client=client, keys=keys, keep_versions=keep_versions)
        if wait_aof:
            self.check_durability()

    @classmethod
    def from_settings(cls, settings: Settings, **overrides: Any) -> RedisParamStore:
        """A store on ``settings.params_url`` in ``settings.namespace`` with the settings' mode and limits.

        The URL may name one Redis, a Sentinel-managed master or a Redis Cluster (see redis_clients.py). The
        modules of ``AGENT_WORKERS_PLUGINS`` are imported first, so the store can build the specs they register.
        """
        load_plugins(settings.plugins)
        connection: dict[str, Any] = {"socket_timeout": 30, "health_check_interval": 30}
        if urlparse(settings.params_url).scheme not in CLUSTER_SCHEMES:
            connection["command_packer"] = bulk_packer()  # blob chunks go to the socket uncopied
        client = redis_client(settings.params_url, sentinel_master=settings.sentinel_master, **connection)
        options: dict[str, Any] = {
            "keep_versions": settings.keep_versions,
            "dedup_window": settings.dedup_window,
            "mode": settings.commit_mode,
            "chunk_bytes": settings.chunk_bytes,
            "wait_aof": settings.wait_aof,
            "lock_timeout": settings.lock_timeout,
            "cache_bytes": settings.model_cache_bytes,
        }
        options.update(overrides)
        return cls(client=client, keys=Keys(settings.namespace), **options)

    def check_durability(self) -> None:
        """Make sure ``WAITAOF 1 0`` can work here (:func:`agent_workers.store.maintenance.check_durability`)."""
        maintenance.check_durability(self.client)

    # -- models -------------------------------------------------------------------------------------------------

    def create(
        self,
        name: str,
        spec: ModelSpec,
        *,
        seed: int = 0,
        module: torch.nn.Module | None = None,
        replace: bool = False,
        artifacts: Mapping[str, bytes | str] | None = None,
    ) -> int:
        """Create ``name`` at version 0 with freshly initialised (seeded) or given weights, and the ``artifacts``
        (name -> bytes: labels, tokenizer, ...) version 0 carries (agent_workers/store/artifacts.py).

        Raises:
            ModelError: a name that cannot be a key part.
            StoreError: the model exists and ``replace`` is false.
        """
        problem = name_problem(name, "model name")
        if problem:
            raise ModelError(problem)
        if module is None:
            import torch

            torch.manual_seed(seed)
            module = spec.build()
        files = check_artifacts(artifacts or {})
        epoch = uuid.uuid4().hex
        tensors = {PARAM_PREFIX + k: v for k, v in module.state_dict().items()}
        chunks = EncodedVersion.of(tensors, model=name, version=0, epoch=epoch, chunk_bytes=self.chunk_bytes).chunks
        targets = chunk_keys(self.keys.blob(name, 0), len(chunks))
        with unavailable():
            if not replace and self.client.exists(self.keys.head(name)):
                raise StoreError(f"model {name!r} already exists; pass replace=True (CLI: --replace) to recreate it")
            self._delete_keys(name)
            pipe = self.client.pipeline(transaction=True)
            pipe.set(self.keys.spec(name), json.dumps(spec.to_json()))
            for key, chunk in zip(targets, chunks, strict=True):
                pipe.set(key, chunk)
            pipe.hset(self.keys.head(name), mapping=first_head(targets[0], epoch, len(chunks)))
            self.artifacts.stage(pipe, name, 0, files)
            pipe.lpush(self.keys.history(name), json.dumps({"version": 0, "kind": "create", "at": time.time()}))
            pipe.execute()
            # The index of models is not in the model's hash slot, so it is written outside its transaction (a
            # Redis Cluster refuses cross-slot transactions); a crash in between leaves a model `list` misses.
            self.client.sadd(self.keys.models(), name)
        self._cache.forget(name)
        return 0

    def delete(self, name: str) -> None:
        """Remove a model and every version of it."""
        with unavailable():
            self._delete_keys(name)
            self.client.srem(self.keys.models(), name)
        self._cache.forget(name)

    def _delete_keys(self, name: str) -> None:
        pattern = glob_escape(self.keys.spec(name).rsplit(":", 1)[0]) + ":*"
        batch = list(self.client.scan_iter(match=pattern, count=500))
        if batch:
            self.client.delete(*batch)

    def list(self) -> list[str]:
        """Names of all models, sorted."""
        with unavailable():
            return sorted(m.decode() for m in self.client.smembers(self.keys.models()))

    @property
    def cache_bytes(self) -> int:
        """Bytes of parameters the snapshot cache holds now."""
        return self._cache.nbytes

    def head(self, name: str) -> Head:
        """The current version of ``name`` (one small round trip; cheap enough to call per batch).

        Raises:
            ModelError: no such model.
        """
        with unavailable():
            raw = self.client.hmget(self.keys.head(name), *HEAD_FIELDS)
        return Head.parse(name, raw)

    def spec(self, name: str, epoch: str | None = None) -> ModelSpec:
        """The architecture spec of ``name`` (cached per model incarnation)."""
        if epoch is None:
            epoch = self.head(name).epoch
        cached = self._specs.get((name, epoch))
        if cached is not None:
            return cached
        with unavailable():
            raw = self.client.get(self.keys.spec(name))
        if raw is None:
            raise ModelError(f"unknown model {name!r}; create it first (agent-workers models create)")
        spec = ModelSpec.from_json(json.loads(raw))
        self._specs[(name, epoch)] = spec
        return spec

    def read(self, name: str, version: int | None = None, *, state: bool = True) -> Snapshot:
        """Read the current (or a pinned) version as one consistent snapshot.

        One ``HMGET`` of the head; the blob is downloaded only when the cached snapshot is not that version, in one
        ``MGET`` of its chunks, and decoded without copying. The blob's header must name the model, the version and
        the incarnation the head promised.

        Args:
            state: also read the optimizer state (trainers). Inference reads the parameters only, which with
                Adam is a third of the bytes.

        Raises:
            ModelError: unknown model, or a version that was never written or is no longer kept.
            StoreError: the head moved too fast to catch a version before it was collected, or its blob is missing
                or foreign while the head stands still (a damaged store; the message names the key and the fix).
        """
        fields = list(HEAD_FIELDS)
        if version is not None:
            fields += [f"chunks:{version}", f"pchunks:{version}"]
        last: tuple[Any, str] | None = None  # the previous attempt's head and what was wrong with its blob
        for _ in range(READ_ATTEMPTS):
            with unavailable():
                raw = self.client.hmget(self.keys.head(name), *fields)
            if last is not None and last[0] == raw:
                # The head did not move, yet its blob is missing or foreign twice in a row: not a race with a
                # commit but a damaged store. Say so, with the key and the way out.
                raise StoreError(
                    f"model {name!r}: {last[1]} while its head has not moved; the store is damaged (evicted or "
                    "edited by hand): restore an earlier kept version with `agent-workers models rollback "
                    f"{name} <version>` (see `models history`), or recreate the model"
                )
            head = Head.parse(name, raw)
            wanted = head.version if version is None else version
            if wanted > head.version or wanted < 0:
                raise ModelError(f"model {name!r} has no version {wanted}; the newest is {head.version}")
            cached = self._cache.get(name, complete=state)
            if cached is not None and cached.version == wanted and cached.epoch == head.epoch:
                return dataclasses.replace(cached, barrier=head.barrier) if cached.barrier != head.barrier else cached
            if version is None:
                first, n, p = head.blob, head.chunks, head.param_chunks
            else:
                n = int(raw[6] or 1)
                first, p = self.keys.blob(name, wanted), int(raw[7] or n)
            parts = self._fetch(first, n if state else p)
            if parts is not None:
                found = snapshot_of(
                    parts,
                    p,
                    name=name,
                    version=wanted,
                    epoch=head.epoch,
                    barrier=head.barrier,
                    complete=state or n == p,
                )
                if isinstance(found, Snapshot):
                    self._cache.remember(found)
                    return found
                # The model was recreated between our two round trips and the key now holds another
                # incarnation's blob (keys are per version, incarnations reuse them): start over.
                last = (raw, f"the blob at {first} belongs to {found}, not to version {wanted}")
            elif version is not None:
                raise ModelError(
                    f"version {wanted} of model {name!r} is no longer kept (the last {self.keep_versions} are)"
                )
            else:
                # The head moved and its old blob was collected between our two round trips: follow the head again.
                last = (raw, f"the blob of version {wanted} ({first}, {n if state else p} chunk(s)) is missing")
        raise StoreError(f"model {name!r} changed too fast to read a consistent version; retry")

    def _fetch(self, first: str, n: int) -> list[bytes] | None:
        """The first ``n`` chunks of the blob at ``first``, in one round trip; None when any is gone (collected
        meanwhile)."""
        with unavailable():
            parts = [self.client.get(first)] if n == 1 else self.client.mget(chunk_keys(first, n))
        return None if any(part is None for part in parts) else parts

    def applied(self, name: str, update_id: str) -> int | None:
        """The version that update ``update_id`` produced, or None when it was not applied (within the window)."""
        return self.applied_many(name, [update_id])[0]

    def applied_many(self, name: str, update_ids: Sequence[str]) -> list[int | None]:
        """:meth:`applied` for several ids in one round trip (``ZMSCORE``)."""
        if not update_ids:
            return []
        with unavailable():
            scores = self.client.zmscore(self.keys.applied(name), list(update_ids))
        return [None if s is None else int(s) for s in scores]

    def commit(
        self,
        name: str,
        *,
        expected: int,
        tensors: dict[str, torch.Tensor],
        update_id: str = "",
        info: dict[str, Any] | None = None,
        epoch: str = "",
        barrier: bool = False,
        more_ids: Sequence[str] = (),
    ) -> CommitResult:
        """Commit ``tensors`` as version ``expected + 1`` if the head is still ``expected``.

        Args:
            expected: the version the update was computed from.
            tensors: the complete new snapshot (parameters and optimizer state).
            update_id: stable across redelivery (e.g. the task id); an id already applied yields ``duplicate``.
            info: extra fields for the history record (loss, staleness, ...).
            epoch: the incarnation the update was computed on (``Snapshot.epoch``); a recreated model refuses
                it. Empty: any.
            barrier: mark this version as a rollback, so stale gradients from before it are recomputed.
            more_ids: further update ids of a group commit (several steps in this one version), each recorded with
                the new version; when any id of the group was applied before, nothing changes and the result is
                ``duplicate`` with those ids in ``applied``.

        Raises:
            ModelError: the model does not exist, or was recreated since ``epoch``.
            StoreUnavailableError: Redis unreachable, staged chunks evicted, or the AOF fsync not confirmed.
        """
        new = expected + 1
        encoded = EncodedVersion.of(tensors, model=name, version=new, epoch=epoch, chunk_bytes=self.chunk_bytes)
        chunks = encoded.chunks
        staging = chunk_keys(self.keys.staging(name, uuid.uuid4().hex), len(chunks))
        targets = chunk_keys(self.keys.blob(name, new), len(chunks))
        record = json.dumps(
            {
                "version": new,
                "kind": "rollback" if barrier else "commit",
                "update_id": update_id,
                **({"update_ids": [update_id, *more_ids]} if more_ids else {}),
                "at": time.time(),
                **(info or {}),
            }
        )
        with unavailable():
            pipe = self.client.pipeline(transaction=False)
            ttl = staging_ttl(sum(len(chunk) for chunk in chunks))
            for key, chunk in zip(staging, chunks, strict=True):
                pipe.set(key, chunk, ex=ttl)
            pipe.execute()
            reply = self._cas(
                keys=[self.keys.head(name), self.keys.applied(name), self.keys.history(name), *staging, *targets],
                args=[
                    expected,
                    update_id,
                    record,
                    len(chunks),
                    self.keep_versions,
                    epoch,
                    int(barrier),
                    self.dedup_window,
                    self.keys.blob_prefix(name),
                    HISTORY_LENGTH,
                    encoded.param_chunks,
                    *more_ids,
                ],
            )
        outcome, version = _text(reply[0]), reply[1]
        if outcome == "missing":
            raise ModelError(f"unknown model {name!r}; create it first (agent-workers models create)")
        if outcome == "replaced":
            raise ModelError(f"model {name!r} was recreated while this update was computed; it no longer applies")
        if outcome == "nostaging":
            raise StoreUnavailableError(f"staged blob for {name!r} vanished before its commit (Redis evicted it?)")
        applied = {_text(reply[i]): int(reply[i + 1]) for i in range(2, len(reply) - 1, 2)}
        result = CommitResult(CommitOutcome(outcome), int(version), applied)
        if result.outcome is CommitOutcome.COMMITTED and epoch and self._cache.enabled:
            # Keep what we just wrote: the next read of this version costs no download. Decoding the bytes we
            # sent (not keeping ``tensors``) means later in-place changes by the caller cannot leak in.
            hint = self._cache.get(name)
            barrier_at = new if barrier else (hint.barrier if hint else 0)
            self._cache.remember(Snapshot(name, new, epoch, encoded.tensors(), barrier_at, blob_metadata(encoded.blob)))
        if self.wait_aof and result.outcome is not CommitOutcome.CONFLICT:
            # A duplicate too: the first delivery may have died between its commit and its fsync.
            self._wait_aof(name, result.version)
        return result

    def _cas(self, *, keys: list[str], args: list[Any]) -> list[Any]:
        """Run the commit script (a separate method so tests can pause a worker exactly here): its reply, the
        outcome and the version, then (a refused group) pairs of an update id applied before and its version."""
        return list(self._commit(keys=keys, args=args))

    def _wait_aof(self, name: str, version: int) -> None:
        maintenance.wait_aof(self.client, name, version)

    def rollback(self, name: str, version: int, *, update_id: str = "", max_attempts: int = 64) -> int:
        """Make ``version`` current again, as a new version (:func:`agent_workers.store.maintenance.rollback`)."""
        return maintenance.rollback(self, name, version, update_id=update_id, max_attempts=max_attempts)

    def gc(self, name: str) -> int:
        """Delete leftover blob keys (:func:`agent_workers.store.maintenance.gc`); returns how many."""
        return maintenance.gc(self, name)

    def history(self, name: str, limit: int = 20) -> list[dict[str, Any]]:
        """The newest ``limit`` commit records of ``name``."""
        return maintenance.history(self, name, limit)

    # -- coordination -------------------------------------------------------------------------------------------

    def exclusive(
        self, name: str, *, turn: bool = False, turn_wait: float | None = None
    ) -> contextlib.AbstractContextManager[None]:
        """Hold ``name``'s commit lock for a read-compute-commit cycle (lock mode); when optimistic, a no-op, or with
        ``turn`` a short best-effort turn, waited for at most ``turn_wait`` seconds when given
        (:meth:`~agent_workers.store.locks.CommitLock.turn`).

        Raises:
            StoreUnavailableError: the lock was not free within ``lock_wait`` seconds (transient: retry).
        """
        if self.mode != "lock":
            return self._lock.turn(name, wait=turn_wait) if turn else contextlib.nullcontext()
        return self._lock.hold(name)


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
