"""Topologies beyond one Redis and one RabbitMQ: quorum queues, Redis Sentinel, Redis Cluster.

Every server here is our own, on free ports, stopped by pid: a RabbitMQ node (shared with test_broker_restart.py),
a Sentinel group (one master, one replica, one sentinel) and a three-master Redis Cluster.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import redis
import torch
from amqp.exceptions import PreconditionFailed
from kombu import Connection
from redis.sentinel import MasterNotFoundError, Sentinel

from agent_workers.client import Client
from agent_workers.config import Settings
from agent_workers.contract import PREDICT, QUORUM_DELIVERY_LIMIT, declare_queue
from agent_workers.errors import ConfigError, ModelError
from agent_workers.models import make_spec
from agent_workers.redis_clients import redis_client
from agent_workers.store.params import CommitOutcome, RedisParamStore
from agent_workers.tools.supervisor import WorkerProcess, free_port, redis_answers
from agent_workers.worker.app import create_app
from tests.conftest import need, pool_env, unique
from tests.integration.test_broker_restart import LocalRabbitMQ, acquire_rabbitmq, release_rabbitmq, results, wait_until

pytestmark = pytest.mark.integration


# -- servers --------------------------------------------------------------------------------------------------------


class RedisProcess:
    """One ``redis-server`` (or sentinel) with its own config file and directory, stopped by pid."""

    def __init__(self, config: str, *, sentinel: bool = False) -> None:
        self.port = free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="aw-topo-"))
        self.conf = self.dir / "redis.conf"
        self.conf.write_text(f'port {self.port}\nbind 127.0.0.1\ndir {self.dir}\nsave ""\n{config}\n')
        self.sentinel = sentinel
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 15.0) -> RedisProcess:
        cmd = [shutil.which("redis-server") or "redis-server", str(self.conf)]
        if self.sentinel:
            cmd.append("--sentinel")
        log = open(self.dir / "server.log", "ab")  # noqa: SIM115 - handed to the child
        self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
        log.close()
        wait_until(
            lambda: self.proc.poll() is not None or redis_answers(self.url(), 0.2),
            timeout,
            f"redis-server on port {self.port}",
        )
        assert self.proc.poll() is None, (self.dir / "server.log").read_text()
        return self

    def url(self, db: int = 0) -> str:
        return f"redis://127.0.0.1:{self.port}/{db}"

    def client(self) -> redis.Redis:
        return redis.Redis(port=self.port, socket_timeout=5)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)
        shutil.rmtree(self.dir, ignore_errors=True)


class SentinelGroup:
    """One master, one replica and one sentinel watching them under a unique master name."""

    def __init__(self) -> None:
        self.name = f"aw-{uuid.uuid4().hex[:8]}"
        self.master = RedisProcess("appendonly no")
        self.replica = RedisProcess(f"appendonly no\nreplicaof 127.0.0.1 {self.master.port}")
        self.sentinel = RedisProcess(
            f"sentinel resolve-hostnames no\nsentinel monitor {self.name} 127.0.0.1 {self.master.port} 1\n"
            f"sentinel down-after-milliseconds {self.name} 1000\nsentinel failover-timeout {self.name} 10000",
            sentinel=True,
        )

    def start(self) -> SentinelGroup:
        self.master.start()
        self.replica.start()
        self.sentinel.start()
        replica = self.replica.client()
        wait_until(lambda: replica.info("replication").get("master_link_status") == "up", 20, "the replica to sync")
        # A failover needs the sentinel to know the replica, which it learns from the master's INFO.
        wait_until(
            lambda: bool(self.sentinel.client().sentinel_slaves(self.name)), 30, "the sentinel to see the replica"
        )
        return self

    def url(self, db: int) -> str:
        return f"sentinel://127.0.0.1:{self.sentinel.port}/{db}"

    def master_port(self) -> int | None:
        """The master's port as a client discovers it (the sentinel must also see it up and in the master role)."""
        try:
            _host, port = Sentinel([("127.0.0.1", self.sentinel.port)]).discover_master(self.name)
        except MasterNotFoundError:
            return None
        return int(port)

    def stop(self) -> None:
        for server in (self.sentinel, self.replica, self.master):
            server.stop()


class RedisClusterGroup:
    """Three masters (no replicas) joined with ``redis-cli --cluster create``."""

    def __init__(self) -> None:
        # The bus port is named, not derived (port + 10000, which must stay below 65536 and free).
        self.nodes = [
            RedisProcess(
                "appendonly no\ncluster-enabled yes\ncluster-config-file nodes.conf\n"
                f"cluster-node-timeout 5000\ncluster-port {free_port()}"
            )
            for _ in range(3)
        ]

    def start(self) -> RedisClusterGroup:
        for node in self.nodes:
            node.start()
        out = subprocess.run(
            [
                shutil.which("redis-cli") or "redis-cli",
                "--cluster",
                "create",
                *[f"127.0.0.1:{n.port}" for n in self.nodes],
                "--cluster-replicas",
                "0",
                "--cluster-yes",
            ],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert out.returncode == 0, out.stdout + out.stderr
        for node in self.nodes:
            client = node.client()
            wait_until(lambda c=client: c.cluster("info").get("cluster_state") == "ok", 30, "cluster_state:ok")
        return self

    @property
    def url(self) -> str:
        return "redis+cluster://" + ",".join(f"127.0.0.1:{n.port}" for n in self.nodes)

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()


@pytest.fixture(scope="session")
def own_rabbitmq() -> Iterator[LocalRabbitMQ]:
    """The RabbitMQ node of test_broker_restart.py (started once per session, whichever module asks first)."""
    yield acquire_rabbitmq()
    release_rabbitmq()


@pytest.fixture
def sentinel_group() -> Iterator[SentinelGroup]:
    need(shutil.which("redis-server") is not None, "redis-server (to start a Sentinel group of our own)")
    group = SentinelGroup()
    try:
        yield group.start()
    finally:
        group.stop()


@pytest.fixture(scope="module")
def cluster() -> Iterator[RedisClusterGroup]:
    """One cluster for this module; tests keep apart by namespace."""
    need(
        shutil.which("redis-server") is not None and shutil.which("redis-cli") is not None,
        "redis-server and redis-cli (to start a Redis Cluster of our own)",
    )
    group = RedisClusterGroup()
    try:
        yield group.start()
    finally:
        group.stop()


def linear_outputs(store: RedisParamStore, model: str, rows: list[list[float]], version: int | None = None) -> list:
    """What torch computes locally with the stored parameters."""
    snap = store.read(model, version)
    module = store.spec(model, snap.epoch).build()
    module.load_state_dict(snap.parameters())
    with torch.no_grad():
        return module(torch.tensor(rows)).tolist()


def assert_outputs(got: list[dict[str, Any]], want: list[list[float]]) -> None:
    np.testing.assert_allclose([r["outputs"] for r in got], want, rtol=1e-5, atol=1e-6)


def served(backend: redis.Redis, ids: list[str], worker: WorkerProcess, timeout: float = 60) -> list[dict[str, Any]]:
    wait_until(lambda: len(results(backend, ids)) == len(ids), timeout, f"{len(ids)} results", worker)
    metas = results(backend, ids)
    failed = [metas[i] for i in ids if metas[i]["status"] != "SUCCESS"]
    assert not failed, failed[:2]
    return [metas[i]["result"] for i in ids]


# -- settings and URLs (no servers) ---------------------------------------------------------------------------------


def test_settings_and_urls_choose_the_topology() -> None:
    sentinel = redis_client("sentinel://:pw@127.0.0.1:26379/3;sentinel://127.0.0.1:26380", sentinel_master="m")
    pool = sentinel.connection_pool
    assert (pool.service_name, pool.connection_kwargs["db"], pool.connection_kwargs["password"]) == ("m", 3, "pw")
    assert [s.connection_pool.connection_kwargs["port"] for s in pool.sentinel_manager.sentinels] == [26379, 26380]
    # kombu and Celery read /db and the password from the first sentinel only: elsewhere they would be ignored.
    with pytest.raises(ConfigError, match="first part"):
        redis_client("sentinel://127.0.0.1:26379;sentinel://127.0.0.1:26380/3")
    with pytest.raises(ConfigError, match="AGENT_WORKERS_RESULT_BACKEND.*first part"):
        Settings.from_env({"AGENT_WORKERS_RESULT_BACKEND": "sentinel://a:26379;sentinel://b:26379/1"})
    with pytest.raises(ConfigError, match="only database 0"):
        redis_client("redis+cluster://127.0.0.1:7000,127.0.0.1:7001/2")
    with pytest.raises(ConfigError, match="not a Redis URL"):
        redis_client("http://127.0.0.1:6379")
    # A cluster holds parameters only: Celery's broker and result backend cannot use one.
    assert Settings.from_env({"AGENT_WORKERS_PARAMS_URL": "redis+cluster://a:7000,b:7001"}).params_url
    with pytest.raises(ConfigError, match="RESULT_BACKEND"):
        Settings.from_env({"AGENT_WORKERS_RESULT_BACKEND": "redis+cluster://a:7000"})
    # Quorum queues are RabbitMQ's; with them come arguments, a dead-letter step and publisher confirms.
    with pytest.raises(ConfigError, match="quorum"):
        Settings.from_env({"AGENT_WORKERS_QUEUE_TYPE": "quorum"})
    app = create_app(
        Settings.from_env(
            {"AGENT_WORKERS_BROKER_URL": "amqp://guest:guest@127.0.0.1:5672//", "AGENT_WORKERS_QUEUE_TYPE": "quorum"}
        )
    )
    args = {q.name: q.queue_arguments for q in app.conf.task_queues}
    assert args["inference"] == {
        "x-queue-type": "quorum",
        "x-delivery-limit": QUORUM_DELIVERY_LIMIT,
        "x-dead-letter-exchange": "inference.dead",
    }
    assert app.conf.broker_transport_options["confirm_publish"] is True
    app = create_app(
        Settings.from_env(
            {
                "AGENT_WORKERS_BROKER_URL": "sentinel://127.0.0.1:26379/0",
                "AGENT_WORKERS_RESULT_BACKEND": "sentinel://127.0.0.1:26379/1",
                "AGENT_WORKERS_SENTINEL_MASTER": "prod",
            }
        )
    )
    assert app.conf.broker_transport_options["master_name"] == "prod"
    assert app.conf.result_backend_transport_options["master_name"] == "prod"


# -- RabbitMQ quorum queues -----------------------------------------------------------------------------------------


def test_quorum_queues_serve_and_dead_letter_past_the_delivery_limit(
    own_rabbitmq: LocalRabbitMQ, tmp_path: Path
) -> None:
    env = pool_env("rabbitmq", broker_url=own_rabbitmq.url, queue_type="quorum")
    settings = Settings.from_env(env)
    queue = settings.inference_queue
    store = RedisParamStore.from_settings(settings)
    worker = WorkerProcess(queues=[queue], env=env, log_path=tmp_path / "worker.log")
    producer = create_app(settings)  # declares the queues exactly as the worker does
    model = unique("lin")
    try:
        store.create(model, make_spec("linear", in_features=2), seed=1)
        worker.start()
        rows = [[float(i), 1.0] for i in range(20)]
        ids = [producer.send_task(PREDICT, args=[model, row]).id for row in rows]
        assert_outputs(
            served(redis.Redis.from_url(settings.result_backend), ids, worker), linear_outputs(store, model, rows)
        )
        assert "Global QoS is disabled" in worker.log()  # Celery noticed the quorum queue (per-consumer prefetch)

        listed = own_rabbitmq.ctl("list_queues", "name", "type", "arguments", "--formatter", "json")
        queues = {q["name"]: q for q in json.loads(listed.stdout[listed.stdout.index("[") :])}
        assert queues[queue]["type"] == "quorum"
        assert queues[f"{queue}.dead"]["type"] == "quorum"  # declared by the worker's DeadLetterQueues step

        worker.stop()
        with Connection(own_rabbitmq.url) as conn:
            channel = conn.channel()
            # A declaration without our arguments is refused: every producer must declare exactly as we do.
            with pytest.raises(PreconditionFailed, match="inequivalent arg"):
                declare_queue(queue)(conn.channel()).declare()
            conn.Producer(channel).publish({"poison": True}, exchange="", routing_key=queue, serializer="json")
            deliveries = 0
            while (message := _get(channel, queue)) is not None:  # 1 delivery + QUORUM_DELIVERY_LIMIT returns
                deliveries += 1
                channel.basic_reject(message.delivery_tag, requeue=True)
            dead = _get(channel, f"{queue}.dead")
            assert deliveries == 6
            assert dead is not None and json.loads(dead.body) == {"poison": True}
            assert dead.headers["x-first-death-reason"] == "delivery_limit"
            channel.basic_ack(dead.delivery_tag)
    finally:
        worker.stop()
        store.delete(model)


def _get(channel: Any, queue: str, timeout: float = 2.0) -> Any:
    """``basic.get`` until a message arrives (a quorum queue enqueues through Raft, a few ms) or ``timeout``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        message = channel.basic_get(queue, no_ack=False)
        if message is not None:
            return message
        time.sleep(0.02)  # noqa: sleep-ok - poll interval of a deadline-bounded wait
    return None


def test_client_publishes_to_quorum_queues(own_rabbitmq: LocalRabbitMQ) -> None:
    settings = Settings.from_env(pool_env("rabbitmq", broker_url=own_rabbitmq.url, queue_type="quorum"))
    with Connection(own_rabbitmq.url) as conn:
        declare_queue(settings.inference_queue, "quorum")(conn.channel()).declare()
    with Client(settings) as client:
        client.send_predict_bulk("any", [[1.0, 2.0]])
    with Connection(own_rabbitmq.url) as conn:
        assert _get(conn.channel(), settings.inference_queue) is not None


# -- Redis Sentinel -------------------------------------------------------------------------------------------------


def test_sentinel_urls_for_broker_backend_and_params_follow_a_failover(
    sentinel_group: SentinelGroup, tmp_path: Path
) -> None:
    g = sentinel_group
    env = pool_env("redis", broker_url=g.url(0), result_backend=g.url(1), params_url=g.url(2), sentinel_master=g.name)
    settings = Settings.from_env(env)
    store = RedisParamStore.from_settings(settings)
    backend = redis_client(settings.result_backend, sentinel_master=g.name)
    worker = WorkerProcess(queues=[settings.inference_queue], env=env, log_path=tmp_path / "worker.log")
    producer = Client(settings).app  # the producer client, through Sentinel too
    model = unique("lin")
    rows = [[float(i), 1.0] for i in range(20)]
    try:
        store.create(model, make_spec("linear", in_features=2), seed=1)
        worker.start()
        first = served(backend, [producer.send_task(PREDICT, args=[model, r]).id for r in rows], worker)
        assert_outputs(first, linear_outputs(store, model, rows))
        with Client(settings) as client:  # the client's own publish and wait, through Sentinel like redis://
            seen: list[int] = []
            assert client.predict_bulk(model, rows, timeout=60, on_result=seen.append) == first
            assert sorted(seen) == list(range(len(rows)))
        assert g.master_port() == g.master.port

        g.master.client().wait(1, 5000)  # the replica has every write (replication is asynchronous)
        g.master.proc.kill()  # the master dies; the sentinel promotes the replica
        wait_until(lambda: g.master_port() == g.replica.port, 30, "the sentinel to promote the replica")
        wait_until(lambda: g.replica.client().info("replication")["role"] == "master", 30, "the new master")

        # Every client follows: the store commits on the new master, the worker consumes from it, reads the new
        # version from it and stores its results there.
        snap = store.read(model)
        doubled = {k: v * 2 for k, v in snap.tensors.items()}
        assert store.commit(model, expected=0, tensors=doubled, epoch=snap.epoch).outcome is CommitOutcome.COMMITTED
        second = served(backend, [producer.send_task(PREDICT, args=[model, r]).id for r in rows], worker)
        assert {r["version"] for r in second} == {1}
        assert_outputs(second, linear_outputs(store, model, rows, 1))
    finally:
        worker.stop()
        producer.close()


# -- Redis Cluster --------------------------------------------------------------------------------------------------


def test_create_on_cluster(cluster: RedisClusterGroup) -> None:
    settings = Settings.from_env(pool_env("redis", params_url=cluster.url))
    RedisParamStore.from_settings(settings).create(unique("lin"), make_spec("linear", in_features=2))


def test_param_store_on_cluster_commits_reads_and_serves(cluster: RedisClusterGroup, tmp_path: Path) -> None:
    env = pool_env("redis", params_url=cluster.url, keep_versions=3)  # broker and results on the shared Redis
    settings = Settings.from_env(env)
    store = RedisParamStore.from_settings(settings)
    assert isinstance(store.client, redis.RedisCluster)
    model = unique("lin")
    store.create(model, make_spec("linear", in_features=2), seed=1)
    snap = store.read(model)
    # The commit script's compare-and-set, dedup and collection run on the one node that holds the model's slot.
    assert store.commit(model, expected=0, tensors=snap.tensors, update_id="u1", epoch=snap.epoch).version == 1
    assert (
        store.commit(model, expected=0, tensors=snap.tensors, update_id="u2", epoch=snap.epoch).outcome
        is CommitOutcome.CONFLICT
    )
    assert (
        store.commit(model, expected=1, tensors=snap.tensors, update_id="u1", epoch=snap.epoch).outcome
        is CommitOutcome.DUPLICATE
    )
    chunked = RedisParamStore.from_settings(settings, chunk_bytes=1024)
    tripled = {k: v * 3 for k, v in snap.tensors.items()} | {"opt.big": torch.arange(2000.0)}
    for expected in (1, 2, 3):
        assert chunked.commit(model, expected=expected, tensors=tripled, epoch=snap.epoch).version == expected + 1
    assert torch.equal(chunked.read(model, 3).tensors["opt.big"], torch.arange(2000.0))  # 8 KB in 8 chunks
    with pytest.raises(ModelError, match="no longer kept"):  # collected by the commit script (keep_versions=3)
        RedisParamStore.from_settings(settings, cache=False).read(model, 1)
    slots = {store.client.keyslot(k) for k in store.client.scan_iter(match=f"{settings.namespace}:model:*")}
    assert len(slots) == 1, "a model's keys must share one hash slot"

    worker = WorkerProcess(queues=[settings.inference_queue], env=env, log_path=tmp_path / "worker.log")
    client = Client(settings)
    try:
        worker.start()
        rows = [[float(i), 1.0] for i in range(20)]
        got = client.predict_bulk(model, rows, timeout=60)
        assert {r["version"] for r in got} == {4}
        assert_outputs(got, linear_outputs(store, model, rows))
    finally:
        worker.stop()
        client.close()
        redis.Redis.from_url(settings.broker_url).delete(settings.inference_queue, settings.training_queue)
