"""A result-backend outage loses nothing and strands nothing.

The worker's result backend is a ``redis-server`` of the test's own (the broker and the parameters stay on the
shared services, both brokers). The gated model holds a batch while the backend is killed by pid; the worker then
cannot store anything: it retries from its timer and, after ``AGENT_WORKERS_RESULT_RETRY_S``, hands the messages
back to the broker. Once the backend is started again on the same port, every request ends final and the worker
still consumes new work.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent_workers.tools.supervisor import LocalRedis
from tests.conftest import _cleanup, need, pool_env
from tests.integration.test_broker_restart import PLUGIN, GatedPool, wait_until

pytestmark = pytest.mark.integration

N_REQUESTS = 24  # three times the prefetch window (2 x max batch 4): stranded slots would stop the worker


@pytest.fixture
def own_backend() -> Iterator[LocalRedis]:
    need(shutil.which("redis-server") is not None, "redis-server (to start a result backend of our own)")
    server = LocalRedis().start()
    yield server
    server.stop()
    shutil.rmtree(server.dir, ignore_errors=True)


def test_result_backend_outage_ends_every_request_final(broker: str, own_backend: LocalRedis, tmp_path: Path) -> None:
    env = pool_env(
        broker,
        result_backend=f"redis://127.0.0.1:{own_backend.port}/1",
        max_batch_size=4,
        max_wait_ms=20,
        result_retry_s=1,
        plugins=PLUGIN,
    )
    pool = GatedPool(env, tmp_path)
    try:
        pool.start()
        ids = pool.send(N_REQUESTS)
        pool.wait_at_gate()
        assert own_backend.proc is not None
        own_backend.proc.kill()  # SIGKILL by pid, mid-batch
        own_backend.proc.wait(10)
        pool.gate.touch()
        # Unstored results are retried, then their messages go back to the broker (not held for 30 min / 1 h).
        wait_until(lambda: "requeueing their messages" in pool.worker.log(), 60, "a requeue", pool.worker)
        own_backend.start()  # same port, empty: nothing was stored during the outage
        pool.check_all_served(ids, timeout=90)
        assert pool.worker.proc is not None and pool.worker.proc.poll() is None, "the worker exited"
        pool.check_all_served(pool.send(8, offset=1000), offset=1000, timeout=30)
    finally:
        pool.close()
        _cleanup(pool.settings)  # our namespace and queues on the shared services
