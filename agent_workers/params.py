"""The versioned parameter store: immutable safetensors blobs, a head pointer, an atomic compare-and-set commit.

A commit uploads the new blob to a fresh staging key, then runs ONE server-side script that checks the expected
version and the update id and only then renames the blob into place and moves the head. Outcomes:

* ``committed``: the head moved from ``expected`` to ``expected + 1``;
* ``conflict``: another commit got there first; the caller re-reads and retries;
* ``duplicate``: this update id was applied before (a redelivered message); nothing changes.

Blobs are immutable once committed, so a reader that follows the head never sees a torn or mixed version.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import time
import uuid
from typing import Any

import redis
import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from agent_workers.config import Settings
from agent_workers.errors import ModelError, StoreError, StoreUnavailableError
from agent_workers.keys import Keys
from agent_workers.models import ModelSpec

PARAM_PREFIX = "p."
STAGING_TTL = 300

_COMMIT = """
-- KEYS: 1 head, 2 applied, 3 staging, 4 new blob, 5 history, 6 blob to collect
-- ARGV: 1 expected version, 2 update id ('' = none), 3 history record, 4 collect (1/0)
if ARGV[2] ~= '' then
  local done = redis.call('HGET', KEYS[2], ARGV[2])
  if done then
    redis.call('DEL', KEYS[3])
    return {'duplicate', tonumber(done)}
  end
end
local cur = tonumber(redis.call('HGET', KEYS[1], 'version'))
if cur == nil then return {'missing', -1} end
if cur ~= tonumber(ARGV[1]) then
  redis.call('DEL', KEYS[3])
  return {'conflict', cur}
end
if redis.call('EXISTS', KEYS[3]) == 0 then return {'nostaging', cur} end
local new = cur + 1
redis.call('RENAME', KEYS[3], KEYS[4])
redis.call('PERSIST', KEYS[4])
redis.call('HSET', KEYS[1], 'version', new, 'blob', KEYS[4])
if ARGV[2] ~= '' then redis.call('HSET', KEYS[2], ARGV[2], new) end
redis.call('LPUSH', KEYS[5], ARGV[3])
redis.call('LTRIM', KEYS[5], 0, 999)
if ARGV[4] == '1' then redis.call('DEL', KEYS[6]) end
return {'committed', new}
"""


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
    """Where a model's parameters are now."""

    version: int
    blob: str
    epoch: str


@dataclasses.dataclass(frozen=True)
class Snapshot:
    """One consistent version: model parameters plus any optimizer state, as CPU tensors."""

    model: str
    version: int
    epoch: str
    tensors: dict[str, torch.Tensor]

    def parameters(self) -> dict[str, torch.Tensor]:
        """The module's state dict (names without the store's prefix)."""
        n = len(PARAM_PREFIX)
        return {k[n:]: v for k, v in self.tensors.items() if k.startswith(PARAM_PREFIX)}


def encode_blob(tensors: dict[str, torch.Tensor], *, model: str, version: int) -> bytes:
    """Serialize tensors with safetensors; the model name and version travel in the header."""
    return st_save({k: v.detach().contiguous().cpu() for k, v in tensors.items()},
                   metadata={"model": model, "version": str(version)})


def decode_blob(data: bytes) -> dict[str, torch.Tensor]:
    """Parse a safetensors blob; anything else (a pickle, garbage) is refused."""
    try:
        return st_load(data)
    except (SafetensorError, ValueError) as exc:
        raise ModelError(f"parameter blob is not valid safetensors: {exc}") from exc


def blob_version(data: bytes) -> int:
    """Read the version recorded in a blob's header without loading the tensors."""
    header_len = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + header_len])
    return int(header["__metadata__"]["version"])


class RedisParamStore:
    """Versioned model parameters in Redis.

    Args:
        client: a redis-py client (bytes responses).
        keys: the key builder of this deployment's namespace.
        keep_versions: how many most recent versions stay readable; older blobs are deleted on commit.
    """

    def __init__(self, *, client: redis.Redis, keys: Keys, keep_versions: int = 10) -> None:
        self.client = client
        self.keys = keys
        self.keep_versions = keep_versions
        self._commit = client.register_script(_COMMIT)
        self._specs: dict[tuple[str, str], ModelSpec] = {}

    @classmethod
    def from_settings(cls, settings: Settings) -> RedisParamStore:
        """A store on ``settings.params_url`` in ``settings.namespace``."""
        client = redis.Redis.from_url(settings.params_url, socket_timeout=30, health_check_interval=30)
        return cls(client=client, keys=Keys(settings.namespace), keep_versions=settings.keep_versions)

    # -- models -------------------------------------------------------------------------------------------------

    def create(self, name: str, spec: ModelSpec, *, seed: int = 0, module: torch.nn.Module | None = None,
               replace: bool = False) -> int:
        """Create ``name`` at version 0 with freshly initialised (seeded) or given weights.

        Raises:
            StoreError: the model exists and ``replace`` is false.
        """
        if not name or any(c in name for c in "{}: "):
            raise ModelError(f"model name {name!r} must be non-empty and free of braces, colons and spaces")
        if module is None:
            torch.manual_seed(seed)
            module = spec.build()
        tensors = {PARAM_PREFIX + k: v for k, v in module.state_dict().items()}
        blob = encode_blob(tensors, model=name, version=0)
        with self._guard():
            if not replace and self.client.exists(self.keys.head(name)):
                raise StoreError(f"model {name!r} already exists; pass replace=True (CLI: --replace) to recreate it")
            self._delete_keys(name)
            pipe = self.client.pipeline(transaction=True)
            pipe.set(self.keys.spec(name), json.dumps(spec.to_json()))
            pipe.set(self.keys.blob(name, 0), blob)
            pipe.hset(self.keys.head(name), mapping={"version": 0, "blob": self.keys.blob(name, 0),
                                                    "epoch": uuid.uuid4().hex})
            pipe.lpush(self.keys.history(name), json.dumps({"version": 0, "kind": "create", "at": time.time()}))
            pipe.sadd(self.keys.models(), name)
            pipe.execute()
        return 0

    def delete(self, name: str) -> None:
        """Remove a model and every version of it."""
        with self._guard():
            self._delete_keys(name)
            self.client.srem(self.keys.models(), name)

    def _delete_keys(self, name: str) -> None:
        pattern = self.keys.spec(name).rsplit(":", 1)[0] + ":*"
        batch = list(self.client.scan_iter(match=pattern, count=500))
        if batch:
            self.client.delete(*batch)

    def list(self) -> list[str]:
        """Names of all models, sorted."""
        with self._guard():
            return sorted(m.decode() for m in self.client.smembers(self.keys.models()))

    def head(self, name: str) -> Head:
        """The current version of ``name`` (one round trip; cheap enough to call per batch).

        Raises:
            ModelError: no such model.
        """
        with self._guard():
            raw = self.client.hgetall(self.keys.head(name))
        if not raw:
            raise ModelError(f"unknown model {name!r}; create it first (agent-workers models create)")
        return Head(version=int(raw[b"version"]), blob=raw[b"blob"].decode(), epoch=raw.get(b"epoch", b"").decode())

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

        Raises:
            ModelError: unknown model, or a version that was never written or is no longer kept.
        """
        for _ in range(5):
            head = self.head(name)
            wanted = head.version if version is None else version
            if wanted > head.version or wanted < 0:
                raise ModelError(f"model {name!r} has no version {wanted}; the newest is {head.version}")
            key = head.blob if version is None else self.keys.blob(name, wanted)
            with self._guard():
                data = self.client.get(key)
            if data is not None:
                tensors = decode_blob(data)
                return Snapshot(model=name, version=wanted, epoch=head.epoch, tensors=tensors)
            if version is not None:
                raise ModelError(
                    f"version {wanted} of model {name!r} is no longer kept (the last {self.keep_versions} are)"
                )
            # The head moved and its old blob was collected between our two reads: follow the head again.
        raise StoreError(f"model {name!r} changed too fast to read a consistent version; retry")

    def commit(self, name: str, *, expected: int, tensors: dict[str, torch.Tensor], update_id: str = "",
               info: dict[str, Any] | None = None) -> CommitResult:
        """Commit ``tensors`` as version ``expected + 1`` if the head is still ``expected``.

        Args:
            expected: the version the update was computed from.
            tensors: the complete new snapshot (parameters and optimizer state).
            update_id: stable across redelivery (e.g. the task id); an id already applied yields ``duplicate``.
            info: extra fields for the history record (loss, staleness, ...).
        """
        new = expected + 1
        staging = self.keys.staging(name, uuid.uuid4().hex)
        blob = encode_blob(tensors, model=name, version=new)
        record = json.dumps({"version": new, "kind": "commit", "update_id": update_id, "at": time.time(),
                             **(info or {})})
        collect = new - self.keep_versions
        with self._guard():
            self.client.set(staging, blob, ex=STAGING_TTL)
            outcome, version = self._commit(
                keys=[self.keys.head(name), self.keys.applied(name), staging, self.keys.blob(name, new),
                      self.keys.history(name), self.keys.blob(name, max(collect, 0))],
                args=[expected, update_id, record, "1" if collect >= 0 else "0"],
            )
        outcome = outcome.decode() if isinstance(outcome, bytes) else outcome
        if outcome == "missing":
            raise ModelError(f"unknown model {name!r}; create it first (agent-workers models create)")
        if outcome == "nostaging":
            raise StoreUnavailableError(f"staged blob for {name!r} vanished before its commit (Redis evicted it?)")
        return CommitResult(Outcome(outcome), int(version))

    def rollback(self, name: str, version: int) -> int:
        """Make the parameters of ``version`` current again, as a new version; returns that new version."""
        old = self.read(name, version)
        while True:
            head = self.head(name)
            result = self.commit(name, expected=head.version, tensors=old.tensors,
                                 info={"kind": "rollback", "to": version})
            if result.outcome is Outcome.COMMITTED:
                return result.version

    def history(self, name: str, limit: int = 20) -> list[dict[str, Any]]:
        """The newest ``limit`` commit records of ``name``."""
        with self._guard():
            raw = self.client.lrange(self.keys.history(name), 0, limit - 1)
        return [json.loads(r) for r in raw]

    def _guard(self) -> _RedisGuard:
        return _RedisGuard()


class _RedisGuard:
    """Turns redis connection errors into :class:`StoreUnavailableError` (transient, retryable)."""

    def __enter__(self) -> None:
        return None

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: object) -> bool:
        if exc is not None and isinstance(exc, (redis.ConnectionError, redis.TimeoutError)):
            raise StoreUnavailableError(f"parameter store unreachable: {exc}") from exc
        return False
