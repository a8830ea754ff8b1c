"""The Procfile as an operator starts it (``honcho start``), driven from outside, on both brokers.

One stack per broker: the inference worker, the trainer and Flower, each in its own namespace and queues on the
shared Redis and RabbitMQ. Jobs go in through the client, and the pool is inspected through Flower's HTTP API.
"""

from __future__ import annotations

import dataclasses
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import redis
import requests
import torch
from prometheus_client.parser import text_string_to_metric_families

from agent_workers.client import Client
from agent_workers.config import Settings
from agent_workers.models import make_spec
from agent_workers.store.params import RedisParamStore
from agent_workers.tools.supervisor import free_port
from tests.conftest import _cleanup, need, pool_env, unique
from tests.e2e.conftest import wait_for

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]
PROCFILE = ROOT / "Procfile"
VENV_BIN = Path(sys.executable).parent
HONCHO = VENV_BIN / "honcho"
AUTH = ("operator", "s3cret-pass")
MAX_BATCH_SIZE = 16  # not the default, so the test sees the Procfile derive the prefetch from the setting
STARTUP_TIMEOUT = 120.0
STOP_TIMEOUT = 30.0


@dataclasses.dataclass
class Stack:
    """A running ``honcho start`` of the Procfile and what a test needs to talk to it."""

    proc: subprocess.Popen[bytes]
    env: dict[str, str]
    settings: Settings
    log_path: Path
    ready_file: Path
    flower_url: str

    @property
    def inference_node(self) -> str:
        return f"{self.settings.namespace}-inference@"

    @property
    def trainer_node(self) -> str:
        return f"{self.settings.namespace}-trainer@"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def assert_running(self) -> None:
        if self.proc.poll() is not None:
            raise AssertionError(f"honcho exited with {self.proc.returncode}:\n{self.log()[-6000:]}")

    def metric(self, process: str, name: str, **labels: str) -> float:
        """A Prometheus sample of the inference worker (``worker``) or the trainer (``trainer``)."""
        port = self.settings.metrics_port + (1 if process == "trainer" else 0)
        text = requests.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
        return sum(
            sample.value
            for family in text_string_to_metric_families(text)
            for sample in family.samples
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items())
        )

    def alive(self) -> dict[str, bool]:
        """Flower's view, from the event stream (heartbeats), of whether our two workers are alive."""
        response = requests.get(f"{self.flower_url}/api/workers", params={"status": "1"}, auth=AUTH, timeout=30)
        response.raise_for_status()
        status = response.json()
        found = {
            "inference": [up for n, up in status.items() if n.startswith(self.inference_node)],
            "trainer": [up for n, up in status.items() if n.startswith(self.trainer_node)],
        }
        return {kind: bool(ups) and all(ups) for kind, ups in found.items()}

    def workers(self) -> dict[str, Any]:
        """Flower's ``/api/workers``, refreshed by a broadcast inspect."""
        response = requests.get(f"{self.flower_url}/api/workers", params={"refresh": "1"}, auth=AUTH, timeout=30)
        response.raise_for_status()
        return dict(response.json())


def free_port_pair() -> int:
    """A port p such that p and p + 1 are both free right now (the Procfile gives the trainer p + 1)."""
    for _ in range(100):
        port = free_port()
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port + 1))
            except OSError:
                continue
        return port
    raise RuntimeError("no two consecutive free ports")


def honcho_env(broker: str, tmp: Path) -> dict[str, str]:
    """A clean environment for honcho: no inherited AGENT_WORKERS_*/FLOWER_*, ours on top, the venv on PATH."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AGENT_WORKERS_", "FLOWER_"))}
    env.update(pool_env(broker, max_batch_size=MAX_BATCH_SIZE, ready_file=tmp / "ready", metrics_port=free_port_pair()))
    env.update(
        FLOWER_PORT=str(free_port()),
        FLOWER_BASIC_AUTH=f"{AUTH[0]}:{AUTH[1]}",
        PATH=f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}",
        PYTHONUNBUFFERED="1",  # honcho's "started (pid=N)" lines reach the log at once (see stop_honcho)
    )
    return env


def start_honcho(env: dict[str, str], log_path: Path, *processes: str) -> subprocess.Popen[bytes]:
    # -e /dev/null: a developer's .env (e.g. the docker-compose one) must not override the test's settings.
    with open(log_path, "ab") as log:
        return subprocess.Popen(
            [str(HONCHO), "-e", os.devnull, "--no-colour", "start", "-f", str(PROCFILE), *processes],
            cwd=ROOT,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def _alive(pid: int) -> bool:
    try:
        os.killpg(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def started_pids(log_path: Path) -> list[int]:
    """The Procfile processes honcho started; each leads its own session (honcho's ``start_new_session``)."""
    return [int(pid) for pid in re.findall(r"started \(pid=(\d+)\)", log_path.read_text(errors="replace"))]


def stop_honcho(proc: subprocess.Popen[bytes], log_path: Path) -> None:
    """SIGTERM honcho's process group (honcho passes it on), SIGKILL after a timeout; reap the children."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
    # honcho's children run in sessions of their own, so a SIGKILLed honcho would leave them behind.
    children = started_pids(log_path)
    deadline = time.monotonic() + STOP_TIMEOUT
    while any(_alive(pid) for pid in children) and time.monotonic() < deadline:
        time.sleep(0.1)  # noqa: sleep-ok - poll interval of a deadline-bounded wait
    for pid in children:
        if _alive(pid):
            os.killpg(pid, signal.SIGKILL)


def cleanup_broker(settings: Settings) -> None:
    """What the shared ``_cleanup`` leaves: the queues' exchanges (RabbitMQ) or binding sets (Redis)."""
    names = (settings.inference_queue, settings.training_queue)
    if settings.broker_is_redis:
        redis.Redis.from_url(settings.broker_url).delete(*(f"_kombu.binding.{name}" for name in names))
        return
    from kombu import Connection

    with Connection(settings.broker_url) as conn:
        channel = conn.default_channel
        for name in names:
            try:
                channel.exchange_delete(name)
            except Exception:  # noqa: BLE001 - already gone
                pass


@pytest.fixture(scope="module")
def stack(broker: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """The Procfile started with honcho, every process consuming and Flower answering; stopped afterwards."""
    need(HONCHO.exists(), f"honcho ({HONCHO}; pip install -e '.[dev]')")
    tmp = tmp_path_factory.mktemp(f"procfile-{broker}")
    env = honcho_env(broker, tmp)
    settings = Settings.from_env(env)
    log_path = tmp / "honcho.log"
    proc = start_honcho(env, log_path)
    s = Stack(proc, env, settings, log_path, tmp / "ready", f"http://127.0.0.1:{env['FLOWER_PORT']}")
    try:
        wait_for(
            "both workers' readiness files",
            lambda: all(Path(f"{s.ready_file}.{kind}").exists() for kind in ("inference", "trainer")),
            STARTUP_TIMEOUT,
            alive=s.assert_running,
        )
        # Flower keeps only the events it receives while connected: wait until it hears both workers' heartbeats,
        # so no test's task events can go out before Flower listens.
        wait_for(
            "Flower to receive both workers' heartbeats",
            lambda: all(s.alive().values()) if _answers(f"{s.flower_url}/healthcheck") else False,
            STARTUP_TIMEOUT,
            alive=s.assert_running,
        )
        yield s
    finally:
        stop_honcho(proc, log_path)
        _cleanup(settings)
        cleanup_broker(settings)


def node(workers: dict[str, Any], prefix: str) -> dict[str, Any] | None:
    """The one worker whose node name starts with ``prefix`` (other people's workers share the broker)."""
    found = [info for name, info in workers.items() if name.startswith(prefix)]
    assert len(found) <= 1, f"several workers named {prefix}*: {sorted(workers)}"
    return found[0] if found and "stats" in found[0] and "active_queues" in found[0] else None


def fixed_linear(store: RedisParamStore) -> str:
    """A linear model y = 0.5 x0 - x1 + 2 x2 + 0.25 (exact in float32)."""
    name = unique("lin")
    module = torch.nn.Linear(3, 1)
    with torch.no_grad():
        module.weight.copy_(torch.tensor([[0.5, -1.0, 2.0]]))
        module.bias.copy_(torch.tensor([0.25]))
    store.create(name, make_spec("linear", in_features=3), module=module)
    return name


def both_workers(stack: Stack) -> dict[str, dict[str, Any]]:
    """Poll Flower until it lists our inference worker and our trainer (it learns of workers by broadcast)."""

    def check() -> dict[str, dict[str, Any]] | None:
        workers = stack.workers()
        found = {"inference": node(workers, stack.inference_node), "trainer": node(workers, stack.trainer_node)}
        return found if found["inference"] and found["trainer"] else None  # type: ignore[return-value]

    return wait_for(
        "Flower to list the inference worker and the trainer", check, STARTUP_TIMEOUT, alive=stack.assert_running
    )


def test_flower_lists_both_workers_with_their_queues_and_prefetch(stack: Stack) -> None:
    found = both_workers(stack)
    inference, trainer = found["inference"], found["trainer"]
    assert [q["name"] for q in inference["active_queues"]] == [stack.settings.inference_queue]
    assert [q["name"] for q in trainer["active_queues"]] == [stack.settings.training_queue]
    assert inference["stats"]["prefetch_count"] == 2 * MAX_BATCH_SIZE
    assert trainer["stats"]["prefetch_count"] == Settings().train_group_max  # an adaptive group can grow to its cap
    for info in (inference, trainer):
        assert info["stats"]["pool"]["max-concurrency"] == 1
        assert info["stats"]["pool"]["implementation"].endswith("thread:TaskPool")


def test_flower_api_refuses_requests_without_the_right_credentials(stack: Stack) -> None:
    url = f"{stack.flower_url}/api/workers"
    wait_for("Flower to answer", lambda: _answers(url), STARTUP_TIMEOUT, alive=stack.assert_running)
    assert requests.get(url, timeout=30).status_code == 401
    assert requests.get(url, auth=(AUTH[0], "wrong"), timeout=30).status_code == 401
    assert requests.get(url, auth=AUTH, timeout=30).status_code == 200


def _answers(url: str) -> bool:
    try:
        requests.get(url, timeout=5)
    except requests.ConnectionError:
        return False
    return True


def served_by(stack: Stack, task_id: str) -> str:
    """The node that Flower, from the task events, says ran ``task_id`` to success."""

    def check() -> str | None:
        response = requests.get(f"{stack.flower_url}/api/task/info/{task_id}", auth=AUTH, timeout=30)
        info = response.json() if response.status_code == 200 else {}
        return info.get("worker") if info.get("state") == "SUCCESS" else None

    return str(wait_for(f"Flower to record task {task_id} as a success", check, 60, alive=stack.assert_running))


def test_prediction_from_outside_is_served_by_the_inference_worker(stack: Stack) -> None:
    store = RedisParamStore.from_settings(stack.settings)
    model = fixed_linear(store)
    client = Client(stack.settings)
    handle = client.send_predict(model, [1.0, 2.0, 3.0])
    assert client.wait(handle, timeout=60) == {"model": model, "version": 0, "outputs": [4.75]}
    assert served_by(stack, handle.id).startswith(stack.inference_node)
    # The counter moves just after the result is stored, so wait for it before asserting exactly one.
    wait_for("the request counter", lambda: stack.metric("worker", "agent_workers_requests_total", model=model), 30)
    assert stack.metric("worker", "agent_workers_requests_total", model=model, outcome="success") == 1


def test_train_step_is_committed_by_the_trainer_and_served_next(stack: Stack) -> None:
    store = RedisParamStore.from_settings(stack.settings)
    model = fixed_linear(store)
    client = Client(stack.settings)
    row = [1.0, 2.0, 3.0]
    handle = client.send_train_step(model, x=[row], y=[[0.0]], hparams={"lr": 0.01})
    assert client.wait(handle, timeout=60)["version"] == 1
    assert served_by(stack, handle.id).startswith(stack.trainer_node)
    assert stack.metric("trainer", "agent_workers_commits_total", model=model, outcome="committed") == 1
    assert stack.metric("worker", "agent_workers_commits_total", model=model) == 0
    snap = store.read(model, 1)
    module = store.spec(model, snap.epoch).build()
    module.load_state_dict(snap.parameters())
    with torch.no_grad():
        expected = module(torch.tensor([row])).numpy()[0]
    after = client.predict(model, row, timeout=60)
    assert after["version"] == 1
    assert after["outputs"] != [4.75]
    np.testing.assert_allclose(after["outputs"], expected, rtol=1e-5, atol=1e-6)


def test_flower_refuses_to_start_without_basic_auth(tmp_path: Path) -> None:
    need(HONCHO.exists(), f"honcho ({HONCHO}; pip install -e '.[dev]')")
    env = honcho_env("redis", tmp_path)
    del env["FLOWER_BASIC_AUTH"]
    log_path = tmp_path / "honcho.log"
    proc = start_honcho(env, log_path, "flower")
    try:
        wait_for(
            "honcho to exit, or Flower to start",
            lambda: proc.poll() is not None or "Visit me at" in log_path.read_text(errors="replace"),
            60,
        )
    finally:
        stop_honcho(proc, log_path)
    log = log_path.read_text(errors="replace")
    assert proc.returncode != 0, log
    assert "FLOWER_BASIC_AUTH" in log and "user:password" in log
    assert "Visit me at" not in log
