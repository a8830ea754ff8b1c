"""Shared fixtures: real Redis and RabbitMQ, real worker processes, one namespace and queue pair per pool.

Every integration test that takes ``pool`` (or ``start_pool``) runs once per broker. A missing service skips the
test on a laptop and fails it under ``CI=true``.
"""

from __future__ import annotations

import dataclasses
import os
import socket
import uuid
from collections.abc import Callable, Iterator
from urllib.parse import urlsplit

import numpy as np
import pytest
import redis
import requests
import torch
from prometheus_client.parser import text_string_to_metric_families

from agent_workers.client import Client
from agent_workers.config import Settings
from agent_workers.store.params import RedisParamStore
from agent_workers.tools.supervisor import WorkerProcess, free_port

IN_CI = os.environ.get("CI") == "true"
#: The services under test, from the environment (README, "Running the tests"), so the suite can share a Redis or run
#: beside another checkout: the Redis server, its databases for the broker, results and parameters, and RabbitMQ.
REDIS = os.environ.get("AW_TEST_REDIS_URL", "redis://127.0.0.1:6379").rstrip("/")
DB_BROKER, DB_RESULTS, DB_PARAMS = (int(db) for db in os.environ.get("AW_TEST_REDIS_DBS", "0,1,2").split(","))
AMQP = os.environ.get("AW_TEST_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672//")
BROKERS = {"redis": f"{REDIS}/{DB_BROKER}", "rabbitmq": AMQP}
PARAMS_URL = f"{REDIS}/{DB_PARAMS}"


def tcp_answers(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1):
            return True
    except OSError:
        return False


def need(ok: bool, what: str) -> None:
    """Skip without ``what``; under CI a missing service is a failure, not a skip."""
    if not ok:
        if IN_CI:
            pytest.fail(f"{what} is not reachable; .ci/run must start it")
        pytest.skip(f"{what} is not reachable")


def service_answers(url: str, default_port: int) -> tuple[bool, str]:
    """Whether ``url``'s host answers on its port, and ``host:port`` for messages."""
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or default_port
    return tcp_answers(host, port), f"{host}:{port}"


@pytest.fixture(scope="session")
def redis_up() -> None:
    ok, where = service_answers(REDIS, 6379)
    need(ok, f"Redis on {where} (AW_TEST_REDIS_URL)")


@pytest.fixture(scope="session", params=sorted(BROKERS))
def broker(request: pytest.FixtureRequest, redis_up: None) -> str:
    """The broker under test: every integration test runs on Redis and on RabbitMQ."""
    if request.param == "rabbitmq":
        ok, where = service_answers(AMQP, 5672)
        need(ok, f"RabbitMQ on {where} (AW_TEST_AMQP_URL)")
    return str(request.param)


#: For a test whose RabbitMQ run repeats, at length, what other tests of the default run already cover on RabbitMQ
#: (an end-to-end walk through a README section, docs page or benchmark part whose broker-specific paths have tests of
#: their own): Redis, the default broker, in the default run; RabbitMQ under the ``slow`` marker, which ``make test``
#: leaves out and ``make test-all`` (``pytest -m "slow or not slow"``) or ``pytest -m slow`` runs. The order and values
#: are the ``broker`` fixture's, so both kinds of test share its session-scoped instances.
REDIS_BY_DEFAULT = pytest.mark.parametrize(
    "broker", [pytest.param("rabbitmq", marks=pytest.mark.slow), "redis"], indirect=True
)


def pool_env(broker: str, **overrides: object) -> dict[str, str]:
    """``AGENT_WORKERS_*`` for an isolated pool: its own namespace and queues on the shared services."""
    ns = "t" + uuid.uuid4().hex[:10]
    env = {
        "AGENT_WORKERS_BROKER_URL": BROKERS[broker],
        "AGENT_WORKERS_RESULT_BACKEND": f"{REDIS}/{DB_RESULTS}",
        "AGENT_WORKERS_PARAMS_URL": PARAMS_URL,
        "AGENT_WORKERS_NAMESPACE": ns,
        "AGENT_WORKERS_INFERENCE_QUEUE": f"{ns}.inference",
        "AGENT_WORKERS_TRAINING_QUEUE": f"{ns}.training",
        "AGENT_WORKERS_DEVICE": "cpu",
    }
    env.update({f"AGENT_WORKERS_{k.upper()}": str(v) for k, v in overrides.items()})
    return env


@dataclasses.dataclass
class Pool:
    """A running worker process plus everything a test needs to talk to it."""

    broker: str
    env: dict[str, str]
    settings: Settings
    worker: WorkerProcess
    client: Client
    store: RedisParamStore
    metrics_port: int

    def metric(self, name: str, labels: dict[str, str] | None = None) -> float:
        """Current value of one Prometheus sample scraped from the worker."""
        text = requests.get(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5).text
        total = 0.0
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name == name and all(sample.labels.get(k) == v for k, v in (labels or {}).items()):
                    total += sample.value
        return total


def _cleanup(settings: Settings) -> None:
    try:
        _cleanup_keys_and_queues(settings)
    except (redis.ConnectionError, OSError):
        pass  # a server the test started itself and already stopped: nothing left to clean


def _cleanup_keys_and_queues(settings: Settings) -> None:
    client = redis.Redis.from_url(settings.params_url)
    keys = list(client.scan_iter(match=f"{settings.namespace}:*", count=1000))
    if keys:
        client.delete(*keys)
    if not settings.broker_is_redis:
        from kombu import Connection

        with Connection(settings.broker_url) as conn:
            channel = conn.default_channel
            for queue in (settings.inference_queue, settings.training_queue):
                try:
                    channel.queue_delete(queue)
                except Exception:  # noqa: BLE001 - already gone
                    pass
    else:
        redis.Redis.from_url(settings.broker_url).delete(settings.inference_queue, settings.training_queue)


@pytest.fixture
def start_pool(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[..., Pool]]:
    """Factory: ``start_pool(broker, queues=..., **settings)`` starts a worker; all are stopped afterwards."""
    pools: list[Pool] = []

    def start(broker: str, *, queues: str = "both", start: bool = True, **overrides: object) -> Pool:
        port = free_port()
        env = pool_env(broker, metrics_port=port, **overrides)
        settings = Settings.from_env(env)
        wanted = {
            "both": [settings.inference_queue, settings.training_queue],
            "inference": [settings.inference_queue],
            "training": [settings.training_queue],
        }[queues]
        log = tmp_path_factory.mktemp("worker") / "worker.log"
        worker = WorkerProcess(queues=wanted, env=env, log_path=log)
        pool = Pool(broker, env, settings, worker, Client(settings), RedisParamStore.from_settings(settings), port)
        pools.append(pool)
        if start:
            worker.start()
        return pool

    yield start
    for pool in pools:
        pool.worker.stop()
        _cleanup(pool.settings)


@pytest.fixture(scope="session")
def pool(broker: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pool]:
    """One shared worker per broker, consuming both queues (tests use their own model names)."""
    port = free_port()
    env = pool_env(broker, metrics_port=port, max_wait_ms=20, keep_versions=1000)
    settings = Settings.from_env(env)
    log = tmp_path_factory.mktemp("pool") / "worker.log"
    worker = WorkerProcess(queues=[settings.inference_queue, settings.training_queue], env=env, log_path=log)
    worker.start()
    p = Pool(broker, env, settings, worker, Client(settings), RedisParamStore.from_settings(settings), port)
    yield p
    worker.stop()
    _cleanup(settings)


def serving_pool(broker: str, tmp_path_factory: pytest.TempPathFactory, **overrides: object) -> Iterator[Pool]:
    """A worker of the inference queue with ``overrides`` (e.g. ``plugins=...``), yielded as a :class:`Pool` and
    stopped and cleaned after: the body of a module-scoped fixture."""
    port = free_port()
    env = pool_env(broker, metrics_port=port, **overrides)
    settings = Settings.from_env(env)
    log = tmp_path_factory.mktemp("serving") / "worker.log"
    worker = WorkerProcess(queues=[settings.inference_queue], env=env, log_path=log)
    worker.start()
    p = Pool(broker, env, settings, worker, Client(settings), RedisParamStore.from_settings(settings), port)
    yield p
    worker.stop()
    _cleanup(settings)


def reference(pool: Pool, model: str, rows: np.ndarray, version: int | None = None) -> np.ndarray:
    """What torch computes locally with the stored parameters of ``version`` (the ground truth for outputs)."""
    snap = pool.store.read(model, version)
    module = pool.store.spec(model, snap.epoch).build()
    module.load_state_dict(snap.parameters())
    with torch.no_grad():
        return module(torch.from_numpy(rows.astype(np.float32))).numpy()


def unique(prefix: str = "m") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"
