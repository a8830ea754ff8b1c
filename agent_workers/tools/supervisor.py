"""Worker processes and local services, started and stopped by pid (used by the demo, the benchmark and tests)."""

from __future__ import annotations

import dataclasses
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import redis

from agent_workers.config import Settings
from agent_workers.errors import ConfigError
from agent_workers.redis_clients import redis_client
from agent_workers.worker.launch import settings_env, worker_command, worker_prefetch

READY_TIMEOUT = 90.0


def derive_settings(base: Settings, *, batch: Mapping[str, Any] | None = None, **changes: Any) -> Settings:
    """``base`` with ``changes`` to its fields and ``batch`` to its batching policy, validated.

    How a tool sets up the workers it starts: ``WorkerProcess(env=derive_settings(...).to_env())``; start from the
    settings of the environment (``Settings.from_env()``) so the workers keep whatever else the operator set.

    Raises:
        ConfigError: the combination cannot work.
    """
    settings = dataclasses.replace(base, **changes)
    if batch:
        settings = dataclasses.replace(settings, batch=dataclasses.replace(settings.batch, **batch))
    settings.validate()
    return settings


class WorkerProcess:
    """One ``celery worker`` subprocess; ready when its log says so, stopped by pid.

    Args:
        queues: queues it consumes.
        env: ``AGENT_WORKERS_*`` variables for it.

    The prefetch follows the queues' roles (:func:`~agent_workers.worker.launch.worker_prefetch`).
    """

    def __init__(
        self,
        *,
        queues: list[str],
        env: Mapping[str, str] | None = None,
        name: str | None = None,
        loglevel: str = "INFO",
        pool: str = "threads",
        extra: list[str] | None = None,
        log_path: Path | None = None,
    ) -> None:
        self.env = settings_env(env)
        self.ready_path = Path(tempfile.mkdtemp(prefix="aw-ready-")) / "ready"
        self.env["AGENT_WORKERS_READY_FILE"] = str(self.ready_path)
        settings = Settings.from_env({k: v for k, v in self.env.items() if k.startswith("AGENT_WORKERS_")})
        self.hostname = name or f"aw-{uuid.uuid4().hex[:8]}@%h"
        prefetch = worker_prefetch(settings, queues)
        self.cmd = worker_command(
            queues=queues,
            hostname=self.hostname,
            loglevel=loglevel,
            prefetch_multiplier=prefetch,
            pool=pool,
            extra=extra,
        )
        self._own_log = log_path is None  # a temporary file of ours, removed by remove_files()
        self.log_path = log_path or Path(tempfile.mkstemp(prefix="aw-worker-", suffix=".log")[1])
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, *, wait: bool = True) -> WorkerProcess:
        self.ready_path.unlink(missing_ok=True)  # a killed worker leaves its ready file behind
        log = open(self.log_path, "ab")  # noqa: SIM115 - handed to the child
        self.proc = subprocess.Popen(
            self.cmd, env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        log.close()
        if wait:
            try:
                self.wait_ready()
            except BaseException:
                self.kill()  # never leave a half-started worker behind
                raise
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_ready(self, timeout: float = READY_TIMEOUT) -> None:
        """Block until the worker writes its ready file (it consumes from then on)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"worker exited with {self.proc.returncode}:\n{self.log()[-4000:]}")
            if self.ready_path.exists():
                return
            time.sleep(0.05)
        raise TimeoutError(f"worker not ready after {timeout}s:\n{self.log()[-4000:]}")

    def stop(self, timeout: float = 30.0) -> int | None:
        """SIGTERM (warm shutdown), then SIGKILL if it does not exit in ``timeout`` seconds."""
        if self.proc is None or self.proc.poll() is not None:
            return None if self.proc is None else self.proc.returncode
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            return self.proc.wait(10)

    def remove_files(self) -> None:
        """Remove what this worker left in the temporary directory: its ready file's directory and, unless the
        caller chose the path, its log."""
        shutil.rmtree(self.ready_path.parent, ignore_errors=True)
        if self._own_log:
            self.log_path.unlink(missing_ok=True)

    def kill(self) -> None:
        """SIGKILL the worker process (a crash, as far as the broker can tell)."""
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)

    def __enter__(self) -> WorkerProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def redis_answers(url: str, timeout: float = 1.0) -> bool:
    """True when the Redis at ``url`` answers PING."""
    try:
        return bool(redis_client(url, socket_timeout=timeout, socket_connect_timeout=timeout).ping())
    except (redis.ConnectionError, redis.TimeoutError, OSError, ConfigError):
        return False


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class LocalRedis:
    """A ``redis-server`` we start ourselves (its own port and directory) and stop by pid."""

    def __init__(self, *, port: int | None = None, args: list[str] | None = None) -> None:
        self.port = port or free_port()
        self.dir = tempfile.mkdtemp(prefix="aw-redis-")
        self.args = args or ["--save", "", "--appendonly", "no"]
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 10.0) -> LocalRedis:
        binary = shutil.which("redis-server")
        if binary is None:
            raise ConfigError(NO_REDIS_HELP)
        self.proc = subprocess.Popen(
            [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", self.dir, *self.args],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + timeout
        while not redis_answers(self.url, 0.2):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"redis-server on port {self.port} did not start")
            time.sleep(0.05)
        return self

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)


NO_REDIS_HELP = (
    "no Redis answers and no redis-server binary was found. Get one with any of:\n"
    "  docker-compose up -d redis          (this repo's docker-compose.yml)\n"
    "  sudo apt-get install redis-server   (Debian/Ubuntu)\n"
    "  brew install redis && brew services start redis   (macOS)\n"
    "or point AGENT_WORKERS_BROKER_URL / _RESULT_BACKEND / _PARAMS_URL at a Redis you have."
)


def ensure_redis(settings: Settings) -> LocalRedis | None:
    """Make sure the Redis of ``settings`` answers; start a local one on its port when it is local and down.

    Returns the server we started (stop it when done), or None when one was already there.
    """
    urls = {settings.params_url, settings.result_backend}
    if settings.broker_is_redis:
        urls.add(settings.broker_url)
    down = [u for u in urls if not redis_answers(u)]
    if not down:
        return None
    parsed = urlparse(down[0])
    if parsed.hostname not in {"127.0.0.1", "localhost"}:
        raise ConfigError(f"Redis at {down[0]} does not answer; start it or fix the AGENT_WORKERS_* URL")
    server = LocalRedis(port=parsed.port or 6379).start()
    return server
