"""redis-py clients built from our URLs: one server, a Sentinel-managed master, or a Redis Cluster.

Every Redis we talk to directly (the parameter store, uploaded datasets) is built here, so one URL setting picks
the topology::

    redis://[[user]:password@]host:port/db        one server; rediss:// for TLS, unix:///path?db=N for a socket
    sentinel://[[user]:password@]host:port[;sentinel://host:port...]/db
                                                  the master Sentinel names AGENT_WORKERS_SENTINEL_MASTER; the
                                                  format of kombu's broker and Celery's backend URLs (sentinels
                                                  apart by ``;``, password and /db on the first one)
    redis+cluster://[[user]:password@]host:port[,host:port...]
                                                  a Redis Cluster (parameter store only; database 0); hosts are
                                                  only where the client starts, it discovers the rest
    rediss+cluster://...                          the same over TLS (``?ssl_cert_reqs=...`` etc. as for rediss://)

A Sentinel client asks the sentinels for the master on every new connection and drops connections to a master
that was demoted (redis-py's ``SentinelConnectionPool``), so it follows a failover. A cluster client routes each
command by key slot; our keys carry one hash tag per model (keys.py), so a model's commit script, its pipelines
and its multi-key reads stay within one slot.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any
from urllib.parse import unquote, urlparse

import redis
from redis.cluster import ClusterNode, RedisCluster
from redis.sentinel import Sentinel

from agent_workers.config import DEFAULT_SENTINEL_MASTER
from agent_workers.errors import ConfigError, StoreUnavailableError
from agent_workers.urls import sentinel_url_problem

SENTINEL_SCHEMES = frozenset({"sentinel"})
CLUSTER_SCHEMES = frozenset({"redis+cluster", "rediss+cluster"})
PLAIN_SCHEMES = frozenset({"redis", "rediss", "unix"})
DEFAULT_SENTINEL_PORT = 26379
DEFAULT_REDIS_PORT = 6379

__all__ = ["CLUSTER_SCHEMES", "SENTINEL_SCHEMES", "redis_client", "sentinel_hosts"]


def redis_client(
    url: str, *, sentinel_master: str = DEFAULT_SENTINEL_MASTER, **options: Any
) -> redis.Redis | RedisCluster:
    """A redis-py client for ``url`` (any form in the module docstring).

    Args:
        url: where the data lives.
        sentinel_master: the master name to ask the sentinels for (``sentinel://`` only).
        options: redis-py connection options (``socket_timeout``, ``health_check_interval`` ...).

    Returns:
        ``redis.Redis`` for a server or a Sentinel-managed master, ``redis.cluster.RedisCluster`` for a cluster;
        both answer the same commands for single-slot work.

    Raises:
        ConfigError: a scheme we cannot serve, or a malformed host list.
    """
    scheme = urlparse(url).scheme
    if scheme in PLAIN_SCHEMES:
        return redis.Redis.from_url(url, **options)
    if scheme in SENTINEL_SCHEMES:
        return _sentinel_master(url, sentinel_master, options)
    if scheme in CLUSTER_SCHEMES:
        return _cluster(url, options)
    raise ConfigError(
        f"{_masked(url)} is not a Redis URL; use redis://, rediss://, unix://, sentinel:// or redis+cluster://"
    )


def sentinel_hosts(url: str) -> list[tuple[str, int]]:
    """The ``(host, port)`` of every sentinel in a ``sentinel://a:1;sentinel://b:2/0`` URL."""
    hosts = []
    for part in url.split(";"):
        parsed = urlparse(part.strip())
        if parsed.scheme not in SENTINEL_SCHEMES or not parsed.hostname:
            raise ConfigError(f"{_masked(url)}: every ';'-separated part must be sentinel://host:port")
        hosts.append((parsed.hostname, parsed.port or DEFAULT_SENTINEL_PORT))
    return hosts


def _sentinel_master(url: str, master: str, options: dict[str, Any]) -> redis.Redis:
    # kombu and Celery read the password and the database from the first sentinel's URL; so do we, and refuse a
    # URL that puts them elsewhere (they would silently use database 0 there).
    problem = sentinel_url_problem(url)
    if problem:
        raise ConfigError(f"{_masked(url)}: {problem}")
    first = urlparse(url.split(";")[0].strip())
    connection: dict[str, Any] = dict(options)
    connection["db"] = _db(first.path, url)
    if first.password:
        connection["password"] = unquote(first.password)
    if first.username:
        connection["username"] = unquote(first.username)
    # The sentinels themselves get only the socket options (no password, no db), as redis-py defaults it.
    sentinel_kwargs = {k: v for k, v in options.items() if k.startswith("socket_")}
    sentinel = Sentinel(sentinel_hosts(url), sentinel_kwargs=sentinel_kwargs, **connection)
    return sentinel.master_for(master)


def _cluster(url: str, options: dict[str, Any]) -> RedisCluster:
    parsed = urlparse(url)
    netloc = parsed.netloc.rsplit("@", 1)
    userinfo, hostlist = (netloc[0] + "@", netloc[1]) if len(netloc) == 2 else ("", netloc[0])
    nodes = []
    for item in hostlist.split(","):
        host, _, port = item.strip().rpartition(":")
        if not host or not port.isdigit():
            host, port = item.strip(), str(DEFAULT_REDIS_PORT)
        if not host:
            raise ConfigError(f"{_masked(url)}: list the cluster nodes as host:port,host:port")
        nodes.append(ClusterNode(host.strip("[]"), int(port)))
    if _db(parsed.path, url) != 0:
        raise ConfigError(f"{_masked(url)}: a Redis Cluster has only database 0; drop the /db from the URL")
    # redis-py parses one node's URL (credentials, TLS query options); the other nodes join as startup nodes.
    plain = "rediss" if parsed.scheme.startswith("rediss") else "redis"
    first = f"{plain}://{userinfo}{nodes[0].host}:{nodes[0].port}" + (f"?{parsed.query}" if parsed.query else "")
    return RedisCluster.from_url(first, startup_nodes=nodes[1:], **options)


def _db(path: str, url: str) -> int:
    raw = path.strip("/")
    if not raw:
        return 0
    if not raw.isdigit():
        raise ConfigError(f"{_masked(url)}: the path must be a database number, got {raw!r}")
    return int(raw)


def _masked(url: str) -> str:
    """``url`` without its password, for error messages."""
    parsed = urlparse(url.split(";")[0])
    if parsed.password:
        return url.replace(f":{parsed.password}@", ":***@")
    return url


def server_version(client: redis.Redis) -> tuple[int, ...]:
    """The server's version as a tuple, e.g. ``(7, 0, 15)``."""
    raw = str(client.info("server").get("redis_version", "0"))
    return tuple(int(p) for p in raw.split(".") if p.isdigit())


def glob_escape(text: str) -> str:
    """Escape Redis glob metacharacters so a key prefix matches only itself."""
    return "".join("\\" + c if c in "*?[]\\" else c for c in text)


@contextlib.contextmanager
def unavailable(what: str = "parameter store") -> Iterator[None]:
    """Turn redis connection errors inside the block into :class:`StoreUnavailableError` (transient, retryable)."""
    try:
        yield
    except (redis.ConnectionError, redis.TimeoutError) as exc:
        raise StoreUnavailableError(f"{what} unreachable: {exc}") from exc


def bulk_packer() -> Any:
    """A command packer that sends large values without copying them into one buffer.

    redis-py's default (hiredis) packer renders a whole command, a 64 MiB chunk included, into one new bytes object
    (~150 ms for 64 MiB here); its pure-Python packer hands a large value to the socket as it is (~40 ms). The
    parameter store, whose values are blob chunks, uses this one; commands with small values cost the same.
    """
    from redis.connection import Encoder, PythonRespSerializer

    return PythonRespSerializer(6000, Encoder("utf-8", "strict", False).encode)
