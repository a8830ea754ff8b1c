"""The versioned parameter store: immutable safetensors blobs, a head pointer, an atomic compare-and-set commit.

A commit uploads the new blob to fresh staging keys (one per chunk of at most ``chunk_bytes``), then runs ONE
server-side script that checks the model incarnation, the update id and the expected version, and only then
renames the chunks into place, moves the head, records the update id and collects the version that fell out of
the retention window. Outcomes:

* ``committed``: the head moved from ``expected`` to ``expected + 1``;
* ``conflict``: another commit got there first; the caller re-reads and retries;
* ``duplicate``: this update id was applied before (a redelivered message); nothing changes.

Blobs are immutable once committed and carry their model, version and incarnation in the safetensors header, so a
reader that follows the head checks what it got and never returns a torn or mixed version. Readers pay one small
``HMGET`` per call; the blob itself is fetched only when the version changed (the newest snapshot is cached).

Two coordination modes share this class: ``optimistic`` (the default: trainers race, the compare-and-set picks
one winner) and ``lock`` (:meth:`RedisParamStore.exclusive` holds a Redis lock from read to commit; the
compare-and-set still fences a holder whose lock expired). Keys are laid out in :mod:`agent_workers.keys`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import json
import logging
import math
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import redis
import torch
from redis.exceptions import LockError
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from agent_workers.config import DEFAULT_CHUNK_BYTES, DEFAULT_LOCK_TIMEOUT, Settings
from agent_workers.errors import ConfigError, ModelError, StoreError, StoreUnavailableError
from agent_workers.keys import Keys
from agent_workers.models import ModelSpec

log = logging.getLogger(__name__)

PARAM_PREFIX = "p."
STAGING_TTL = 300
HISTORY_LENGTH = 1000
DEFAULT_DEDUP_WINDOW = 1_000_000
DEFAULT_LOCK_WAIT = 120.0
LOCK_POLL = 0.002
WAIT_AOF_TIMEOUT_MS = 5000
READ_ATTEMPTS = 8
COMMIT_MODES = ("optimistic", "lock")
_BAD_NAME_CHARS = set("{}:*?[]\\") | {" ", "\t", "\n"}

_COMMIT = """
-- KEYS: 1 head, 2 applied (zset update id -> version), 3 history, then n staging chunks, then n blob chunks
-- ARGV: 1 expected version, 2 update id ('' = none), 3 history record, 4 n, 5 keep versions,
--       6 epoch ('' = any), 7 set the staleness barrier (1/0), 8 dedup window (versions), 9 blob key prefix
local n = tonumber(ARGV[4])
local function drop_staging()
  for i = 1, n do redis.call('DEL', KEYS[3 + i]) end
end
if ARGV[2] ~= '' then
  local done = redis.call('ZSCORE', KEYS[2], ARGV[2])
  if done then drop_staging(); return {'duplicate', tonumber(done)} end
end
local head = redis.call('HMGET', KEYS[1], 'version', 'epoch')
local cur = tonumber(head[1])
if cur == nil then drop_staging(); return {'missing', -1} end
if ARGV[6] ~= '' and head[2] ~= ARGV[6] then drop_staging(); return {'replaced', cur} end
if cur ~= tonumber(ARGV[1]) then drop_staging(); return {'conflict', cur} end
for i = 1, n do
  if redis.call('EXISTS', KEYS[3 + i]) == 0 then drop_staging(); return {'nostaging', cur} end
end
local new = cur + 1
for i = 1, n do
  redis.call('RENAME', KEYS[3 + i], KEYS[3 + n + i])
  redis.call('PERSIST', KEYS[3 + n + i])
end
redis.call('HSET', KEYS[1], 'version', new, 'blob', KEYS[4 + n], 'chunks', n)
if n > 1 then redis.call('HSET', KEYS[1], 'chunks:' .. new, n) end
if ARGV[7] == '1' then redis.call('HSET', KEYS[1], 'barrier', new) end
if ARGV[2] ~= '' then
  redis.call('ZADD', KEYS[2], new, ARGV[2])
  redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', new - tonumber(ARGV[8]))
end
redis.call('LPUSH', KEYS[3], ARGV[3])
redis.call('LTRIM', KEYS[3], 0, HISTORY_LAST)
-- Collect the version that just left the retention window. Its chunk keys are derived from the blob prefix
-- rather than declared: they share the model's hash tag, hence the slot, and the client cannot know how many
-- chunks an old version had without another round trip.
local old = new - tonumber(ARGV[5])
if old >= 0 then
  local m = tonumber(redis.call('HGET', KEYS[1], 'chunks:' .. old) or '1')
  redis.call('DEL', ARGV[9] .. old)
  for i = 1, m - 1 do redis.call('DEL', ARGV[9] .. old .. ':' .. i) end
  if m > 1 then redis.call('HDEL', KEYS[1], 'chunks:' .. old) end
end
return {'committed', new}
""".replace("HISTORY_LAST", str(HISTORY_LENGTH - 1))


class Outcome(enum.StrEnum):
    """What a commit did."""

    COMMITTED = "committed"
    CONFLICT = "conflict"
    DUPLICATE = "duplicate"


@dataclasses.dataclass(frozen=True)
class CommitResult:
    """The outcome of a commit and the version it concerns (new, current, or the one the update produced)."""

    outcome: Outcome
    version: int


@dataclasses.dataclass(frozen=True)
class Head:
    """Where a model's parameters are now.

    Attributes:
        version: the current version.
        blob: the key of its (first) blob chunk.
        epoch: the model's incarnation; ``create(replace=True)`` starts a new one.
        barrier: the newest rollback's version; gradients computed before it must not be applied after it.
        chunks: how many keys the current blob spans.
    """

    version: int
    blob: str
    epoch: str
    barrier: int = 0
    chunks: int = 1


@dataclasses.dataclass(frozen=True)
class Snapshot:
    """One consistent version: model parameters plus any optimizer state, as CPU tensors.

    Snapshots may be shared by the store's cache: treat ``tensors`` as read-only (clone before changing).
    """

    model: str
    version: int
    epoch: str
    tensors: dict[str, torch.Tensor]
    barrier: int = 0
    meta: dict[str, str] = dataclasses.field(default_factory=dict)

    def parameters(self) -> dict[str, torch.Tensor]:
        """The module's state dict (names without the store's prefix)."""
        n = len(PARAM_PREFIX)
        return {k[n:]: v for k, v in self.tensors.items() if k.startswith(PARAM_PREFIX)}


def encode_blob(tensors: dict[str, torch.Tensor], *, model: str, version: int, epoch: str = "") -> bytes:
    """Serialize tensors with safetensors; model, version and incarnation travel in the header."""
    return st_save({k: v.detach().contiguous().cpu() for k, v in tensors.items()},
                   metadata={"model": model, "version": str(version), "epoch": epoch})


def decode_blob(data: bytes) -> dict[str, torch.Tensor]:
    """Parse a safetensors blob; anything else (a pickle, garbage) is refused."""
    try:
        return st_load(data)
    except (SafetensorError, ValueError) as exc:
        raise ModelError(f"parameter blob is not valid safetensors: {exc}") from exc


def blob_metadata(data: bytes) -> dict[str, str]:
    """The ``__metadata__`` of a blob's header (model, version, epoch) without loading the tensors."""
    try:
        header_len = int.from_bytes(data[:8], "little")
        header = json.loads(bytes(data[8 : 8 + header_len]))
        return dict(header.get("__metadata__") or {})
    except (ValueError, UnicodeDecodeError) as exc:
        raise ModelError(f"parameter blob has no readable safetensors header: {exc}") from exc


def blob_version(data: bytes) -> int:
    """Read the version recorded in a blob's header without loading the tensors."""
    return int(blob_metadata(data)["version"])


def split_chunks(data: bytes, chunk_bytes: int) -> list[memoryview]:
    """Cut ``data`` into views of at most ``chunk_bytes`` (at least one, even when empty); no copies."""
    view = memoryview(data)
    n = max(1, math.ceil(len(data) / chunk_bytes))
    return [view[i * chunk_bytes : (i + 1) * chunk_bytes] for i in range(n)]


def chunk_keys(first: str, n: int) -> list[str]:
    """Keys of an ``n``-chunk blob whose first chunk lives at ``first`` (the others at ``first:1`` ...)."""
    return [first] + [f"{first}:{i}" for i in range(1, n)]


def redis_version(client: redis.Redis) -> tuple[int, ...]:
    """The server's version as a tuple, e.g. ``(7, 0, 15)``."""
    raw = str(client.info("server").get("redis_version", "0"))
    return tuple(int(p) for p in raw.split(".") if p.isdigit())


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
        dedup_window: how many versions an applied update id is remembered for (a redelivery later than that
            would apply again).

    Raises:
        ConfigError: ``wait_aof`` on a Redis that cannot do it (older than 7.2, or AOF off).
    """

    def __init__(self, *, client: redis.Redis, keys: Keys, keep_versions: int = 10, mode: str = "optimistic",
                 chunk_bytes: int = DEFAULT_CHUNK_BYTES, wait_aof: bool = False,
                 lock_timeout: float = DEFAULT_LOCK_TIMEOUT, lock_wait: float = DEFAULT_LOCK_WAIT,
                 cache: bool = True, dedup_window: int = DEFAULT_DEDUP_WINDOW) -> None:
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
        self.lock_wait = lock_wait
        self.dedup_window = dedup_window
        self._commit = client.register_script(_COMMIT)
        self._specs: dict[tuple[str, str], ModelSpec] = {}
        self._cache: dict[str, Snapshot] | None = {} if cache else None
        self._cache_lock = threading.Lock()
        if wait_aof:
            self.check_durability()

    @classmethod
    def from_settings(cls, settings: Settings, **overrides: Any) -> RedisParamStore:
        """A store on ``settings.params_url`` in ``settings.namespace`` with the settings' mode and limits.

        The URL may name one Redis, a Sentinel-managed master or a Redis Cluster (see redis_clients.py).
        """
        from agent_workers.redis_clients import redis_client

        client = redis_client(settings.params_url, sentinel_master=settings.sentinel_master, socket_timeout=30,
                              health_check_interval=30)
        options: dict[str, Any] = {
            "keep_versions": settings.keep_versions,
            "mode": settings.commit_mode,
            "chunk_bytes": settings.chunk_bytes,
            "wait_aof": settings.wait_aof,
            "lock_timeout": settings.lock_timeout,
        }
        options.update(overrides)
        return cls(client=client, keys=Keys(settings.namespace), **options)

    def check_durability(self) -> None:
        """Make sure ``WAITAOF 1 0`` can work here.

        Raises:
            ConfigError: Redis older than 7.2 (naming the version found), or its AOF is off.
        """
        with self._guard():
            version = redis_version(self.client)
            if version < (7, 2):
                found = ".".join(str(p) for p in version)
                raise ConfigError(
                    f"AGENT_WORKERS_WAIT_AOF needs WAITAOF, which Redis has since 7.2; the parameter Redis is "
                    f"{found}. Upgrade it, or unset AGENT_WORKERS_WAIT_AOF (and use appendfsync always instead)"
                )
            if not int(self.client.info("persistence").get("aof_enabled", 0)):
                raise ConfigError(
                    "AGENT_WORKERS_WAIT_AOF is set but the parameter Redis has appendonly off; "
                    "set 'appendonly yes' there, or unset AGENT_WORKERS_WAIT_AOF"
                )

    # -- models -------------------------------------------------------------------------------------------------

    def create(self, name: str, spec: ModelSpec, *, seed: int = 0, module: torch.nn.Module | None = None,
               replace: bool = False) -> int:
        """Create ``name`` at version 0 with freshly initialised (seeded) or given weights.

        Raises:
            ModelError: a name that cannot be a key part.
            StoreError: the model exists and ``replace`` is false.
        """
        if not name or any(c in _BAD_NAME_CHARS for c in name):
            raise ModelError(f"model name {name!r} must be non-empty and free of spaces and of the characters "
                             "{ } : * ? [ ] \\")
        if module is None:
            torch.manual_seed(seed)
            module = spec.build()
        epoch = uuid.uuid4().hex
        tensors = {PARAM_PREFIX + k: v for k, v in module.state_dict().items()}
        blob = encode_blob(tensors, model=name, version=0, epoch=epoch)
        chunks = split_chunks(blob, self.chunk_bytes)
        targets = chunk_keys(self.keys.blob(name, 0), len(chunks))
        with self._guard():
            if not replace and self.client.exists(self.keys.head(name)):
                raise StoreError(f"model {name!r} already exists; pass replace=True (CLI: --replace) to recreate it")
            self._delete_keys(name)
            pipe = self.client.pipeline(transaction=True)
            pipe.set(self.keys.spec(name), json.dumps(spec.to_json()))
            for key, chunk in zip(targets, chunks, strict=True):
                pipe.set(key, chunk)
            head: dict[str, Any] = {"version": 0, "blob": targets[0], "epoch": epoch, "barrier": 0,
                                    "chunks": len(chunks)}
            if len(chunks) > 1:
                head["chunks:0"] = len(chunks)
            pipe.hset(self.keys.head(name), mapping=head)
            pipe.lpush(self.keys.history(name), json.dumps({"version": 0, "kind": "create", "at": time.time()}))
            pipe.execute()
            # The index of models is not in the model's hash slot, so it is written outside its transaction (a
            # Redis Cluster refuses cross-slot transactions); a crash in between leaves a model `list` misses.
            self.client.sadd(self.keys.models(), name)
        self._forget(name)
        return 0

    def delete(self, name: str) -> None:
        """Remove a model and every version of it."""
        with self._guard():
            self._delete_keys(name)
            self.client.srem(self.keys.models(), name)
        self._forget(name)

    def _delete_keys(self, name: str) -> None:
        pattern = _glob_escape(self.keys.spec(name).rsplit(":", 1)[0]) + ":*"
        batch = list(self.client.scan_iter(match=pattern, count=500))
        if batch:
            self.client.delete(*batch)

    def list(self) -> list[str]:
        """Names of all models, sorted."""
        with self._guard():
            return sorted(m.decode() for m in self.client.smembers(self.keys.models()))

    def head(self, name: str) -> Head:
        """The current version of ``name`` (one small round trip; cheap enough to call per batch).

        Raises:
            ModelError: no such model.
        """
        with self._guard():
            raw = self.client.hmget(self.keys.head(name), "version", "blob", "epoch", "barrier", "chunks")
        return self._parse_head(name, raw)

    @staticmethod
    def _parse_head(name: str, raw: list[bytes | None]) -> Head:
        version, blob, epoch, barrier, chunks = raw[:5]
        if version is None or blob is None:
            raise ModelError(f"unknown model {name!r}; create it first (agent-workers models create)")
        return Head(version=int(version), blob=blob.decode(), epoch=(epoch or b"").decode(),
                    barrier=int(barrier or 0), chunks=int(chunks or 1))

    def spec(self, name: str, epoch: str | None = None) -> ModelSpec:
        """The architecture spec of ``name`` (cached per model incarnation)."""
        if epoch is None:
            epoch = self.head(name).epoch
        cached = self._specs.get((name, epoch))
        if cached is not None:
            return cached
        with self._guard():
            raw = self.client.get(self.keys.spec(name))
        if raw is None:
            raise ModelError(f"unknown model {name!r}; create it first (agent-workers models create)")
        spec = ModelSpec.from_json(json.loads(raw))
        self._specs[(name, epoch)] = spec
        return spec

    def read(self, name: str, version: int | None = None) -> Snapshot:
        """Read the current (or a pinned) version as one consistent snapshot.

        One ``HMGET`` of the head; the blob is downloaded only when the cached snapshot is not that version. The
        blob's header must name the model, the version and the incarnation the head promised.

        Raises:
            ModelError: unknown model, or a version that was never written or is no longer kept.
            StoreError: the head moved too fast to catch a version before it was collected.
        """
        fields = ["version", "blob", "epoch", "barrier", "chunks"]
        if version is not None:
            fields.append(f"chunks:{version}")
        for _ in range(READ_ATTEMPTS):
            with self._guard():
                raw = self.client.hmget(self.keys.head(name), *fields)
            head = self._parse_head(name, raw)
            wanted = head.version if version is None else version
            if wanted > head.version or wanted < 0:
                raise ModelError(f"model {name!r} has no version {wanted}; the newest is {head.version}")
            cached = self._cached(name)
            if cached is not None and cached.version == wanted and cached.epoch == head.epoch:
                return dataclasses.replace(cached, barrier=head.barrier) if cached.barrier != head.barrier else cached
            if version is None:
                first, n = head.blob, head.chunks
            else:
                first, n = self.keys.blob(name, wanted), int(raw[5] or 1)
            data = self._fetch(first, n)
            if data is not None:
                meta = blob_metadata(data)
                if (meta.get("model") == name and meta.get("version") == str(wanted)
                        and meta.get("epoch", "") in ("", head.epoch)):
                    snap = Snapshot(name, wanted, head.epoch, decode_blob(data), head.barrier, meta)
                    self._remember(snap)
                    return snap
                # The model was recreated between our two round trips and the key now holds another
                # incarnation's blob (keys are per version, incarnations reuse them): start over.
            elif version is not None:
                raise ModelError(
                    f"version {wanted} of model {name!r} is no longer kept (the last {self.keep_versions} are)"
                )
            # The head moved and its old blob was collected between our two round trips: follow the head again.
        raise StoreError(f"model {name!r} changed too fast to read a consistent version; retry")

    def _fetch(self, first: str, n: int) -> bytes | None:
        """The blob whose chunks start at ``first``; None when any chunk is gone (collected meanwhile)."""
        with self._guard():
            if n == 1:
                return self.client.get(first)
            parts = self.client.mget(chunk_keys(first, n))
        if any(p is None for p in parts):
            return None
        return b"".join(parts)

    def applied(self, name: str, update_id: str) -> int | None:
        """The version that update ``update_id`` produced, or None when it was not applied (within the window)."""
        with self._guard():
            score = self.client.zscore(self.keys.applied(name), update_id)
        return None if score is None else int(score)

    def commit(self, name: str, *, expected: int, tensors: dict[str, torch.Tensor], update_id: str = "",
               info: dict[str, Any] | None = None, epoch: str = "", barrier: bool = False) -> CommitResult:
        """Commit ``tensors`` as version ``expected + 1`` if the head is still ``expected``.

        Args:
            expected: the version the update was computed from.
            tensors: the complete new snapshot (parameters and optimizer state).
            update_id: stable across redelivery (e.g. the task id); an id already applied yields ``duplicate``.
            info: extra fields for the history record (loss, staleness, ...).
            epoch: the incarnation the update was computed on (``Snapshot.epoch``); a recreated model refuses
                it. Empty: any.
            barrier: mark this version as a rollback, so stale gradients from before it are recomputed.

        Raises:
            ModelError: the model does not exist, or was recreated since ``epoch``.
            StoreUnavailableError: Redis unreachable, staged chunks evicted, or the AOF fsync not confirmed.
        """
        new = expected + 1
        blob = encode_blob(tensors, model=name, version=new, epoch=epoch)
        chunks = split_chunks(blob, self.chunk_bytes)
        staging = chunk_keys(self.keys.staging(name, uuid.uuid4().hex), len(chunks))
        targets = chunk_keys(self.keys.blob(name, new), len(chunks))
        record = json.dumps({"version": new, "kind": "rollback" if barrier else "commit", "update_id": update_id,
                             "at": time.time(), **(info or {})})
        with self._guard():
            pipe = self.client.pipeline(transaction=False)
            for key, chunk in zip(staging, chunks, strict=True):
                pipe.set(key, chunk, ex=STAGING_TTL)
            pipe.execute()
            outcome, version = self._cas(
                keys=[self.keys.head(name), self.keys.applied(name), self.keys.history(name), *staging, *targets],
                args=[expected, update_id, record, len(chunks), self.keep_versions, epoch, int(barrier),
                      self.dedup_window, self.keys.blob_prefix(name)],
            )
        outcome = outcome.decode() if isinstance(outcome, bytes) else outcome
        if outcome == "missing":
            raise ModelError(f"unknown model {name!r}; create it first (agent-workers models create)")
        if outcome == "replaced":
            raise ModelError(f"model {name!r} was recreated while this update was computed; it no longer applies")
        if outcome == "nostaging":
            raise StoreUnavailableError(f"staged blob for {name!r} vanished before its commit (Redis evicted it?)")
        result = CommitResult(Outcome(outcome), int(version))
        if result.outcome is Outcome.COMMITTED and epoch and self._cache is not None:
            # Keep what we just wrote: the next read of this version costs no download. Decoding the bytes we
            # sent (not keeping ``tensors``) means later in-place changes by the caller cannot leak in.
            self._remember(Snapshot(name, new, epoch, decode_blob(blob),
                                    new if barrier else self._barrier_hint(name), blob_metadata(blob)))
        if self.wait_aof and result.outcome is not Outcome.CONFLICT:
            # A duplicate too: the first delivery may have died between its commit and its fsync.
            self._wait_aof(name, result.version)
        return result

    def _cas(self, *, keys: list[str], args: list[Any]) -> tuple[bytes, int]:
        """Run the commit script (a separate method so tests can pause a worker exactly here)."""
        outcome, version = self._commit(keys=keys, args=args)
        return outcome, version

    def _wait_aof(self, name: str, version: int) -> None:
        with self._guard():
            local, _replicas = self.client.execute_command("WAITAOF", 1, 0, WAIT_AOF_TIMEOUT_MS)
        if int(local) < 1:
            raise StoreUnavailableError(
                f"version {version} of {name!r} is committed but Redis did not confirm its AOF fsync within "
                f"{WAIT_AOF_TIMEOUT_MS} ms; the task retries, and its update id makes the retry a no-op"
            )

    def rollback(self, name: str, version: int, *, update_id: str = "", max_attempts: int = 64) -> int:
        """Make the parameters (and optimizer state) of ``version`` current again, as a new version.

        The blob is re-encoded, not copied, because its header must carry the new version. The new version is a
        staleness barrier: gradients computed before it are recomputed rather than applied on top of it.

        Returns:
            The new version (or, for an ``update_id`` already applied, the version it produced).

        Raises:
            ModelError: ``version`` is unknown or no longer kept.
            StoreError: still conflicting after ``max_attempts`` commits.
        """
        if update_id:
            done = self.applied(name, update_id)
            if done is not None:
                return done
        with self.exclusive(name):
            old = self.read(name, version)
            for _ in range(max_attempts):
                head = self.head(name)
                result = self.commit(name, expected=head.version, tensors=old.tensors, update_id=update_id,
                                     info={"to": version}, epoch=head.epoch, barrier=True)
                if result.outcome is not Outcome.CONFLICT:
                    return result.version
        raise StoreError(f"rollback of {name!r} to version {version} lost {max_attempts} races; retry")

    def gc(self, name: str) -> int:
        """Delete blob keys outside the retention window that a commit did not collect; returns how many.

        Leftovers come from a lowered ``keep_versions`` or a Redis that lost a script's tail; staging keys expire
        on their own (``STAGING_TTL``), and any without an expiry get one here.
        """
        head = self.head(name)
        oldest_kept = head.version - self.keep_versions + 1
        prefix = self.keys.blob_prefix(name)
        doomed: list[str] = []
        with self._guard():
            for raw in self.client.scan_iter(match=_glob_escape(prefix) + "*", count=1000):
                key = raw.decode()
                number = key[len(prefix) :].split(":", 1)[0]
                if number.isdigit() and int(number) < oldest_kept:
                    doomed.append(key)
            staging = _glob_escape(self.keys.staging(name, "")) + "*"
            for raw in self.client.scan_iter(match=staging, count=1000):
                if self.client.ttl(raw) == -1:
                    self.client.expire(raw, STAGING_TTL)
            stale = [f for f in self.client.hkeys(self.keys.head(name))
                     if f.startswith(b"chunks:") and int(f[7:]) < oldest_kept]
            if doomed:
                self.client.delete(*doomed)
            if stale:
                self.client.hdel(self.keys.head(name), *stale)
        return len(doomed)

    def history(self, name: str, limit: int = 20) -> list[dict[str, Any]]:
        """The newest ``limit`` commit records of ``name``."""
        with self._guard():
            raw = self.client.lrange(self.keys.history(name), 0, limit - 1)
        return [json.loads(r) for r in raw]

    # -- coordination -------------------------------------------------------------------------------------------

    def exclusive(self, name: str) -> contextlib.AbstractContextManager[None]:
        """Hold ``name``'s commit lock for a read-compute-commit cycle (lock mode); a no-op when optimistic.

        Raises:
            StoreUnavailableError: the lock was not free within ``lock_wait`` seconds (transient: retry).
        """
        if self.mode != "lock":
            return contextlib.nullcontext()
        return self._locked(name)

    @contextlib.contextmanager
    def _locked(self, name: str) -> Iterator[None]:
        lock = self.client.lock(self.keys.lock(name), timeout=self.lock_timeout, sleep=LOCK_POLL,
                                blocking_timeout=self.lock_wait)
        with self._guard():
            acquired = lock.acquire()
        if not acquired:
            raise StoreUnavailableError(f"commit lock of {name!r} not free within {self.lock_wait:.0f}s")
        try:
            yield
        finally:
            try:
                with self._guard():
                    lock.release()
            except LockError:
                # It expired while we held it; the compare-and-set already kept our commit safe.
                log.warning("commit lock of %s expired before release (lock_timeout=%ss is short for this "
                            "step)", name, self.lock_timeout)

    # -- cache --------------------------------------------------------------------------------------------------

    def _cached(self, name: str) -> Snapshot | None:
        return None if self._cache is None else self._cache.get(name)

    def _remember(self, snap: Snapshot) -> None:
        if self._cache is None:
            return
        with self._cache_lock:
            current = self._cache.get(snap.model)
            if current is None or current.epoch != snap.epoch or snap.version >= current.version:
                self._cache[snap.model] = snap

    def _forget(self, name: str) -> None:
        if self._cache is not None:
            with self._cache_lock:
                self._cache.pop(name, None)

    def _barrier_hint(self, name: str) -> int:
        cached = self._cached(name)
        return cached.barrier if cached is not None else 0

    def _guard(self) -> _RedisGuard:
        return _RedisGuard()


def _glob_escape(text: str) -> str:
    """Escape Redis glob metacharacters so a key prefix matches only itself."""
    return "".join("\\" + c if c in "*?[]\\" else c for c in text)


class _RedisGuard:
    """Turns redis connection errors into :class:`StoreUnavailableError` (transient, retryable)."""

    def __enter__(self) -> None:
        return None

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: object) -> bool:
        if exc is not None and isinstance(exc, (redis.ConnectionError, redis.TimeoutError)):
            raise StoreUnavailableError(f"parameter store unreachable: {exc}") from exc
        return False
