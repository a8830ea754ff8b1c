"""Producer CPU per predict request: plain ``apply_async`` against the client's single and bulk paths."""

from __future__ import annotations

import dataclasses
import time
import uuid
from collections.abc import Callable
from typing import Any
from urllib.parse import urlparse

from agent_workers.client import Client, producer_app
from agent_workers.config import Settings
from agent_workers.contract import PREDICT, result_record
from agent_workers.redis_clients import redis_client
from agent_workers.tools.broker import delete_queue


def bench(
    settings: Settings | None = None, *, n: int = 2000, width: int = 10, queue: str | None = None
) -> dict[str, float]:
    """Producer CPU per predict request: plain ``apply_async`` vs this client's single and bulk paths.

    Publishes ``n`` messages each way to a throw-away queue (no worker needed; the queue is deleted after), and
    measures result collection by storing ``n`` results the way the worker does and reading them back with
    ``AsyncResult.get()`` one by one vs :meth:`Client.collect`. Figures are CPU microseconds of this process per
    request (``time.process_time``), so other load on the machine does not inflate them.
    """
    settings = settings or Settings.from_env()
    queue = queue or f"aw-bench-{uuid.uuid4().hex[:8]}"
    settings = dataclasses.replace(settings, inference_queue=queue)
    rows = [[float(i % 7) + 0.5 * j for j in range(width)] for i in range(n)]
    plain = producer_app(settings)
    plain.conf.task_routes = {PREDICT: {"queue": queue}}

    @plain.task(name=PREDICT)
    def _predict(model: str, inputs: Any, version: int | None = None) -> None:  # a stub: only apply_async is timed
        raise NotImplementedError

    def cpu(fn: Callable[[], Any]) -> float:
        start = time.process_time()
        fn()
        return (time.process_time() - start) / n * 1e6

    client = Client(settings)
    ids_plain: list[str] = []
    ids_bulk: list[str] = []
    out: dict[str, float] = {}
    try:
        _predict.apply_async(kwargs={"model": "bench", "inputs": rows[0]})  # warm: connection, queue declared
        client.send_predict_bulk("bench", rows[:1])
        out["publish_apply_async_us"] = cpu(
            lambda: ids_plain.extend(_predict.apply_async(kwargs={"model": "bench", "inputs": row}).id for row in rows)
        )
        out["publish_client_single_us"] = cpu(lambda: [client.send_predict("bench", row) for row in rows])
        out["publish_client_bulk_us"] = cpu(lambda: ids_bulk.extend(client.send_predict_bulk("bench", rows)))
        _store_fake_results(client, ids_plain + ids_bulk)
        out["collect_asyncresult_get_us"] = cpu(lambda: [plain.AsyncResult(i).get(timeout=30) for i in ids_plain])
        out["collect_client_bulk_us"] = cpu(lambda: client.collect(ids_bulk, timeout=30))
        out["publish_speedup"] = out["publish_apply_async_us"] / out["publish_client_bulk_us"]
        out["total_speedup"] = (out["publish_apply_async_us"] + out["collect_asyncresult_get_us"]) / (
            out["publish_client_bulk_us"] + out["collect_client_bulk_us"]
        )
    finally:
        keys = [plain.backend.get_key_for_task(i) for i in ids_plain + ids_bulk]
        if keys:
            plain.backend.client.delete(*keys)
        _delete_queue(client, queue)
        client.close()
        plain.close()
    return out


def _store_fake_results(client: Client, ids: list[str]) -> None:
    """Store a SUCCESS result for every id, as the worker's batcher does (SETEX + PUBLISH, one pipeline)."""
    backend = client.app.backend
    pipe = backend.client.pipeline(transaction=False)
    for task_id in ids:
        value = backend.encode(result_record(task_id, "SUCCESS", {"model": "bench", "version": 0, "outputs": [0.0]}))
        pipe.set(backend.get_key_for_task(task_id), value, ex=600)
    pipe.execute()


def _delete_queue(client: Client, queue: str) -> None:
    """Remove the throw-away queue from the client's broker."""
    if client.settings.broker_is_redis:
        r = redis_client(client.settings.broker_url, sentinel_master=client.settings.sentinel_master)
        try:
            delete_queue(r, queue)
        finally:
            r.close()
        return
    with client.app.connection_for_write() as conn:
        delete_queue(conn.default_channel, queue)


def report(settings: Settings, n: int, say: Callable[[str], None] = print) -> dict[str, float]:
    """Run :func:`bench` and print its figures (``agent-workers bench-producer``)."""
    figures = bench(settings, n=n)
    say(f"producer CPU per predict request, n={n}, broker {urlparse(settings.broker_url).scheme}")
    say(f"  publish  plain apply_async      {figures['publish_apply_async_us']:9.1f} us")
    say(f"  publish  client, one by one     {figures['publish_client_single_us']:9.1f} us")
    say(
        f"  publish  client, bulk           {figures['publish_client_bulk_us']:9.1f} us"
        f"   ({figures['publish_speedup']:.0f}x cheaper)"
    )
    say(f"  collect  AsyncResult.get()      {figures['collect_asyncresult_get_us']:9.1f} us")
    say(f"  collect  client, bulk           {figures['collect_client_bulk_us']:9.1f} us")
    say(f"  publish + collect               {figures['total_speedup']:9.1f} x cheaper in bulk")
    return figures
