"""A broker restarted mid-load: the worker reconnects on its own and every request completes, with the right answer.

Each test restarts a server of its own, never the shared ones: a ``redis-server`` on a free port whose append-only
file is fsynced on every write, or a second RabbitMQ node (own node name, ports, data and log directories, own
Erlang cookie). The model blocks at a gate (a file) with a batch in hand, so the restart always lands while the
worker holds unacknowledged messages and hundreds more wait in the queue; the gate opens once the broker is back.

The last test kills a worker the moment the broker handed it messages, on both brokers. Nothing may go down
popped messages with it: on Redis a one-queue worker waits without popping and pops-and-records atomically
(transport.py); RabbitMQ requeues a closed channel's deliveries.

The worker imports this module as a plugin (``AGENT_WORKERS_PLUGINS``) to get the ``gated`` architecture.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
import torch

from agent_workers.client import Client
from agent_workers.config import Settings
from agent_workers.models import make_spec, register_architecture
from agent_workers.store.params import RedisParamStore
from agent_workers.tools.supervisor import LocalRedis, WorkerProcess, free_port
from tests.conftest import need, pool_env, tcp_answers, unique

pytestmark = pytest.mark.integration

PLUGIN = __name__
GATE_LIMIT = 120.0  # a gate nobody opens lets the model through after this long, so a failed test cannot hang
N_REQUESTS = 500
# Redis redelivers a message whose ack was lost only after the visibility timeout; keep it short here.
FAST_REDELIVERY = {"visibility_timeout": 4, "task_time_limit": 2}
RESULT_PREFIX = "celery-task-meta-"


# -- the gated model ------------------------------------------------------------------------------------------------


class Gated(torch.nn.Module):
    """Adds its two inputs, but only once the file ``gate`` exists; it touches ``gate + '.reached'`` on arrival."""

    def __init__(self, gate: str) -> None:
        super().__init__()
        self.gate = Path(gate)
        self.scale = torch.nn.Parameter(torch.ones(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.gate.exists():
            Path(f"{self.gate}.reached").touch()
            deadline = time.monotonic() + GATE_LIMIT
            while not self.gate.exists() and time.monotonic() < deadline:
                time.sleep(0.01)  # noqa: sleep-ok - the model under test waiting for its gate, not test synchronisation
        return x.sum(dim=1, keepdim=True) * self.scale


@register_architecture("gated")
def build_gated(*, in_features: int = 2, gate: str) -> torch.nn.Module:
    return Gated(gate)


# -- a RabbitMQ node of our own -------------------------------------------------------------------------------------


def rabbit_binary(name: str) -> str | None:
    """The real ``rabbitmq-server`` / ``rabbitmqctl`` script: Debian's ``/usr/sbin`` wrapper would switch to the
    ``rabbitmq`` user, who cannot read our temporary directory."""
    found = shutil.which(name) or shutil.which(name, path="/usr/lib/rabbitmq/bin")
    if found is None:
        return None
    real = Path(os.path.realpath(found))
    if real.name == "rabbitmq-script-wrapper" and (real.parent / name).exists():
        return str(real.parent / name)
    return str(real)


class LocalRabbitMQ:
    """A RabbitMQ node of our own: node name, AMQP and distribution ports, data, logs and cookie all private.

    It shares only epmd (port 4369) with any other node on the host, which is how Erlang nodes coexist. Started in
    its own process group and stopped with ``rabbitmqctl stop`` (the process group is killed if that fails).
    """

    def __init__(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="aw-rabbit-"))
        self.node = f"aw-test-{uuid.uuid4().hex[:8]}@localhost"
        self.port = free_port()
        self.dist_port = free_port()
        self.server = rabbit_binary("rabbitmq-server")
        self.ctl_binary = rabbit_binary("rabbitmqctl")
        self.proc: subprocess.Popen[bytes] | None = None
        (self.dir / "home").mkdir()
        (self.dir / "rabbitmq-env.conf").write_text("")  # not /etc/rabbitmq's, which names the shared node
        (self.dir / "enabled_plugins").write_text("[].\n")  # no management plugin: it would want port 15672
        (self.dir / "rabbitmq.conf").write_text(f"listeners.tcp.local = 127.0.0.1:{self.port}\n")

    @property
    def url(self) -> str:
        return f"amqp://guest:guest@127.0.0.1:{self.port}//"

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("RABBITMQ_", "ERL_"))}
        env.update(
            {
                "HOME": str(self.dir / "home"),  # the Erlang cookie lives here, shared by the node and our rabbitmqctl
                "RABBITMQ_CONF_ENV_FILE": str(self.dir / "rabbitmq-env.conf"),
                "RABBITMQ_NODENAME": self.node,
                "RABBITMQ_NODE_IP_ADDRESS": "127.0.0.1",
                "RABBITMQ_NODE_PORT": str(self.port),
                "RABBITMQ_DIST_PORT": str(self.dist_port),
                "RABBITMQ_MNESIA_BASE": str(self.dir / "mnesia"),
                "RABBITMQ_LOG_BASE": str(self.dir / "log"),
                "RABBITMQ_CONFIG_FILE": str(self.dir / "rabbitmq.conf"),
                "RABBITMQ_ENABLED_PLUGINS_FILE": str(self.dir / "enabled_plugins"),
                "ERL_EPMD_ADDRESS": "127.0.0.1",
                "ERL_FLAGS": "-kernel inet_dist_use_interface {127,0,0,1}",
            }
        )
        return env

    def ctl(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        assert self.ctl_binary is not None
        return subprocess.run(
            [self.ctl_binary, "-n", self.node, *args],
            env=self.env(),
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )

    def start(self, timeout: float = 120.0) -> LocalRabbitMQ:
        assert self.server is not None
        log = open(self.dir / "server.out", "ab")  # noqa: SIM115 - handed to the child
        self.proc = subprocess.Popen(
            [self.server], env=self.env(), stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        log.close()
        deadline = time.monotonic() + timeout
        # The AMQP listener opens last in the boot; then confirm with the node itself.
        while not tcp_answers("127.0.0.1", self.port):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.kill()
                raise RuntimeError(f"RabbitMQ node {self.node} did not start:\n{self.log()[-3000:]}")
            time.sleep(0.2)  # noqa: sleep-ok - poll interval of a deadline-bounded wait
        check = self.ctl("await_startup", "--timeout", str(max(1, int(deadline - time.monotonic()))))
        if check.returncode != 0:
            raise RuntimeError(f"rabbitmqctl await_startup failed: {check.stdout}{check.stderr}")
        return self

    def stop(self, timeout: float = 60.0) -> None:
        """A clean stop (``rabbitmqctl stop``): durable queues and persistent messages are kept on disk."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.ctl("stop", timeout=timeout)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)

    def log(self) -> str:
        path = self.dir / "server.out"
        return path.read_text(errors="replace") if path.exists() else ""

    def remove(self) -> None:
        self.kill()
        shutil.rmtree(self.dir, ignore_errors=True)


_node: dict[str, Any] = {"node": None, "users": 0}


def acquire_rabbitmq() -> LocalRabbitMQ:
    """The session's own RabbitMQ node, started on first use (test_topology.py shares it: one start)."""
    need(
        rabbit_binary("rabbitmq-server") is not None and rabbit_binary("rabbitmqctl") is not None,
        "rabbitmq-server (to start a RabbitMQ node of our own)",
    )
    if _node["node"] is None:
        node = LocalRabbitMQ()
        try:
            node.start()
        except Exception:
            node.remove()
            raise
        _node["node"] = node
    _node["users"] += 1
    return _node["node"]


def release_rabbitmq() -> None:
    """Stop and remove the node once its last user is done."""
    _node["users"] -= 1
    if _node["users"] == 0:
        _node["node"].stop()
        _node["node"].remove()
        _node["node"] = None


@pytest.fixture(scope="session")
def own_rabbitmq() -> Iterator[LocalRabbitMQ]:
    yield acquire_rabbitmq()
    release_rabbitmq()


# -- helpers --------------------------------------------------------------------------------------------------------


def wait_until(condition: Callable[[], bool], timeout: float, what: str, worker: WorkerProcess | None = None) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            tail = f"\nworker log:\n{worker.log()[-3000:]}" if worker is not None else ""
            pytest.fail(f"timed out after {timeout}s waiting for {what}{tail}")
        time.sleep(0.05)  # noqa: sleep-ok - poll interval of a deadline-bounded wait


def results(backend: redis.Redis, ids: list[str]) -> dict[str, dict[str, Any]]:
    """The stored result metas of those ``ids`` that have one (read straight from the Redis backend)."""
    found: dict[str, dict[str, Any]] = {}
    for start in range(0, len(ids), 500):
        chunk = ids[start : start + 500]
        for task_id, raw in zip(chunk, backend.mget([RESULT_PREFIX + i for i in chunk]), strict=True):
            if raw is not None:
                found[task_id] = json.loads(raw)
    return found


def backend_answers(backend: redis.Redis) -> bool:
    try:
        return bool(backend.ping())
    except redis.RedisError:
        return False


class GatedPool:
    """One inference worker on ``env`` serving a gated model, and the means to drive and check it."""

    def __init__(self, env: dict[str, str], tmp: Path) -> None:
        self.env = env
        self.settings = Settings.from_env(env)
        self.worker = WorkerProcess(queues=[self.settings.inference_queue], env=env, log_path=tmp / "worker.log")
        self.client = Client(self.settings)
        self.store = RedisParamStore.from_settings(self.settings)
        self.backend = redis.Redis.from_url(self.settings.result_backend)
        self.gate = tmp / "gate"
        self.model = unique("gated")

    def start(self) -> None:
        self.store.create(self.model, make_spec("gated", in_features=2, gate=str(self.gate)))
        self.worker.start()

    def send(self, n: int, offset: int = 0) -> list[str]:
        return self.client.send_predict_bulk(self.model, [[float(offset + i), 1.0] for i in range(n)])

    def wait_at_gate(self) -> None:
        wait_until(Path(f"{self.gate}.reached").exists, 60, "the worker to hold a batch at the gate", self.worker)

    def check_all_served(self, ids: list[str], offset: int = 0, timeout: float = 90) -> dict[str, dict[str, Any]]:
        wait_until(
            lambda: backend_answers(self.backend) and len(results(self.backend, ids)) == len(ids),
            timeout,
            f"all {len(ids)} results",
            self.worker,
        )
        metas = results(self.backend, ids)
        wrong = [
            (i, metas[t])
            for i, t in enumerate(ids)
            if metas[t]["status"] != "SUCCESS" or metas[t]["result"]["outputs"] != [float(offset + i) + 1.0]
        ]
        assert not wrong, f"{len(wrong)} requests got a wrong answer, e.g. {wrong[:3]}"
        return metas

    def close(self) -> None:
        self.worker.stop()
        self.client.close()


# -- tests ----------------------------------------------------------------------------------------------------------


@pytest.fixture
def own_redis() -> Iterator[LocalRedis]:
    need(shutil.which("redis-server") is not None, "redis-server (to start a Redis of our own)")
    # Every write fsynced before Redis answers: what the queue held at the restart is what it holds after it.
    server = LocalRedis(args=["--save", "", "--appendonly", "yes", "--appendfsync", "always"]).start()
    yield server
    server.stop()
    shutil.rmtree(server.dir, ignore_errors=True)


def test_redis_restart_mid_load_loses_nothing(own_redis: LocalRedis, tmp_path: Path) -> None:
    base = f"redis://127.0.0.1:{own_redis.port}"
    env = pool_env(
        "redis",
        broker_url=f"{base}/0",
        result_backend=f"{base}/1",
        params_url=f"{base}/2",
        max_batch_size=8,
        max_wait_ms=20,
        plugins=PLUGIN,
        **FAST_REDELIVERY,
    )
    pool = GatedPool(env, tmp_path)
    broker = redis.Redis.from_url(f"{base}/0")
    try:
        pool.start()
        ids = pool.send(N_REQUESTS)
        pool.wait_at_gate()
        assert not results(pool.backend, ids), "a result was stored before the restart; the test proved nothing"

        own_redis.stop()  # SIGTERM by pid; the append-only file stays in its directory
        own_redis.start()  # same port, same directory: Redis replays the file
        queued = broker.llen(pool.settings.inference_queue)
        in_hand = broker.hlen("unacked")  # kombu's record of messages delivered and not yet acknowledged
        assert queued + in_hand == N_REQUESTS, f"after the restart {queued} queued + {in_hand} unacked"
        assert in_hand > 0 and queued > 0, "the restart did not land mid-load"

        pool.gate.touch()
        pool.check_all_served(ids)
        assert pool.worker.proc is not None and pool.worker.proc.poll() is None, "the worker exited"
        # The reconnected consumer keeps consuming new work too.
        pool.check_all_served(pool.send(20, offset=1000), offset=1000, timeout=30)
    finally:
        pool.close()
        broker.close()


def test_rabbitmq_restart_mid_load_loses_nothing(own_rabbitmq: LocalRabbitMQ, tmp_path: Path) -> None:
    env = pool_env("rabbitmq", broker_url=own_rabbitmq.url, max_batch_size=8, max_wait_ms=20, plugins=PLUGIN)
    pool = GatedPool(env, tmp_path)
    try:
        pool.start()
        ids = pool.send(N_REQUESTS)  # durable queue, persistent messages (delivery mode 2)
        pool.wait_at_gate()
        assert not results(pool.backend, ids), "a result was stored before the restart; the test proved nothing"

        own_rabbitmq.stop()
        own_rabbitmq.start()
        pool.gate.touch()
        pool.check_all_served(ids, timeout=120)
        assert pool.worker.proc is not None and pool.worker.proc.poll() is None, "the worker exited"
        pool.check_all_served(pool.send(20, offset=1000), offset=1000, timeout=30)
    finally:
        pool.close()
        params = pool.store.client  # our namespace on the shared parameter Redis
        keys = list(params.scan_iter(match=f"{pool.settings.namespace}:*", count=1000))
        if keys:
            params.delete(*keys)


# -- a worker killed right after a push -------------------------------------------------------------------------------


def in_broker(settings: Settings) -> int:
    """Messages of the inference queue the broker still holds: queued, or delivered and not acknowledged."""
    if settings.broker_is_redis:
        client = redis.Redis.from_url(settings.broker_url)
        try:
            return int(client.llen(settings.inference_queue)) + int(client.hlen("unacked"))
        finally:
            client.close()
    from kombu import Connection

    with Connection(settings.broker_url) as conn:
        return int(conn.default_channel.queue_declare(settings.inference_queue, passive=True).message_count)


def queued(settings: Settings) -> int:
    """Messages waiting in the inference queue, not yet handed to any worker."""
    if settings.broker_is_redis:
        client = redis.Redis.from_url(settings.broker_url)
        try:
            return int(client.llen(settings.inference_queue))
        finally:
            client.close()
    return in_broker(settings)  # RabbitMQ's message_count is the ready messages only


def consuming(settings: Settings) -> bool:
    """True once a worker waits on the inference queue: blocked in its pop (Redis), or a registered consumer."""
    if settings.broker_is_redis:
        client = redis.Redis.from_url(settings.broker_url)
        try:
            return any(
                c.get("cmd") in ("blmove", "blmpop", "brpop") and "b" in c.get("flags", "")
                for c in client.client_list()
            )
        finally:
            client.close()
    from kombu import Connection

    with Connection(settings.broker_url) as conn:
        return int(conn.default_channel.queue_declare(settings.inference_queue, passive=True).consumer_count) > 0


@pytest.mark.parametrize("several", [False, True], ids=["one-queue", "several-queues"])
def test_sigkill_right_after_a_push_leaves_every_message_with_the_broker(
    broker: str, request: pytest.FixtureRequest, tmp_path: Path, several: bool
) -> None:
    """A worker SIGKILLed while its blocking pop is being answered must not take messages to its grave, also one
    consuming several queues (the default ``agent-workers worker``)."""
    # On Redis, a broker of our own: kombu's 'unacked' hash is per database, and must hold only our messages.
    own = LocalRedis().start() if broker == "redis" else None
    env = pool_env(broker, **({"broker_url": own.url} if own is not None else {}))
    settings = Settings.from_env(env)
    store = RedisParamStore.from_settings(settings)
    backend = redis.Redis.from_url(settings.result_backend)
    model = unique("lin")
    store.create(model, make_spec("linear", in_features=2))
    client = Client(settings)
    queues = [settings.inference_queue, settings.training_queue] if several else [settings.inference_queue]
    worker = WorkerProcess(queues=queues, env=env, log_path=tmp_path / "worker.log")
    try:
        worker.start()
        wait_until(lambda: consuming(settings), 30, "the idle worker to wait on its queue", worker)
        # Freeze the worker, as the kernel does while it tears a SIGKILLed process down (tens of ms for a worker,
        # its sockets still open): the broker answers its pending pop, or pushes deliveries, into a process that
        # will never read them.
        os.killpg(worker.pid, signal.SIGSTOP)
        ids = client.send_predict_bulk(model, [[1.0, 2.0]] * 10)
        # RabbitMQ pushes the whole prefetch window; Redis answers the worker's pending blocking wait.
        handed = (lambda: not consuming(settings)) if settings.broker_is_redis else (lambda: queued(settings) == 0)
        wait_until(handed, 10, "the broker to hand messages to the frozen worker")
        worker.kill()
        assert worker.proc is not None
        worker.proc.wait(10)
        missing = len(ids) - len(results(backend, ids))
        assert missing == len(ids), "the frozen worker served requests"
        if settings.broker_is_redis:  # the worker is dead: what the broker holds now is all it will hold
            # A one-queue worker waits without popping (BLMOVE to the same list) and pops and records atomically
            # (transport.py), so the reply that reached the frozen process carried no message away.
            vanished = missing - in_broker(settings)
            assert vanished == 0, f"{vanished} of {missing} messages vanished"
        else:  # RabbitMQ requeues a closed channel's deliveries asynchronously: poll until they are back
            wait_until(lambda: in_broker(settings) >= missing, 10, f"{missing} messages to be requeued")
    finally:
        worker.stop()
        client.close()
        store.delete(model)
        if own is not None:
            own.stop()
            shutil.rmtree(own.dir, ignore_errors=True)
        else:  # the shared RabbitMQ: leave nothing behind
            from kombu import Connection

            with Connection(settings.broker_url) as conn:
                conn.default_channel.queue_delete(settings.inference_queue)
                conn.default_channel.exchange_delete(settings.inference_queue)
