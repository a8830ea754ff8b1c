"""The producer keeps its promises under faults (issue 24): brokers refused, stalled, frozen, killed or full
mid-bulk; the result backend frozen or killed mid-wait; the queue deleted under a long-lived client.

Each test asserts the promise, not the symptom: no call outlives its deadline (plus :data:`SLACK`), a failed bulk
puts every row in exactly one of ``queued`` / ``not_sent`` / ``unknown`` and what is in the queue agrees with it,
errors are :class:`PublishError` or :class:`ResultTimeout`, and nothing is queued or answered twice.
"""

from __future__ import annotations

import asyncio
import base64
import collections
import dataclasses
import json
import os
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import redis
from kombu import Connection

from agent_workers.client import Client, PublishError, ResultTimeout
from agent_workers.client.results import ResultListener
from agent_workers.config import Settings
from agent_workers.models import make_spec
from agent_workers.tools.supervisor import LocalRedis, free_port
from tests.conftest import Pool, pool_env, unique

pytestmark = pytest.mark.integration

#: Seconds a call may take past its timeout (thread start-up, a loaded shared machine).
SLACK = 1.5
TIMEOUT = 2.0


# -- faults -----------------------------------------------------------------------------------------------------------


class StallableProxy:
    """A TCP proxy in front of ``host:port`` that can stop forwarding without closing anything: a stalled link
    (a resource alarm, a partition without a reset)."""

    def __init__(self, host: str, port: int) -> None:
        self.upstream = (host, port)
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        self.flowing = {"up": threading.Event(), "down": threading.Event()}  # to the server, back to the client
        for event in self.flowing.values():
            event.set()
        self.closed = False
        self.sockets: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.server.accept()
                upstream = socket.create_connection(self.upstream)
            except OSError:
                return
            self.sockets += [client, upstream]
            for src, dst, way in ((client, upstream, "up"), (upstream, client, "down")):
                threading.Thread(target=self._pump, args=(src, dst, self.flowing[way]), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, flowing: threading.Event) -> None:
        try:
            while data := src.recv(65536):
                flowing.wait()
                if self.closed:
                    return
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def stall(self, *ways: str) -> None:
        """Stop forwarding ``ways`` (``"up"``, ``"down"``; both when none is named)."""
        for way in ways or tuple(self.flowing):
            self.flowing[way].clear()

    def close(self) -> None:
        self.closed = True
        for event in self.flowing.values():
            event.set()
        self.server.close()
        for s in self.sockets:
            try:
                s.shutdown(socket.SHUT_RDWR)
                s.close()
            except OSError:
                pass


@pytest.fixture
def own_redis() -> Iterator[Callable[..., LocalRedis]]:
    """Factory: a redis-server of the test's own (it may be frozen, killed, restarted); stopped by pid."""
    servers: list[LocalRedis] = []

    def start(*args: str) -> LocalRedis:
        server = LocalRedis(args=["--save", "", *args] if args else None).start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        if server.proc is not None and server.proc.poll() is None:
            os.kill(server.proc.pid, signal.SIGCONT)
        server.stop()


def restart(server: LocalRedis) -> None:
    """SIGKILL ``server`` (frozen or not) and start it again on its port."""
    assert server.proc is not None
    server.proc.kill()
    server.proc.wait(10)
    server.start()


# -- promises -----------------------------------------------------------------------------------------------------


def within_deadline(call: Callable[[], Any], timeout: float = TIMEOUT) -> BaseException:
    """Run ``call``; it must raise one of our documented errors, and no later than ``timeout`` + SLACK."""
    started = time.monotonic()
    with pytest.raises((PublishError, ResultTimeout)) as info:
        call()
    took = time.monotonic() - started
    assert took < timeout + SLACK, f"the call outlived its {timeout:g}s deadline: {took:.1f}s ({info.value})"
    return info.value


def check_partition(error: PublishError, n: int) -> None:
    """Every row of the bulk is in exactly one of queued / not_sent / unknown, with its task id."""
    assert len(error.ids) == n
    assert sorted(error.queued + error.not_sent + error.unknown) == list(range(n)), str(error)


def queued_rows(server: LocalRedis, queue: str) -> collections.Counter[tuple[str, float]]:
    """(task id, first input) of every message waiting in a Redis broker's queue, counted."""
    found: collections.Counter[tuple[str, float]] = collections.Counter()
    for raw in redis.Redis(port=server.port).lrange(queue, 0, -1):
        envelope = json.loads(raw)
        kwargs = json.loads(base64.b64decode(envelope["body"]))[1]
        found[(envelope["headers"]["id"], kwargs["inputs"][0])] += 1
    return found


def loop_keeps_running(coro_factory: Callable[[], Any]) -> int:
    """Run ``coro_factory()`` (it must fail with our error within the deadline) beside a ticker; the ticks
    counted while it ran (an event loop blocked by the call counts none)."""
    ticks = 0

    async def main() -> None:
        nonlocal ticks

        async def ticker() -> None:
            nonlocal ticks
            while True:
                await asyncio.sleep(0.05)
                ticks += 1

        task = asyncio.create_task(ticker())
        try:
            await coro_factory()
        finally:
            task.cancel()

    within_deadline(lambda: asyncio.run(main()))
    return ticks


def rows(n: int, start: int = 0) -> list[list[float]]:
    return [[float(start + i), 1.0] for i in range(n)]


# -- the broker -----------------------------------------------------------------------------------------------------


def test_an_unreachable_broker_is_a_publish_error_within_the_deadline(broker: str) -> None:
    port = free_port()  # nothing listens there
    url = f"redis://127.0.0.1:{port}/0" if broker == "redis" else f"amqp://guest:guest@127.0.0.1:{port}//"
    settings = dataclasses.replace(_settings(broker), broker_url=url)
    with Client(settings) as client:
        error = within_deadline(lambda: client.predict("m", [1.0], timeout=TIMEOUT))
        assert isinstance(error, PublishError) and error.not_sent == [0]
        error = within_deadline(lambda: client.predict_bulk("m", rows(10), timeout=TIMEOUT))
        assert isinstance(error, PublishError) and error.not_sent == list(range(10))


def _settings(broker: str) -> Settings:
    return Settings.from_env(pool_env(broker))


def test_a_stalled_rabbitmq_link_never_outlives_the_deadline(broker: str, request: pytest.FixtureRequest) -> None:
    if broker != "rabbitmq":
        pytest.skip("a stalled AMQP link (the Redis broker's stall is the frozen server below)")
    pool: Pool = request.getfixturevalue("pool")  # the shared worker, not started for nothing on Redis
    model = unique("lin")
    pool.store.create(model, make_spec("linear", in_features=2))
    proxy = StallableProxy("127.0.0.1", 5672)
    client = Client(dataclasses.replace(pool.settings, broker_url=f"amqp://guest:guest@127.0.0.1:{proxy.port}//"))
    heard: collections.Counter[str] = collections.Counter()
    listener = ResultListener(pool.settings.result_backend, lambda task_id, _r: heard.update([task_id]))
    closing = Client(client.settings)
    try:
        assert client.predict(model, [1.0, 1.0], timeout=30)["model"] == model  # a warm, declared connection
        closing.send_predict_bulk(model, rows(1), timeout=30)
        proxy.stall()
        started = time.monotonic()
        closing.close()  # the close handshake's close-ok never comes: bounded all the same
        assert time.monotonic() - started < TIMEOUT + SLACK
        within_deadline(lambda: client.predict(model, [1.0, 1.0], timeout=TIMEOUT))
        error = within_deadline(lambda: client.predict_bulk(model, rows(500), timeout=TIMEOUT))
        assert isinstance(error, PublishError)
        check_partition(error, 500)
        # Every task the client sends is confirmed: an unconfirmed fit is an error, not a silent success.
        within_deadline(lambda: client.send_fit(model, "no-dataset", timeout=TIMEOUT))
        within_deadline(lambda: client.send_train_step(model, dataset="d", rows=[0], timeout=TIMEOUT))
        # asyncio: the publish runs off the loop, so a stalled broker never blocks the caller's other work.
        assert loop_keeps_running(lambda: client.predict_async(model, [1.0, 1.0], timeout=TIMEOUT)) >= 5

        proxy.close()  # healed: a fresh link; collect what went out, send only what did not
        healed = Client(pool.settings)
        try:
            queued = [error.ids[i] for i in error.queued]
            assert len(healed.collect(queued, timeout=60)) == len(queued)
            again = healed.predict_bulk(model, [rows(500)[i] for i in error.not_sent], timeout=60)
            assert len(again) == len(error.not_sent)
            sent, counts = set(error.ids), dict(heard)  # a snapshot: the listener's thread still adds to heard
            assert all(n == 1 for task_id, n in counts.items() if task_id in sent)  # nothing twice
        finally:
            healed.close()
    finally:
        listener.close()
        proxy.close()
        client.close()


def test_lost_confirms_make_rows_unknown_never_not_sent(start_pool) -> None:
    # The messages reach RabbitMQ but its confirms never come back: the rows are "unknown", not "not sent", so a
    # caller that sends the not-sent rows again never queues one twice.
    pool: Pool = start_pool("rabbitmq", queues="inference", start=False)
    proxy = StallableProxy("127.0.0.1", 5672)
    client = Client(dataclasses.replace(pool.settings, broker_url=f"amqp://guest:guest@127.0.0.1:{proxy.port}//"))
    try:
        client.send_predict_bulk("m", rows(1), timeout=10)  # connected and declared
        proxy.stall("down")
        error = within_deadline(lambda: client.send_predict_bulk("m", rows(300, 1), timeout=TIMEOUT))
        assert isinstance(error, PublishError)
        check_partition(error, 300)
        assert error.unknown and not error.queued
    finally:
        proxy.close()
        client.close()
    with Client(pool.settings) as healed:
        healed.send_predict_bulk("m", [rows(300, 1)[i] for i in error.not_sent], timeout=10)
    with Connection(pool.settings.broker_url) as conn:
        waiting = conn.default_channel.queue_declare(pool.settings.inference_queue, passive=True).message_count
    assert waiting == 1 + 300  # every row once: the unknown ones were in fact queued, and were not sent again


def test_a_frozen_redis_broker_never_outlives_the_deadline_and_the_report_matches_the_queue(own_redis) -> None:
    server = own_redis()
    settings = dataclasses.replace(_settings("redis"), broker_url=server.url)
    queue = settings.inference_queue
    with Client(settings) as client:
        first = client.send_predict_bulk("m", rows(10), timeout=10)  # a warm connection
        os.kill(server.proc.pid, signal.SIGSTOP)
        try:
            error = within_deadline(lambda: client.predict_bulk("m", rows(3000, 10), timeout=TIMEOUT))
            assert isinstance(error, PublishError)
            check_partition(error, 3000)
            assert loop_keeps_running(lambda: client.predict_async("m", [1.0, 1.0], timeout=TIMEOUT)) >= 5
        finally:
            os.kill(server.proc.pid, signal.SIGCONT)
        # Whatever the frozen server did with the bulk once thawed, it is what the error said could be there:
        # the queued rows, some of the unknown ones, none of those not sent; none twice.
        waiting = queued_rows(server, queue)
        assert all(n == 1 for n in waiting.values())
        ids = {task_id for task_id, _ in waiting}
        assert set(first) <= ids
        assert {error.ids[i] for i in error.queued} <= ids
        assert not ids & {error.ids[i] for i in error.not_sent}
        assert ids - set(first) <= {error.ids[i] for i in error.queued + error.unknown}
        assert len(client.send_predict_bulk("m", rows(5), timeout=10)) == 5  # and it publishes again


def test_a_redis_broker_killed_mid_bulk_reports_exactly_what_went_out(own_redis) -> None:
    server = own_redis()
    settings = dataclasses.replace(_settings("redis"), broker_url=server.url)
    with Client(settings) as client:
        client.send_predict_bulk("m", rows(1), timeout=10)
        os.kill(server.proc.pid, signal.SIGSTOP)
        outcome: list[BaseException | list[str]] = []
        call = threading.Thread(
            target=lambda: outcome.append(_try(lambda: client.send_predict_bulk("m", rows(3000), timeout=8)))
        )
        call.start()
        restart(server)  # SIGKILL while frozen, and a new empty server on the same port
        call.join(8 + SLACK)
        assert not call.is_alive(), "the bulk outlived its deadline"
        waiting = queued_rows(server, settings.inference_queue)
        assert all(n == 1 for n in waiting.values())
        ids = {task_id for task_id, _ in waiting}
        if isinstance(outcome[0], PublishError):
            error = outcome[0]
            check_partition(error, 3000)
            assert ids == {error.ids[i] for i in error.queued}  # the new server answered: nothing is unknown
            assert not error.unknown
        else:  # the call reached the new server only: all of it is there
            assert ids == set(outcome[0])


def _try(call: Callable[[], Any]) -> Any:
    try:
        return call()
    except Exception as exc:  # noqa: BLE001 - handed to the test thread
        return exc


def test_a_full_redis_broker_reports_exactly_which_rows_went_out_and_resending_the_rest_never_duplicates(
    own_redis,
) -> None:
    server = own_redis()
    admin = redis.Redis(port=server.port)
    admin.config_set("maxmemory", int(admin.info("memory")["used_memory"]) + 1_500_000)
    settings = dataclasses.replace(_settings("redis"), broker_url=server.url)
    bulk = rows(5000)
    with Client(settings) as client:
        error = within_deadline(lambda: client.send_predict_bulk("m", bulk, timeout=TIMEOUT * 5), TIMEOUT * 5)
        assert isinstance(error, PublishError) and "OutOfMemory" in str(error)
        check_partition(error, 5000)
        assert error.queued and error.not_sent and not error.unknown  # part-way, and exactly known
        waiting = queued_rows(server, settings.inference_queue)
        assert {task_id for task_id, _ in waiting} == {error.ids[i] for i in error.queued}
        admin.config_set("maxmemory", 0)
        client.send_predict_bulk("m", [bulk[i] for i in error.not_sent], timeout=10)
        waiting = queued_rows(server, settings.inference_queue)
        assert sorted(x for _, x in waiting.elements()) == [float(i) for i in range(5000)]  # each row once


def test_a_deleted_queue_is_declared_again_under_a_long_lived_client(start_pool) -> None:
    pool: Pool = start_pool("rabbitmq", queues="inference", start=False)
    model = unique("lin")
    pool.store.create(model, make_spec("linear", in_features=2))
    pool.client.send_predict_bulk(model, rows(3), timeout=10)  # declared, and remembered as declared
    with Connection(pool.settings.broker_url) as conn:
        conn.default_channel.queue_delete(pool.settings.inference_queue)  # what docs/operations.md tells to do
    ids = pool.client.send_predict_bulk(model, rows(20), timeout=10)
    with Connection(pool.settings.broker_url) as conn:
        waiting = conn.default_channel.queue_declare(pool.settings.inference_queue, passive=True).message_count
    assert waiting == 20  # not confirmed and dropped: returned (mandatory), declared again, sent again
    pool.worker.start()
    assert len(pool.client.collect(ids, timeout=60)) == 20


# -- the result backend -------------------------------------------------------------------------------------------


def test_the_wait_survives_a_backend_restart_and_a_frozen_backend_is_a_result_timeout(start_pool, own_redis) -> None:
    # The backend is always Redis, whatever the broker: one broker is enough here.
    backend = own_redis("--appendonly", "yes", "--appendfsync", "always")  # a restart keeps what was stored
    pool: Pool = start_pool("redis", queues="inference", result_backend=backend.url)
    model = unique("lin")
    pool.store.create(model, make_spec("linear", in_features=2))
    client = pool.client
    assert client.predict(model, [1.0, 1.0], timeout=60)["model"] == model

    os.kill(backend.proc.pid, signal.SIGSTOP)  # frozen mid-wait
    try:
        error = within_deadline(lambda: client.predict(model, [2.0, 1.0], timeout=TIMEOUT))
        assert isinstance(error, ResultTimeout) and len(error.ids) == 1
        late = within_deadline(lambda: asyncio.run(client.predict_async(model, [3.0, 1.0], timeout=TIMEOUT)))
        assert isinstance(late, ResultTimeout) and len(late.ids) == 1  # the asyncio wait keeps the deadline too
    finally:
        os.kill(backend.proc.pid, signal.SIGCONT)
    assert client.collect(error.ids, timeout=60)[0]["model"] == model  # the ids it carried still answer

    os.kill(backend.proc.pid, signal.SIGSTOP)  # frozen while the bulk is published and waited for ...
    done: list[Any] = []
    call = threading.Thread(target=lambda: done.append(_try(lambda: client.predict_bulk(model, rows(200), timeout=60))))
    call.start()
    restart(backend)  # ... then killed, and back a moment later with what it had stored
    call.join(60 + SLACK)
    assert not call.is_alive()
    assert isinstance(done[0], list), done[0]
    assert len(done[0]) == 200 and all(r["model"] == model for r in done[0])
