"""Store maintenance: rollback to a kept version, collecting leftovers, and the commit history.

Each is also a method of :class:`~agent_workers.store.params.RedisParamStore` (``store.rollback(...)``).
"""

from __future__ import annotations

import json
from contextlib import AbstractContextManager
from typing import Any, Protocol

from agent_workers.errors import ConfigError, ModelError, StoreUnavailableError, VersionConflictError
from agent_workers.redis_clients import glob_escape, server_version, unavailable
from agent_workers.store.versions import CommitOutcome


class Store(Protocol):
    """What maintenance needs of a parameter store (:class:`~agent_workers.store.params.RedisParamStore` is one).

    A protocol rather than an import: the store calls maintenance, so maintenance must not import the store.
    """

    client: Any
    keys: Any
    keep_versions: int
    artifacts: Any  # agent_workers.store.artifacts.RedisArtifactStore

    def applied(self, name: str, update_id: str) -> int | None: ...
    def head(self, name: str) -> Any: ...
    def exclusive(self, name: str) -> AbstractContextManager[Any]: ...
    def read(self, name: str, version: int | None = None) -> Any: ...
    def commit(self, name: str, **kwargs: Any) -> Any: ...


#: Seconds a staging key lives if its commit never ran (for a small blob; see :func:`staging_ttl`).
STAGING_TTL = 300
#: The slowest upload a commit's staging TTL allows for, bytes per second: 1 MiB/s.
STAGING_MIN_RATE = 1024 * 1024


def staging_ttl(nbytes: int) -> int:
    """Seconds the staged chunks of a ``nbytes`` blob live: ``STAGING_TTL`` plus the time to upload them at
    ``STAGING_MIN_RATE``, so a multi-GB commit over a slow link does not see its first chunks expire before the
    last one lands."""
    return STAGING_TTL + nbytes // STAGING_MIN_RATE


def rollback(store: Store, name: str, version: int, *, update_id: str = "", max_attempts: int = 64) -> int:
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
        done = store.applied(name, update_id)
        if done is not None:
            return done
    head = store.head(name)
    oldest = max(0, head.version - store.keep_versions + 1)
    if not oldest <= version <= head.version:
        raise ModelError(
            f"version {version} of model {name!r} is no longer kept; roll back to one of versions "
            f"{oldest}..{head.version} (AGENT_WORKERS_KEEP_VERSIONS={store.keep_versions})"
        )
    with store.exclusive(name):
        old = store.read(name, version)
        for _ in range(max_attempts):
            head = store.head(name)
            result = store.commit(
                name,
                expected=head.version,
                tensors=old.tensors,
                update_id=update_id,
                info={"to": version},
                epoch=head.epoch,
                barrier=True,
            )
            if result.outcome is not CommitOutcome.CONFLICT:
                return result.version
    raise VersionConflictError(
        f"rollback of {name!r} to version {version} lost {max_attempts} races; retry",
        expected=head.version,
        actual=store.head(name).version,
    )


def gc(store: Store, name: str) -> int:
    """Delete blob keys outside the retention window that a commit did not collect, and artifact sets no kept
    version reads; returns how many keys and sets.

    Leftovers come from a lowered ``keep_versions`` or a Redis that lost a script's tail; staging keys expire
    on their own (``STAGING_TTL``), and any without an expiry get one here.
    """
    head = store.head(name)
    oldest_kept = head.version - store.keep_versions + 1
    prefix = store.keys.blob_prefix(name)
    doomed: list[str] = []
    with unavailable():
        for raw in store.client.scan_iter(match=glob_escape(prefix) + "*", count=1000):
            key = raw.decode()
            number = key[len(prefix) :].split(":", 1)[0]
            if number.isdigit() and int(number) < oldest_kept:
                doomed.append(key)
        staging = glob_escape(store.keys.staging(name, "")) + "*"
        for raw in store.client.scan_iter(match=staging, count=1000):
            if store.client.ttl(raw) == -1:
                store.client.expire(raw, STAGING_TTL)
        stale = [
            f
            for f in store.client.hkeys(store.keys.head(name))
            if f.startswith(b"chunks:") and int(f[7:]) < oldest_kept
        ]
        if doomed:
            store.client.delete(*doomed)
        if stale:
            store.client.hdel(store.keys.head(name), *stale)
    return len(doomed) + store.artifacts.prune(name, head.version)


def history(store: Store, name: str, limit: int = 20) -> list[dict[str, Any]]:
    """The newest ``limit`` commit records of ``name`` (every one with ``limit=0``)."""
    with unavailable():
        raw = store.client.lrange(store.keys.history(name), 0, limit - 1)
    return [json.loads(r) for r in raw]


#: Milliseconds a commit waits for Redis to confirm its AOF fsync (``WAITAOF 1 0``).
WAIT_AOF_TIMEOUT_MS = 5000


def check_durability(client: Any) -> None:
    """Make sure ``WAITAOF 1 0`` can work on ``client``'s Redis.

    Raises:
        ConfigError: Redis older than 7.2 (naming the version found), or its AOF is off.
    """
    with unavailable():
        version = server_version(client)
        if version < (7, 2):
            found = ".".join(str(p) for p in version)
            raise ConfigError(
                f"AGENT_WORKERS_WAIT_AOF needs WAITAOF, which Redis has since 7.2; the parameter Redis is "
                f"{found}. Upgrade it, or unset AGENT_WORKERS_WAIT_AOF (and use appendfsync always instead)"
            )
        if not int(client.info("persistence").get("aof_enabled", 0)):
            raise ConfigError(
                "AGENT_WORKERS_WAIT_AOF is set but the parameter Redis has appendonly off; "
                "set 'appendonly yes' there, or unset AGENT_WORKERS_WAIT_AOF"
            )


def wait_aof(client: Any, name: str, version: int) -> None:
    """Wait until Redis fsynced the commit of ``version`` to its AOF.

    Raises:
        StoreUnavailableError: not confirmed within :data:`WAIT_AOF_TIMEOUT_MS` (the task retries; its update id
            makes the retry a no-op).
    """
    with unavailable():
        local, _replicas = client.execute_command("WAITAOF", 1, 0, WAIT_AOF_TIMEOUT_MS)
    if int(local) < 1:
        raise StoreUnavailableError(
            f"version {version} of {name!r} is committed but Redis did not confirm its AOF fsync within "
            f"{WAIT_AOF_TIMEOUT_MS} ms; the task retries, and its update id makes the retry a no-op"
        )
