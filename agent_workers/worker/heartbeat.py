"""Fast reclaim's heartbeat, beaten by a child process that the worker's GIL cannot starve.

A heartbeat thread in the worker's own process stops beating whenever a forward pass holds the GIL (a model's
pure-Python code, a C extension that does not release it) for longer than ``reclaim_after``: another worker then
reclaims the live worker's batch and every request of it is computed twice. The beat therefore comes from a small
child process (``python -m agent_workers.worker.heartbeat``: the standard library, redis and one Lua script; no torch,
no Celery) that is alive exactly as long as its worker:

* the worker writes the settings on the child's stdin (one JSON line: no broker password on a command line) and
  keeps the pipe open; the child beats every ``interval`` seconds until the pipe reaches end of file, which happens
  when the worker closes it (a clean stop) or when the worker dies, SIGKILL included (the kernel closes its fds);
* the child ignores SIGINT and SIGTERM, which a terminal or a process manager may send to the whole group: the
  worker's warm shutdown may still be finishing its batches, and must keep its messages until it has.
"""

from __future__ import annotations

import json
import logging
import select
import signal
import subprocess
import sys
from typing import IO, Any

log = logging.getLogger(__name__)


class HeartbeatProcess:
    """The child process that beats for one consumer.

    Args:
        connection: how to reach the broker's Redis (see :func:`connection_of`; the heartbeats live there).
        key: the heartbeats sorted set.
        worker_id: the consumer's id.
        interval: seconds between beats.
    """

    def __init__(self, *, connection: dict[str, Any], key: str, worker_id: str, interval: float) -> None:
        self._config = {"connection": connection, "key": key, "id": worker_id, "interval": float(interval)}
        self._proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        """Start the child; it beats from then on until :meth:`stop` or this process's death."""
        self._proc = subprocess.Popen(  # noqa: S603 - our own module, no shell
            [sys.executable, "-m", __name__], stdin=subprocess.PIPE, close_fds=True
        )
        stdin = self._proc.stdin
        assert stdin is not None
        stdin.write(json.dumps(self._config).encode() + b"\n")
        stdin.flush()

    def exit_code(self) -> int | None:
        """The child's exit status once it exited, else ``None``."""
        return None if self._proc is None else self._proc.poll()

    def stop(self, timeout: float = 5.0) -> None:
        """End of file on the child's stdin; wait for it to exit (killed after ``timeout`` seconds)."""
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if proc.stdin is not None:
            try:
                proc.stdin.close()
            except OSError:
                pass  # a child that already died closed its end
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout)


#: Connection classes the child can rebuild; a Sentinel pool's (resolved per connection) is not one of them.
_CLASSES = ("Connection", "SSLConnection", "UnixDomainSocketConnection")
#: The connection settings that travel to the child (plain values only).
_KWARGS = ("host", "port", "path", "db", "username", "password", "socket_connect_timeout", "socket_timeout")


def connection_of(pool: Any) -> dict[str, Any] | None:
    """The JSON-safe settings of a redis-py connection pool, for the child; ``None`` when it cannot rebuild them
    (a Sentinel pool, or TLS with settings beyond the certificate paths)."""
    name = getattr(pool, "connection_class", type(None)).__name__
    if name not in _CLASSES:
        return None
    kwargs = pool.connection_kwargs
    out: dict[str, Any] = {k: kwargs[k] for k in _KWARGS if kwargs.get(k) is not None}
    for k, v in kwargs.items():
        if k.startswith("ssl_") and v is not None:
            if not isinstance(v, (str, int, float, bool)):
                return None
            out[k] = v
    out["class"] = name
    return out


def _run(stdin: IO[bytes]) -> int:
    import redis

    from agent_workers import lua

    config: dict[str, Any] = json.loads(stdin.readline() or b"null") or {}
    if not config:
        return 0  # the worker went away before it told us anything
    kwargs = dict(config["connection"])
    connection_class = getattr(redis.connection, kwargs.pop("class"))
    client = redis.Redis(connection_pool=redis.ConnectionPool(connection_class=connection_class, **kwargs))
    beat = client.register_script(lua.source("heartbeat"))
    interval = float(config["interval"])
    failing = False
    first = True
    while True:
        try:
            beat(keys=[config["key"]], args=[config["id"]])
        except redis.RedisError as exc:
            if first:  # cannot reach what the worker reaches (TLS, auth): exit, so the worker beats itself
                print(f"agent-workers heartbeat: cannot beat ({exc})", file=sys.stderr)
                return 2
            if not failing:  # once per outage: the others reclaim us only if it lasts
                print(f"agent-workers heartbeat: beat failed ({exc}); retrying every {interval:.1f} s", file=sys.stderr)
            failing = True
        else:
            failing = False
        first = False
        readable, _, _ = select.select([stdin], [], [], interval)
        if readable and not stdin.read1(4096):  # type: ignore[attr-defined]
            return 0  # end of file: the worker stopped or died


def main() -> int:
    """The child's entry point: beat until stdin reaches end of file."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    return _run(sys.stdin.buffer)


if __name__ == "__main__":
    raise SystemExit(main())
