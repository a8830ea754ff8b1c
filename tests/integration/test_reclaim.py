"""Fast reclaim on a Redis broker (agent_workers/worker/reclaim.py): a SIGKILLed worker's unacknowledged messages
come back within seconds with the DEFAULT visibility timeout (one hour), and a live worker's long task is never
handed to another worker.

Two workers share one namespace. Every result publication is counted (``ResultListener``): a request computed twice
would be published twice, since the result script publishes only the answer it stores.
"""

from __future__ import annotations

import re
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from pathlib import Path

import pytest
import redis
from celery.result import AsyncResult

from agent_workers.client.results import ResultListener
from agent_workers.keys import Keys
from agent_workers.models import make_spec
from agent_workers.tools.supervisor import WorkerProcess
from agent_workers.worker.heartbeat import connection_of
from agent_workers.worker.kombu_redis import UNACKED_KEY
from agent_workers.worker.launch import settings_env
from tests import plugins_batching  # noqa: F401 - registers the test architectures here too
from tests.conftest import BROKERS, Pool, unique
from tests.integration.test_faults import stored, wait_until

pytestmark = pytest.mark.integration


def consumer_id(worker: WorkerProcess) -> str:
    """The fast-reclaim id a worker logs at start-up."""
    found = re.findall(r"fast reclaim: consumer (\S+),", worker.log())
    assert found, worker.log()[-3000:]
    return found[-1]


def reclaimed_workers(worker: WorkerProcess) -> list[str]:
    """The ids of the dead workers this worker reclaimed."""
    return re.findall(r"worker (\S+) missed its heartbeats", worker.log())


def second_worker(pool: Pool, queues: list[str], tmp_path) -> WorkerProcess:
    """Another worker in ``pool``'s namespace (no metrics port of its own)."""
    env = dict(pool.env, AGENT_WORKERS_METRICS_PORT="0")
    return WorkerProcess(queues=queues, env=env, log_path=tmp_path / "second.log")


def send_rows(pool: Pool, model: str, rows: list[list[float]], prefix: str) -> list[str]:
    """Send one predict per row, task ids ``<prefix><index>``; returns the ids."""
    return [
        pool.client.app.send_task("agent_workers.predict", args=[model, row], task_id=f"{prefix}{i}").id
        for i, row in enumerate(rows)
    ]


class Publications:
    """Counts result publications per task id (under a prefix of task ids)."""

    def __init__(self, pool: Pool, prefix: str) -> None:
        self.counts: Counter[str] = Counter()
        self._lock = threading.Lock()
        self.listener = ResultListener(pool.settings.result_backend, self._heard, prefix=prefix)

    def _heard(self, task_id: str, record: bytes) -> None:
        with self._lock:
            self.counts[task_id] += 1


def test_sigkilled_workers_messages_come_back_within_seconds(redis_up, start_pool, tmp_path) -> None:
    # The defaults: a one-hour visibility timeout, fast reclaim after 10 s without a heartbeat.
    pool: Pool = start_pool(
        "redis", queues="inference", max_wait_ms=20, max_batch_size=8, plugins="tests.plugins_batching"
    )
    assert pool.settings.visibility_timeout == 3600
    survivor = second_worker(pool, [pool.settings.inference_queue], tmp_path).start()
    prefix = f"reclaim-{uuid.uuid4().hex[:8]}-"
    publications = Publications(pool, prefix)
    try:
        model = unique("slow")
        pool.store.create(model, make_spec("slow", in_features=2))
        ids = send_rows(pool, model, [[float(i), 1.0] for i in range(400)], prefix)
        victim = consumer_id(pool.worker)
        broker = redis.Redis.from_url(pool.settings.broker_url)
        held_key = Keys(pool.settings.namespace).held(victim)
        wait_until(lambda: stored(pool, ids) >= 50 and broker.scard(held_key) > 0, 60, "a worker mid-drain")
        pool.worker.kill()
        killed_at = time.monotonic()
        pool.worker.proc.wait(10)
        held = broker.scard(held_key)  # frozen at the kill: what the dead worker held unacknowledged
        assert held > 0, "the kill landed when the worker held nothing; the test proved nothing"
        # Nobody restarts the killed worker: the survivor alone must serve what the dead one held.
        results = [AsyncResult(i, app=pool.client.app).get(timeout=120) for i in ids]
        recovered = time.monotonic() - killed_at
        assert [r["outputs"] for r in results] == [[float(i) + 1.0] for i in range(400)]
        wait_until(lambda: reclaimed_workers(survivor), 60, "the survivor's log of the reclaim")
        assert reclaimed_workers(survivor) == [victim], "the survivor must reclaim the dead worker, and only it"
        # Computed once each: a restored message whose answer was stored is acknowledged, not recomputed.
        wait_until(lambda: len(publications.counts) == len(ids), 30, "every publication")
        assert max(publications.counts.values()) == 1, publications.counts.most_common(3)
        print(f"\n[redis] SIGKILL holding {held} messages: all 400 served {recovered:.1f} s after the kill")
    finally:
        publications.listener.close()
        survivor.stop()


def test_live_worker_holding_a_message_longer_than_the_reclaim_time_keeps_it(redis_up, start_pool, tmp_path) -> None:
    # A forward pass of 9 s on the holder's event loop, three times the reclaim time; a second worker sweeps meanwhile.
    pool: Pool = start_pool("redis", queues="inference", plugins="tests.plugins_batching", reclaim_after=3)
    sweeper = second_worker(pool, [pool.settings.training_queue], tmp_path).start()
    prefix = f"reclaim-{uuid.uuid4().hex[:8]}-"
    publications = Publications(pool, prefix)
    try:
        model = unique("drowsy")
        pool.store.create(model, make_spec("drowsy", in_features=2))
        task_id = f"{prefix}long"
        pool.client.app.send_task("agent_workers.predict", args=[model, [1.0, 9.0]], task_id=task_id)
        assert AsyncResult(task_id, app=pool.client.app).get(timeout=120)["outputs"] == [10.0]
        wait_until(lambda: publications.counts[task_id] >= 1, 30, "the publication")
        assert publications.counts[task_id] == 1
        assert reclaimed_workers(sweeper) == [] and reclaimed_workers(pool.worker) == []
        broker = redis.Redis.from_url(pool.settings.broker_url)
        held = Keys(pool.settings.namespace).held(consumer_id(pool.worker))
        # Results are stored before the ack: wait for the ack, which must also drop the holder's record.
        wait_until(lambda: broker.scard(held) == 0, 30, "the ack to clear the holder's record")
        assert broker.llen(pool.settings.inference_queue) == 0
        assert not any(task_id.encode() in v for v in broker.hvals(UNACKED_KEY) if prefix.encode() in v)
    finally:
        publications.listener.close()
        sweeper.stop()


def test_live_worker_whose_forward_holds_the_gil_keeps_its_batch(redis_up, start_pool, tmp_path) -> None:
    # A forward pass that holds the GIL for 8 s (every thread of the worker stops), over twice the reclaim time,
    # while a second worker sweeps: the heartbeat comes from a child process, so the batch is never reclaimed.
    pool: Pool = start_pool(
        "redis", queues="inference", plugins="tests.plugins_batching", reclaim_after=3, max_wait_ms=200
    )
    sweeper = second_worker(pool, [pool.settings.training_queue], tmp_path).start()
    prefix = f"gil-{uuid.uuid4().hex[:8]}-"
    publications = Publications(pool, prefix)
    try:
        model = unique("hog")
        pool.store.create(model, make_spec("gil-hog", in_features=2))
        rows = [[float(i), 8.0 if i == 0 else 0.0] for i in range(8)]
        ids = send_rows(pool, model, rows, prefix)
        results = [AsyncResult(i, app=pool.client.app).get(timeout=120) for i in ids]
        assert [r["outputs"] for r in results] == [[sum(row)] for row in rows]
        wait_until(lambda: len(publications.counts) == len(ids), 30, "every publication")
        assert max(publications.counts.values()) == 1, publications.counts.most_common(3)
        assert reclaimed_workers(sweeper) == [] and reclaimed_workers(pool.worker) == []
    finally:
        publications.listener.close()
        sweeper.stop()


def test_clean_stop_deregisters_while_a_kill_is_still_reclaimed(broker: str, start_pool, tmp_path) -> None:
    # Two workers on one queue, 20 ms a batch. A SIGTERM mid-load is a clean stop: the stopped worker finishes or
    # restores what it held and removes its heartbeat, so nobody reclaims it or warns. A SIGKILL mid-load is a crash:
    # the survivor reclaims (on RabbitMQ the broker redelivers) and every request is still answered.
    pool: Pool = start_pool(
        broker, queues="inference", max_wait_ms=20, max_batch_size=8, plugins="tests.plugins_batching", reclaim_after=2
    )
    other = second_worker(pool, [pool.settings.inference_queue], tmp_path).start()
    model = unique("slow")
    pool.store.create(model, make_spec("slow", in_features=2))

    def send(tag: str, n: int) -> list[str]:
        return send_rows(pool, model, [[float(i), 1.0] for i in range(n)], f"{tag}-")

    def answered(ids: list[str]) -> None:
        results = [AsyncResult(i, app=pool.client.app).get(timeout=120) for i in ids]
        assert [r["outputs"] for r in results] == [[float(i) + 1.0] for i in range(len(ids))]

    try:
        ids = send(f"term-{uuid.uuid4().hex[:8]}", 200)
        wait_until(lambda: stored(pool, ids) >= 20, 60, "a worker mid-load")
        assert pool.worker.stop() == 0
        answered(ids)
        assert reclaimed_workers(other) == []
        if pool.settings.broker_is_redis:
            stopped = consumer_id(pool.worker)
            keys = Keys(pool.settings.namespace)
            broker_redis = redis.Redis.from_url(pool.settings.broker_url)
            # Gone at once: nothing is left for a sweep to find, so no sweep can warn.
            assert broker_redis.zscore(keys.heartbeats(), stopped) is None
            assert not broker_redis.exists(keys.held(stopped))
            assert f"clean stop: consumer {stopped} deregistered" in pool.worker.log()

        pool.worker.start()
        ids = send(f"kill-{uuid.uuid4().hex[:8]}", 200)
        wait_until(lambda: stored(pool, ids) >= 20, 60, "a worker mid-load")
        victim = consumer_id(other) if pool.settings.broker_is_redis else None
        other.kill()
        other.proc.wait(10)
        answered(ids)
        if victim is not None:
            wait_until(lambda: reclaimed_workers(pool.worker), 60, "the survivor's log of the reclaim")
            assert reclaimed_workers(pool.worker) == [victim]
    finally:
        other.stop()


def _exited(pid: int) -> bool:
    """Whether process ``pid`` is gone (or a zombie nobody reaped yet)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return True
    return "State:\tZ" in status


def test_heartbeat_process_stops_beating_when_its_worker_is_sigkilled(redis_up, tmp_path) -> None:
    # The worker alone is killed (an OOM kill, not its process group): its heartbeat process must not outlive it.
    broker = redis.Redis.from_url(BROKERS["redis"])
    key = Keys("t" + uuid.uuid4().hex[:10]).heartbeats()
    connection = connection_of(broker.connection_pool)
    code = (
        "import time\n"
        "from agent_workers.worker.heartbeat import HeartbeatProcess\n"
        f"beat = HeartbeatProcess(connection={connection!r}, key={key!r}, worker_id='w', interval=0.2)\n"
        "beat.start()\n"
        "print(beat._proc.pid, flush=True)\n"
        "time.sleep(600)\n"
    )
    worker = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, env=settings_env())
    try:
        child = int(worker.stdout.readline())
        wait_until(lambda: broker.zscore(key, "w") is not None, 30, "the first beat")
        worker.kill()
        worker.wait(10)
        wait_until(lambda: _exited(child), 30, "the heartbeat process to end with its worker")
    finally:
        worker.kill()
        broker.delete(key)
