"""Fixtures for clients from outside: Flower over HTTP (and in a browser), and the Node.js producer.

``flower`` starts ``celery -A tasks flower`` the way an operator does, with basic auth, on a free port, against the
shared per-broker ``pool`` worker (so every test here runs on Redis and on RabbitMQ), and stops it by pid.
A missing tool (node, chromium) skips a test on a laptop and fails it under ``CI=true``.
"""

from __future__ import annotations

import dataclasses
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

from agent_workers.tools.supervisor import free_port, settings_env
from tests.conftest import Pool, need

ROOT = Path(__file__).resolve().parents[2]
NODE_EXAMPLE = ROOT / "examples" / "node"
FLOWER_USER, FLOWER_PASSWORD = "flower-user", "flower-Pa55"
FLOWER_START_TIMEOUT = 90.0


def wait_for(
    what: str,
    check: Callable[[], Any],
    timeout: float,
    *,
    interval: float = 0.2,
    alive: Callable[[], None] | None = None,
) -> Any:
    """Poll ``check`` until it returns something truthy and return that; fail naming ``what`` after ``timeout``."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while True:
        if alive is not None:
            alive()
        last = check()
        if last:
            return last
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}; last value: {last!r}")
        time.sleep(interval)  # noqa: sleep-ok - poll interval of a deadline-bounded wait


@dataclasses.dataclass
class Flower:
    """A running Flower: its URL, credentials and process."""

    url: str
    auth: tuple[str, str]
    proc: subprocess.Popen[bytes]
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def alive(self) -> None:
        if self.proc.poll() is not None:
            raise AssertionError(f"flower exited with {self.proc.returncode}:\n{self.log()[-3000:]}")

    def get(self, path: str, *, auth: bool = True, **params: Any) -> requests.Response:
        """GET with query ``params`` (Flower's own ``timeout`` parameter included: the HTTP timeout is longer)."""
        return requests.get(self.url + path, params=params, auth=self.auth if auth else None, timeout=90)

    def post(self, path: str, body: dict[str, Any], *, auth: bool = True) -> requests.Response:
        return requests.post(self.url + path, json=body, auth=self.auth if auth else None, timeout=30)


def _healthy(url: str) -> bool:
    try:
        return requests.get(url + "/healthcheck", timeout=2).status_code == 200
    except requests.RequestException:
        return False


@pytest.fixture(scope="session")
def flower(pool: Pool, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Flower]:
    """Flower for the session's worker of this broker, with basic auth, started as ``celery -A tasks flower``."""
    port = free_port()
    log_path = tmp_path_factory.mktemp("flower") / "flower.log"
    cmd = [
        sys.executable,
        "-m",
        "celery",
        "-A",
        "tasks",
        "flower",
        "--address=127.0.0.1",
        f"--port={port}",
        f"--basic-auth={FLOWER_USER}:{FLOWER_PASSWORD}",
    ]
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            cmd, env=settings_env(pool.env), stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, start_new_session=True
        )
    running = Flower(f"http://127.0.0.1:{port}", (FLOWER_USER, FLOWER_PASSWORD), proc, log_path)
    try:
        wait_for(
            "flower to answer /healthcheck", lambda: _healthy(running.url), FLOWER_START_TIMEOUT, alive=running.alive
        )
        # Flower knows only what its event receiver saw: wait until it has heard our worker's heartbeat, so no
        # test sends tasks before Flower listens.
        online = f'flower_worker_online{{worker="{worker_node(pool)}"}} 1.0'
        wait_for(
            "flower to see the worker's events",
            lambda: online in running.get("/metrics").text,
            FLOWER_START_TIMEOUT,
            interval=0.5,
            alive=running.alive,
        )
        yield running
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)


def worker_node(pool: Pool) -> str:
    """The node name of the pool's worker (it writes it to its ready file)."""
    return pool.worker.ready_path.read_text().strip()


@pytest.fixture(scope="session")
def node_producer() -> Path:
    """``examples/node/producer.js`` with its dependencies installed (``npm ci`` in examples/node)."""
    need(shutil.which("node") is not None, "node (Node.js)")
    need(
        (NODE_EXAMPLE / "node_modules" / "celery-ts").is_dir(),
        "examples/node/node_modules (run `npm ci` in examples/node)",
    )
    return NODE_EXAMPLE / "producer.js"
