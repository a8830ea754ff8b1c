"""The benchmark behind ``agent-workers bench`` / ``make bench``: our batcher against per-request Celery.

Every run measures, on the same machine, broker and model, with the same worker command line
(``celery -A tasks worker -P threads -c 1 --prefetch-multiplier 2×max_batch_size -E``):

* ``ours``: ``agent_workers.predict`` through the dynamic batcher;
* ``naive``: a plain Celery task doing one forward pass per message (``agent_workers.bench_tasks``);
* ``celery-batches``: celery-batches 0.11 (only with ``--with-celery-batches``, which installs it ``--no-deps``).

Modes:

* **drain**: the queue is pre-filled with N single-example requests (raw protocol-v2 messages published in bulk; the
  fill is not measured), then the worker starts. Throughput is counted between the first and the last result the
  worker stored (their ``date_done``), so start-up and the model load are excluded; worker CPU comes from
  ``/proc/<pid>/stat`` over the same interval. A sweep repeats it for several ``max_batch_size`` values.
* **closed loop**: C producers each send one request and wait for its result (pub/sub on the result key) before the
  next; latency percentiles and the rate they reach.
* **open loop**: Poisson arrivals at half the drain rate of ``ours``; latency counted from the *intended* send time,
  so a late sender cannot hide queueing (coordinated omission).

The pure parts (percentiles, rates, tables, targets) are unit-tested in tests/unit/test_bench.py.
"""

from __future__ import annotations

import base64
import bisect
import dataclasses
import itertools
import json
import math
import os
import platform
import queue
import re
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np

from agent_workers.config import Settings

SYSTEMS = ("ours", "naive", "celery-batches")
TASK_NAMES = {"ours": "agent_workers.predict", "naive": "agent_workers.bench.predict_naive",
              "celery-batches": "agent_workers.bench.predict_celery_batches"}
DEFAULT_SWEEP = (1, 8, 32, 64, 128)
RESULT_PREFIX = "celery-task-meta-"
CELERY_BATCHES_PIN = "celery-batches==0.11"
STALL_SECONDS = 120.0

# The targets we report against (never asserted): see docs/benchmarks.md.
TARGET_VS_NAIVE = 10.0
TARGET_VS_CELERY_BATCHES = 3.0
TARGET_RATE = 3500.0
TARGET_CPU_MS = 0.28
TARGET_VS_RAW = 0.80


@dataclasses.dataclass(frozen=True)
class Workload:
    """A model to serve: an ``mlp`` config, and how many decimals its random inputs carry in JSON."""

    name: str
    config: dict[str, Any]
    decimals: int = 4

    @property
    def in_features(self) -> int:
        return int(self.config["in_features"])

    def spec(self) -> Any:
        from agent_workers.models import make_spec

        return make_spec("mlp", **json.loads(json.dumps(self.config)))


WORKLOADS = {
    # the reference model of the issue: 64 -> 256 -> 256 -> 10 (85,002 parameters)
    "mlp": Workload("mlp", {"in_features": 64, "hidden": [256, 256], "out_features": 10}),
    # weight-bound: 1024 -> 4096 -> 4096 -> 1024, 25,175,040 parameters (100 MB of float32)
    "heavy": Workload("heavy", {"in_features": 1024, "hidden": [4096, 4096], "out_features": 1024}),
}


# -- pure maths (unit-tested) -------------------------------------------------------------------------------------


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0-100) with linear interpolation between order statistics (numpy's default).

    Raises:
        ValueError: ``values`` is empty or ``q`` is outside [0, 100].
    """
    if not values:
        raise ValueError("percentile of no values")
    if not 0.0 <= q <= 100.0:
        raise ValueError(f"percentile must be within [0, 100], got {q}")
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100.0
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def latency_summary(seconds: Sequence[float]) -> dict[str, float]:
    """p50/p95/p99/max/mean of latencies given in seconds, returned in milliseconds."""
    if not seconds:
        return {"count": 0}
    ms = [s * 1000.0 for s in seconds]
    return {"count": len(ms), "p50_ms": percentile(ms, 50), "p95_ms": percentile(ms, 95),
            "p99_ms": percentile(ms, 99), "max_ms": max(ms), "mean_ms": sum(ms) / len(ms)}


def cdf_points(seconds: Sequence[float], points: int = 200) -> list[tuple[float, float]]:
    """(latency ms, fraction ≤ it) at ``points`` evenly spaced fractions, for plotting a CDF from the JSON."""
    if not seconds:
        return []
    ms = sorted(s * 1000.0 for s in seconds)
    fractions = [i / (points - 1) for i in range(points)]
    return [(percentile(ms, 100.0 * f), f) for f in fractions]


def ratio(numerator: float | None, denominator: float | None) -> float | None:
    """``numerator / denominator``, or None when either is missing or the denominator is not positive."""
    if numerator is None or denominator is None or denominator <= 0:
        return None
    return numerator / denominator


def drain_rate(done_times: Sequence[float]) -> tuple[float, float, int]:
    """Throughput of a drain from the wall-clock times its results were stored.

    The requests finished at the very first timestamp (the first batch) mark the start, so the count is the
    requests finished after it and the interval is first → last.

    Returns:
        (requests per second, seconds, requests counted); (0, 0, 0) when there is no interval to measure.
    """
    if len(done_times) < 2:
        return 0.0, 0.0, 0
    ordered = sorted(done_times)
    first, last = ordered[0], ordered[-1]
    counted = len(ordered) - bisect.bisect_right(ordered, first)
    seconds = last - first
    if seconds <= 0 or counted == 0:
        return 0.0, 0.0, 0
    return counted / seconds, seconds, counted


def interpolate(samples: Sequence[tuple[float, float]], t: float) -> float:
    """Linear interpolation in ``(time, value)`` samples sorted by time; clamped at both ends."""
    if not samples:
        raise ValueError("no samples")
    times = [s[0] for s in samples]
    i = bisect.bisect_left(times, t)
    if i == 0:
        return samples[0][1]
    if i >= len(samples):
        return samples[-1][1]
    (t0, v0), (t1, v1) = samples[i - 1], samples[i]
    return v0 if t1 == t0 else v0 + (v1 - v0) * (t - t0) / (t1 - t0)


def parse_proc_stat(text: str, ticks_per_second: float) -> float:
    """CPU seconds (user + system, all threads) from the text of ``/proc/<pid>/stat``.

    The command name (field 2) may contain spaces and parentheses, so fields are counted after its last ``)``.
    """
    fields = text[text.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / ticks_per_second  # utime, stime: fields 14 and 15 of the line


def parse_cpu_busy(text: str, ticks_per_second: float) -> float:
    """Busy CPU seconds of the whole machine (all CPUs, everything but idle and iowait) from ``/proc/stat``."""
    fields = [int(v) for v in text.split("\n", 1)[0].split()[1:]]
    return (sum(fields[:8]) - fields[3] - fields[4]) / ticks_per_second  # user..steal, less idle and iowait


def latency_bound_ms(max_wait_ms: float, batch_compute_ms: float) -> float:
    """The p99 goal at half the saturation rate: max_wait + 3 × batch compute + 10 ms."""
    return max_wait_ms + 3.0 * batch_compute_ms + 10.0


def format_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A plain-text table: numbers right-aligned with thousands separators, None shown as ``-``."""

    def cell(value: Any) -> str:
        if value is None:
            return "-"
        if isinstance(value, bool):
            return "yes" if value else "no"
        if isinstance(value, int):
            return f"{value:,}"
        if isinstance(value, float):
            if value == 0 or abs(value) >= 100:
                return f"{value:,.0f}"
            return f"{value:.3f}" if abs(value) < 1 else f"{value:.2f}"
        return str(value)

    cells = [[cell(v) for v in row] for row in rows]
    widths = [max([len(h)] + [len(r[i]) for r in cells]) for i, h in enumerate(headers)]
    numeric = [all(isinstance(row[i], (int, float)) or row[i] is None for row in rows) for i in range(len(headers))]

    def line(values: Sequence[str]) -> str:
        return "  ".join(v.rjust(w) if num else v.ljust(w) for v, w, num in zip(values, widths, numeric, strict=True))

    return "\n".join([line(headers), line(["-" * w for w in widths]), *(line(r) for r in cells)]).rstrip()


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """The same table as :func:`format_table`, in GitHub markdown."""
    text = format_table(headers, rows).splitlines()
    body = [" | ".join(c.strip() for c in re.split(r"\s{2,}", r.strip())) for r in text[:1] + text[2:]]
    sep = " | ".join("---:" if all(isinstance(r[i], (int, float)) or r[i] is None for r in rows) else "---"
                     for i in range(len(headers)))
    return "\n".join(f"| {r} |" for r in [body[0], sep, *body[1:]])


@dataclasses.dataclass(frozen=True)
class Check:
    """One target compared with what was measured."""

    what: str
    target: str
    measured: float | None
    met: bool | None


def check_targets(drains: Sequence[dict[str, Any]], raws: dict[str, dict[str, float]],
                  opens: Sequence[dict[str, Any]]) -> list[Check]:
    """Compare results with the issue's targets, per broker and workload.

    Args:
        drains: drain results (``system``, ``broker``, ``workload``, ``rate``, ``cpu_ms_per_request``,
            ``max_batch_size``) at the default batch size.
        raws: raw torch req/s per workload and batch size (``raws["heavy"]["64"]``), used when a drain carries
            no ``raw_torch_rate`` of its own (measured just before it).
        opens: open-loop results of ours with ``p99_ms`` and ``bound_ms``.
    """
    checks: list[Check] = []
    by = {(d["system"], d["broker"], d["workload"]): d for d in drains}
    for (system, broker, workload), d in sorted(by.items(), key=lambda kv: (kv[0][2] != "mlp", kv[0][2], kv[0][1])):
        if system != "ours":
            continue
        where = f"{broker}/{workload}"
        naive = by.get(("naive", broker, workload))
        if naive:
            r = ratio(d["rate"], naive["rate"])
            checks.append(Check(f"{where} drain vs naive", f">= {TARGET_VS_NAIVE:g}x", r,
                                None if r is None else r >= TARGET_VS_NAIVE))
        cb = by.get(("celery-batches", broker, workload))
        if cb:
            r = ratio(d["rate"], cb["rate"])
            checks.append(Check(f"{where} drain vs celery-batches", f">= {TARGET_VS_CELERY_BATCHES:g}x", r,
                                None if r is None else r >= TARGET_VS_CELERY_BATCHES))
        if workload == "mlp":
            checks.append(Check(f"{where} drain req/s", f"~{TARGET_RATE:,.0f}", d["rate"],
                                d["rate"] >= TARGET_RATE))
            cpu = d.get("cpu_ms_per_request")
            checks.append(Check(f"{where} worker CPU ms/request", f"~{TARGET_CPU_MS}", cpu,
                                None if cpu is None else cpu <= TARGET_CPU_MS))
        raw = d.get("raw_torch_rate") or raws.get(workload, {}).get(str(d["max_batch_size"]))
        if workload == "heavy" and raw:
            r = ratio(d["rate"], raw)
            checks.append(Check(f"{where} end-to-end / raw torch", f">= {TARGET_VS_RAW:.0%}", r,
                                None if r is None else r >= TARGET_VS_RAW))
    for o in opens:
        basis = "" if o.get("open_basis", "drain") == "drain" else f", half the {o['open_basis']} rate"
        checks.append(Check(f"{o['broker']}/{o['workload']} p99 at half saturation (ms{basis})",
                            f"<= {o['bound_ms']:.1f}", o["p99_ms"], o["p99_ms"] <= o["bound_ms"]))
    return checks


# -- messages -----------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class TaskMessage:
    """A Celery protocol-v2 message: headers, properties and the JSON body ``[args, kwargs, embed]``."""

    id: str
    headers: dict[str, Any]
    properties: dict[str, Any]
    body: bytes


def task_message(amqp: Any, task_id: str, name: str, args: list[Any]) -> TaskMessage:
    """Build the message ``send_task(name, args=args, task_id=task_id)`` would publish (``amqp`` is ``app.amqp``)."""
    headers, properties, body, _ = amqp.as_task_v2(task_id, name, args=args, kwargs={})
    return TaskMessage(task_id, headers, dict(properties), json.dumps(body).encode())


class MessageFactory:
    """Messages for one task name and model, cheap to make: ``as_task_v2`` runs once per input row (a template),
    and each message only swaps in its task id (``id``, ``root_id``, ``correlation_id``).
    """

    def __init__(self, amqp: Any, name: str, model: str, rows: Sequence[list[float]]) -> None:
        self.templates = [task_message(amqp, "0", name, [model, row]) for row in rows]

    def __call__(self, task_id: str, index: int) -> TaskMessage:
        t = self.templates[index % len(self.templates)]
        return TaskMessage(task_id, {**t.headers, "id": task_id, "root_id": task_id},
                           {**t.properties, "correlation_id": task_id}, t.body)


def redis_envelope(message: TaskMessage, queue_name: str, *, delivery_tag: str | None = None) -> str:
    """The JSON kombu's Redis transport LPUSHes for this message on a direct exchange named like the queue.

    Mirrors ``kombu.transport.virtual.Channel.prepare_message`` + ``_inplace_augment_message`` (body base64).
    """
    properties = {**message.properties, "delivery_mode": 2,
                  "delivery_info": {"exchange": queue_name, "routing_key": queue_name}, "priority": 0,
                  "body_encoding": "base64", "delivery_tag": delivery_tag or str(uuid.uuid4())}
    return json.dumps({"body": base64.b64encode(message.body).decode(), "content-encoding": "utf-8",
                       "content-type": "application/json", "headers": message.headers, "properties": properties})


class Publisher:
    """Publishes task messages onto one queue, on Redis (LPUSH of kombu's envelope) or RabbitMQ (kombu Producer)."""

    def __init__(self, broker_url: str, queue_name: str) -> None:
        self.url = broker_url
        self.queue = queue_name
        self.redis = urlparse_scheme(broker_url) in {"redis", "rediss"}
        self._conn: Any = None
        self._channel: Any = None
        if self.redis:
            import redis

            self._client = redis.Redis.from_url(broker_url)
        else:
            from kombu import Connection

            from agent_workers.app import declare_queue

            self._conn = Connection(broker_url)
            self._channel = self._conn.channel()
            declare_queue(queue_name)(self._channel).declare()

    def send(self, message: TaskMessage) -> None:
        if self.redis:
            self._client.lpush(self.queue, redis_envelope(message, self.queue))
            return
        # what kombu's Producer.publish ends in, minus its per-call overhead (the body is already JSON)
        amqp_message = self._channel.prepare_message(message.body, 0, "application/json", "utf-8", message.headers,
                                                     {**message.properties, "delivery_mode": 2})
        self._channel.basic_publish(amqp_message, exchange=self.queue, routing_key=self.queue)

    def fill(self, messages: Iterator[TaskMessage], chunk: int = 1000) -> int:
        """Publish everything ``messages`` yields, pipelined on Redis; returns the count."""
        count = 0
        if not self.redis:
            for message in messages:
                self.send(message)
                count += 1
            return count
        while True:
            batch = [redis_envelope(m, self.queue) for m in itertools.islice(messages, chunk)]
            if not batch:
                return count
            self._client.lpush(self.queue, *batch)
            count += len(batch)

    def depth(self) -> int:
        if self.redis:
            return int(self._client.llen(self.queue))
        return int(self._channel.queue_declare(queue=self.queue, passive=True).message_count)

    def delete(self) -> None:
        """Remove the queue (and, on Redis, its kombu binding key)."""
        if self.redis:
            self._client.delete(self.queue, f"_kombu.binding.{self.queue}")
            return
        channel = self._channel
        for call in (lambda: channel.queue_delete(self.queue), lambda: channel.exchange_delete(self.queue)):
            try:
                call()
            except Exception:  # noqa: BLE001 - already gone
                pass

    def close(self) -> None:
        if self._conn is not None:
            self._conn.release()
        else:
            self._client.close()


def urlparse_scheme(url: str) -> str:
    return url.split("://", 1)[0].lower()


# -- measuring ----------------------------------------------------------------------------------------------------


_TICKS = float(os.sysconf("SC_CLK_TCK")) if hasattr(os, "sysconf") else 100.0


def process_cpu_seconds(pid: int) -> float:
    """CPU seconds used so far by ``pid`` and its live descendants (prefork children), from /proc."""
    total = 0.0
    todo = [pid]
    while todo:
        p = todo.pop()
        try:
            total += parse_proc_stat(Path(f"/proc/{p}/stat").read_text(), _TICKS)
            for child in Path(f"/proc/{p}/task").glob("*/children"):
                todo.extend(int(c) for c in child.read_text().split())
        except (OSError, ValueError):
            continue
    return total


class Sampler:
    """Samples, every ``interval`` seconds in a thread, ``(wall time, CPU seconds)`` of the worker, of the Redis
    server (``INFO cpu``), of this process and of the whole machine, so a drain can say how much CPU other work on
    a shared machine took while it ran.
    """

    def __init__(self, pid: int, redis_client: Any, interval: float = 0.05) -> None:
        self.pid, self.redis, self.interval = pid, redis_client, interval
        self.worker: list[tuple[float, float]] = []
        self.server: list[tuple[float, float]] = []
        self.me: list[tuple[float, float]] = []
        self.machine: list[tuple[float, float]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while True:
            now = time.time()
            self.worker.append((now, process_cpu_seconds(self.pid)))
            self.me.append((now, time.process_time()))
            try:
                self.machine.append((now, parse_cpu_busy(Path("/proc/stat").read_text(), _TICKS)))
            except OSError:
                pass
            try:
                info = self.redis.info("cpu")
                self.server.append((now, float(info["used_cpu_user"]) + float(info["used_cpu_sys"])))
            except Exception:  # noqa: BLE001 - Redis CPU is a nice-to-have
                pass
            if self._stop.wait(self.interval):
                return


_DATE_DONE = re.compile(rb'"date_done": ?"([^"]+)"')


def read_done_times(client: Any, ids: Sequence[str], chunk: int = 2000) -> tuple[list[float], int]:
    """Wall-clock ``date_done`` of each stored result (epoch seconds) and how many are not SUCCESS.

    Reads only the head and the tail of each result (GETRANGE), so large outputs are not transferred.
    """
    times: list[float] = []
    failed = 0
    for start in range(0, len(ids), chunk):
        pipe = client.pipeline(transaction=False)
        for task_id in ids[start : start + chunk]:
            pipe.getrange(RESULT_PREFIX + task_id, 0, 40)
            pipe.getrange(RESULT_PREFIX + task_id, -400, -1)
        replies = pipe.execute()
        for head, tail in zip(replies[0::2], replies[1::2], strict=True):
            if b'"SUCCESS"' not in head:
                failed += 1
            match = _DATE_DONE.search(tail) or _DATE_DONE.search(head + tail)
            if match:
                times.append(datetime.fromisoformat(match.group(1).decode()).timestamp())
    return times, failed


def wait_all_stored(client: Any, ids: Sequence[str], *, on_progress: Callable[[int], None], alive: Callable[[], bool],
                    poll: float = 0.05) -> None:
    """Block until every result key exists; results arrive roughly in order, so check a moving window.

    Raises:
        RuntimeError: the worker died, or no result arrived for ``STALL_SECONDS``.
    """
    done = 0
    last_progress = time.monotonic()
    while done < len(ids):
        window = ids[done : done + 1000]
        found = int(client.exists(*(RESULT_PREFIX + i for i in window)))
        if found == len(window):
            done += len(window)
            last_progress = time.monotonic()
            continue
        if found:
            last_progress = time.monotonic()
        on_progress(done + found)
        if not alive():
            raise RuntimeError("the worker exited before the queue was drained")
        if time.monotonic() - last_progress > STALL_SECONDS:
            raise RuntimeError(f"no result for {STALL_SECONDS:.0f}s ({done + found}/{len(ids)} stored)")
        time.sleep(poll)
    on_progress(len(ids))


def scrape_metrics(port: int) -> dict[str, float]:
    """Sums of our Prometheus samples by name (``agent_workers_compute_seconds_sum`` ...); {} when unreachable."""
    from urllib.request import urlopen

    from prometheus_client.parser import text_string_to_metric_families

    try:
        text = urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    except OSError:
        return {}
    sums: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name.startswith("agent_workers_"):
                sums[sample.name] = sums.get(sample.name, 0.0) + sample.value
    return sums


def batch_stats(before: dict[str, float], after: dict[str, float]) -> dict[str, float | None]:
    """Mean batch size and mean forward-pass time per batch between two scrapes."""
    def delta(name: str) -> float:
        return after.get(name, 0.0) - before.get(name, 0.0)

    batches = delta("agent_workers_batch_size_count")
    return {"batches": batches or None,
            "mean_batch_size": delta("agent_workers_batch_size_sum") / batches if batches else None,
            "mean_batch_compute_ms": 1000 * delta("agent_workers_compute_seconds_sum") / batches if batches else None,
            "compute_seconds": delta("agent_workers_compute_seconds_sum") if batches else None}


class ResultListener:
    """Receives result-key publications (``PSUBSCRIBE celery-task-meta-<prefix>*``) and reports each arrival."""

    def __init__(self, url: str, prefix: str, on_result: Callable[[str, float, bool], None]) -> None:
        import redis

        self._pubsub = redis.Redis.from_url(url).pubsub(ignore_subscribe_messages=True)
        self._pubsub.psubscribe(f"{RESULT_PREFIX}{prefix}*")
        self._pubsub.get_message(timeout=1.0)  # the subscription is active before anything is sent
        self._on_result = on_result
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        cut = len(RESULT_PREFIX)
        while not self._stop.is_set():
            msg = self._pubsub.get_message(timeout=0.1)
            if msg is None or msg["type"] != "pmessage":
                continue
            now = time.perf_counter()
            self._on_result(msg["channel"][cut:].decode(), now, b'"SUCCESS"' in msg["data"][:40])

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        self._pubsub.close()


class LatencyRun:
    """Sends requests (closed or open loop) through a :class:`Publisher` and times each until its result is stored.

    Args:
        publisher: where requests go.
        make: ``make(task_id) -> TaskMessage``.
        backend_url: the Redis result backend (results are announced there by PUBLISH on their key).
        prefix: task-id prefix of this run (what the listener subscribes to).
    """

    def __init__(self, publisher: Publisher, make: Callable[[str], TaskMessage], backend_url: str,
                 prefix: str) -> None:
        self.publisher, self.make, self.prefix = publisher, make, prefix
        self.sent: dict[str, float] = {}
        self.latencies: list[float] = []
        self.failed = 0
        self.completed_in_window = 0
        self.window: tuple[float, float] = (math.inf, math.inf)
        self._lock = threading.Lock()
        self._slots: queue.Queue[int] = queue.Queue()
        self._counter = itertools.count()
        self._outstanding = threading.Semaphore(0)
        self.listener = ResultListener(backend_url, prefix, self._on_result)

    def _on_result(self, task_id: str, now: float, ok: bool) -> None:
        with self._lock:
            t0 = self.sent.pop(task_id, None)
            if t0 is None:
                return
            if self.window[0] <= t0 < self.window[1]:
                self.latencies.append(now - t0)
                if not ok:
                    self.failed += 1
            if self.window[0] <= now < self.window[1]:
                self.completed_in_window += 1
        self._slots.put(0)

    def _send(self, t0: float | None = None) -> None:
        task_id = f"{self.prefix}{next(self._counter):08d}"
        message = self.make(task_id)
        with self._lock:
            self.sent[task_id] = time.perf_counter() if t0 is None else t0
        self.publisher.send(message)

    def closed(self, concurrency: int, duration: float, warmup: float) -> float:
        """``concurrency`` producers, each sending its next request as soon as its previous result is stored."""
        start = time.perf_counter()
        self.window = (start + warmup, start + warmup + duration)
        for _ in range(concurrency):
            self._slots.put(0)
        while time.perf_counter() < self.window[1]:
            try:
                self._slots.get(timeout=0.1)
            except queue.Empty:
                continue
            self._send()
        self._drain()
        return self.completed_in_window / duration

    def open(self, rate: float, duration: float, warmup: float, seed: int = 0) -> float:
        """Poisson arrivals at ``rate`` req/s; returns the rate actually sent in the measured window."""
        rng = np.random.default_rng(seed)
        start = time.perf_counter()
        self.window = (start + warmup, start + warmup + duration)
        due = start
        sent_in_window = 0
        while due < self.window[1]:
            due += float(rng.exponential(1.0 / rate))
            delay = due - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
            self._send(due)  # latency from the intended time: a late sender cannot hide queueing
            if self.window[0] <= due < self.window[1]:
                sent_in_window += 1
        self._drain()
        return sent_in_window / duration

    def _drain(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:
                if not self.sent:
                    return
            time.sleep(0.05)
        raise RuntimeError(f"{len(self.sent)} requests got no result within {timeout:.0f}s")

    def close(self) -> None:
        self.listener.close()


def raw_torch_rate(workload: Workload, batch_size: int, seconds: float = 1.0, device: str = "cpu",
                   repeats: int = 10, threads: int = 0) -> tuple[float, float]:
    """In-process forward loop at ``batch_size``, same threads and device as a worker: (examples/s, ms per batch).

    ``threads`` is the worker's ``AGENT_WORKERS_TORCH_THREADS`` (0: torch's default); it is set for the loop only.

    Each step is what the worker's forward does (host array in, host array out). The loop runs ``repeats`` windows
    of ``seconds / repeats`` and reports the fastest: torch's intra-op threads slow down by large factors when
    another process takes one of their cores, so on a shared machine the best window is the one that measures
    torch rather than the neighbours (and it makes ``end-to-end / raw`` conservative).
    """
    import torch

    from agent_workers.inference import resolve_device

    dev = resolve_device(device)
    module = workload.spec().build().to(dev).eval()
    x = np.random.default_rng(0).standard_normal((batch_size, workload.in_features), dtype=np.float32)

    def step() -> None:
        module(torch.from_numpy(x).to(dev)).float().cpu().numpy()

    windows = []
    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        with torch.inference_mode():
            for _ in range(3):
                step()
            for _ in range(repeats):
                iters, start = 0, time.perf_counter()
                while time.perf_counter() - start < seconds / repeats or iters < 3:
                    step()
                    iters += 1
                windows.append((time.perf_counter() - start) / iters)
    finally:
        torch.set_num_threads(before)
    per_batch = min(windows)
    return batch_size / per_batch, 1000 * per_batch


def machine_info(redis_client: Any, amqp_url: str | None) -> dict[str, Any]:
    """What the numbers were measured on."""
    import celery
    import kombu
    import torch

    info: dict[str, Any] = {"nproc": os.cpu_count(), "python": platform.python_version(),
                            "torch": torch.__version__, "torch_default_threads": torch.get_num_threads(),
                            "celery": celery.__version__, "kombu": kombu.__version__,
                            "loadavg_at_start": list(os.getloadavg())}
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text()
        info["cpu_model"] = re.search(r"model name\s*:\s*(.+)", cpuinfo).group(1).strip()  # type: ignore[union-attr]
        mem_kb = int(re.search(r"MemTotal:\s+(\d+)", Path("/proc/meminfo").read_text()).group(1))  # type: ignore[union-attr]
        info["ram_gib"] = round(mem_kb / 2**20, 1)
    except (OSError, AttributeError):
        pass
    try:
        info["redis_server"] = redis_client.info("server")["redis_version"]
    except Exception:  # noqa: BLE001
        pass
    if amqp_url:
        try:
            from kombu import Connection

            with Connection(amqp_url) as conn:
                conn.connect()
                props = conn.connection.server_properties
                info["rabbitmq"] = props.get("version")
        except Exception:  # noqa: BLE001
            pass
    return info


def ensure_celery_batches() -> str | None:
    """Import celery-batches, installing the pinned release ``--no-deps`` (it pins celery<5.7); None if it fails."""
    try:
        import celery_batches  # noqa: F401

        return None
    except ImportError:
        pass
    say(f"installing {CELERY_BATCHES_PIN} --no-deps (its celery<5.7 pin would downgrade Celery) ...")
    proc = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", CELERY_BATCHES_PIN],
                          capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        return f"pip install --no-deps {CELERY_BATCHES_PIN} failed: {proc.stderr.strip()[-300:]}"
    return None


_T0 = time.monotonic()


def say(text: str) -> None:
    """A progress line, with seconds since the benchmark started."""
    print(f"[{time.monotonic() - _T0:7.1f}s] {text}", flush=True)


# -- the benchmark ------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, kw_only=True)
class BenchConfig:
    """What to run. Sizes are per workload: ``n`` and friends for ``mlp``, ``heavy_*`` for ``heavy``.

    Attributes:
        n: requests pre-filled for our drain (mlp).
        baseline_n: requests for the naive and celery-batches drains (mlp; None: same as ``n``).
        sweep_n: requests per point of the max_batch_size sweep (mlp).
        heavy_n / heavy_small_n: our drain / the baselines and sweep points of the heavy model.
        concurrency: closed-loop producer counts.
        repeat: drains of ours per broker and workload; the median one is reported, all are kept in the JSON.
        duration: seconds measured per latency run (after a 1 s warm-up).
    """

    brokers: tuple[str, ...] = ("redis", "rabbitmq")
    workloads: tuple[str, ...] = ("mlp", "heavy")
    n: int = 20_000
    baseline_n: int | None = None
    sweep_n: int = 5_000
    heavy_n: int = 4_000
    heavy_small_n: int = 1_000
    sweep: tuple[int, ...] = DEFAULT_SWEEP
    concurrency: tuple[int, ...] = (32,)
    duration: float = 5.0
    max_batch_size: int = 64
    max_wait_ms: float = 5.0
    with_celery_batches: bool = False
    skip: frozenset[str] = frozenset()
    redis_url: str = "redis://127.0.0.1:6379/0"
    amqp_url: str = "amqp://guest:guest@127.0.0.1:5672//"
    result_backend: str = "redis://127.0.0.1:6379/1"
    params_url: str = "redis://127.0.0.1:6379/2"
    device: str = "cpu"
    torch_threads: int = 1
    out: Path = Path("docs/benchmarks")
    tag: str = ""
    profile: Path | None = None
    repeat: int = 1

    @classmethod
    def quick(cls, **overrides: Any) -> BenchConfig:
        """CI-sized: small drains, two sweep points, 2 s latency runs."""
        sizes: dict[str, Any] = {"n": 2_000, "baseline_n": 1_000, "sweep_n": 1_000, "heavy_n": 400,
                                 "heavy_small_n": 150, "sweep": (1, 64), "duration": 2.0, "tag": "-quick"}
        sizes.update(overrides)
        return cls(**sizes)

    def sizes(self, workload: str) -> tuple[int, int, int]:
        """(our drain, baseline drains, sweep point) request counts for ``workload``."""
        if workload == "heavy":
            return self.heavy_n, self.heavy_small_n, self.heavy_small_n
        return self.n, self.baseline_n or self.n, self.sweep_n

    def broker_url(self, broker: str) -> str:
        return self.redis_url if broker == "redis" else self.amqp_url


@dataclasses.dataclass
class Session:
    """One broker × workload: a namespace of our own, with the model created in it."""

    broker: str
    broker_url: str
    workload: Workload
    namespace: str
    model: str
    rows: list[list[float]]


class Bench:
    """Runs the configured matrix and collects results (see :func:`run`)."""

    def __init__(self, config: BenchConfig) -> None:
        import redis

        from agent_workers.client import producer_app

        self.cfg = config
        self.backend = redis.Redis.from_url(config.result_backend)
        self.params = redis.Redis.from_url(config.params_url)
        base = Settings(broker_url=config.redis_url, result_backend=config.result_backend)
        self.amqp = producer_app(base).amqp
        self.systems = ["ours", "naive"]
        self.notes: list[str] = []
        self.drains: list[dict[str, Any]] = []
        self.latency: list[dict[str, Any]] = []
        self.raw: dict[str, dict[str, float]] = {}
        self.raw_ms: dict[str, dict[str, float]] = {}
        self._raw_seconds = 0.5 if config.duration < 5 else 1.0

    # -- set-up ---------------------------------------------------------------------------------------------------

    def prepare(self) -> None:
        if self.cfg.with_celery_batches:
            problem = ensure_celery_batches()
            if problem is None:
                self.systems.append("celery-batches")
            else:
                self.notes.append(f"celery-batches skipped: {problem}")
        else:
            try:
                import celery_batches  # noqa: F401

                self.systems.append("celery-batches")
            except ImportError:
                self.notes.append("celery-batches not measured: not importable (pass --with-celery-batches to install "
                                  f"{CELERY_BATCHES_PIN} with --no-deps)")
        for note in self.notes:
            say(note)

    def _session(self, broker: str, workload: Workload) -> Session:
        from agent_workers.params import RedisParamStore

        namespace = "bench" + uuid.uuid4().hex[:8]
        settings = Settings(params_url=self.cfg.params_url, namespace=namespace)
        RedisParamStore.from_settings(settings).create(workload.name, workload.spec(), seed=0)
        rng = np.random.default_rng(7)
        rows = np.round(rng.standard_normal((256, workload.in_features)), workload.decimals).tolist()
        return Session(broker, self.cfg.broker_url(broker), workload, namespace, workload.name, rows)

    def _close_session(self, s: Session) -> None:
        keys = list(self.params.scan_iter(match=f"{s.namespace}:*", count=1000))
        if keys:
            self.params.delete(*keys)

    def _worker(self, s: Session, queue_name: str, max_batch_size: int, run: str) -> tuple[Any, int]:
        from agent_workers.supervisor import WorkerProcess, free_port

        port = free_port()
        env = {"AGENT_WORKERS_BROKER_URL": s.broker_url, "AGENT_WORKERS_RESULT_BACKEND": self.cfg.result_backend,
               "AGENT_WORKERS_PARAMS_URL": self.cfg.params_url, "AGENT_WORKERS_NAMESPACE": s.namespace,
               "AGENT_WORKERS_INFERENCE_QUEUE": queue_name, "AGENT_WORKERS_TRAINING_QUEUE": f"{queue_name}.training",
               "AGENT_WORKERS_DEVICE": self.cfg.device, "AGENT_WORKERS_MAX_BATCH_SIZE": str(max_batch_size),
               "AGENT_WORKERS_MAX_WAIT_MS": str(self.cfg.max_wait_ms), "AGENT_WORKERS_METRICS_PORT": str(port),
               "AGENT_WORKERS_PLUGINS": "agent_workers.bench_tasks", "AGENT_WORKERS_RESULT_EXPIRES": "3600",
               "AGENT_WORKERS_TORCH_THREADS": str(self.cfg.torch_threads)}
        return WorkerProcess(queues=[queue_name], env=env, name=f"{run}@%h", loglevel="WARNING"), port

    def _messages(self, s: Session, system: str, ids: Sequence[str]) -> Iterator[TaskMessage]:
        make = MessageFactory(self.amqp, TASK_NAMES[system], s.model, s.rows)
        return (make(task_id, i) for i, task_id in enumerate(ids))

    @staticmethod
    def _py_spy(pid: int, directory: Path, name: str) -> subprocess.Popen[bytes] | None:
        import shutil

        binary = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
        if not Path(binary).exists():
            say("py-spy not found (pip install py-spy); not profiling")
            return None
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / f"py-spy-{name}.txt"
        say(f"profiling worker {pid} into {path}")
        return subprocess.Popen([binary, "record", "-p", str(pid), "-o", str(path), "-f", "raw", "-r", "200"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def _forget(self, ids: Sequence[str]) -> None:
        for start in range(0, len(ids), 5000):
            self.backend.delete(*(RESULT_PREFIX + i for i in ids[start : start + 5000]))

    # -- drain ----------------------------------------------------------------------------------------------------

    def drain(self, s: Session, system: str, n: int, max_batch_size: int,
              profile: Path | None = None) -> dict[str, Any]:
        """Pre-fill ``n`` requests, start a worker, time it from its first stored result to its last.

        With ``profile``, py-spy samples the worker from ready to exit into ``<profile>/py-spy-*.txt`` (collapsed
        stacks, 200 Hz; py-spy pauses the worker to sample, so this drain is not counted).
        """
        label = f"{s.broker}/{s.workload.name} {system} drain (max_batch_size={max_batch_size}, n={n:,})"
        run = "b" + uuid.uuid4().hex[:10]
        queue_name = f"{s.namespace}.{run}"
        ids = [f"{run}-{i:07d}" for i in range(n)]
        paired = self._raw(s.workload, max_batch_size)[0] if system == "ours" else None
        publisher = Publisher(s.broker_url, queue_name)
        worker = None
        try:
            started = time.perf_counter()
            publisher.fill(self._messages(s, system, ids))
            say(f"{label}: filled in {time.perf_counter() - started:.1f}s, queue depth {publisher.depth():,}")
            worker, port = self._worker(s, queue_name, max_batch_size, run)
            worker.start(wait=False)
            last = [0.0]

            def progress(done: int) -> None:
                if time.monotonic() - last[0] >= 2.0 or done == n:
                    last[0] = time.monotonic()
                    say(f"{label}: {done:,}/{n:,} results stored")

            with Sampler(worker.pid, self.backend) as sampler:
                worker.wait_ready()
                spy = self._py_spy(worker.pid, profile, f"{s.broker}-{s.workload.name}-{system}") if profile else None
                wait_all_stored(self.backend, ids, on_progress=progress, alive=lambda: worker.proc.poll() is None)
                metrics = scrape_metrics(port)
            worker.stop()
            if spy is not None:
                spy.wait(60)
            times, failed = read_done_times(self.backend, ids)
        except Exception:
            if worker is not None:
                say(f"{label} failed; worker log tail:\n{worker.log()[-3000:]}")
                worker.stop()
            raise
        finally:
            self._forget(ids)
            publisher.delete()
            publisher.close()
        rate, seconds, counted = drain_rate(times)
        first, last_t = min(times), max(times)
        cpu = interpolate(sampler.worker, last_t) - interpolate(sampler.worker, first)
        def used(samples: list[tuple[float, float]]) -> float | None:
            return interpolate(samples, last_t) - interpolate(samples, first) if samples else None

        server, machine, me = used(sampler.server), used(sampler.machine), used(sampler.me)
        others = machine - cpu - (server or 0.0) - (me or 0.0) if machine is not None else None
        stats = batch_stats({}, metrics) if system == "ours" else {}
        result = {"system": system, "broker": s.broker, "workload": s.workload.name, "max_batch_size": max_batch_size,
                  "max_wait_ms": self.cfg.max_wait_ms, "n": n, "stored": len(times), "failed": failed,
                  "rate": rate, "seconds": seconds, "counted": counted,
                  "cpu_ms_per_request": 1000 * cpu / counted if counted else None,
                  "redis_cpu_ms_per_request": 1000 * server / counted if counted and server is not None else None,
                  "worker_cpu_utilisation": cpu / seconds if seconds else None,
                  "other_cpu_cores": others / seconds if others is not None and seconds else None,
                  "raw_torch_rate": paired, **stats}
        extra = f", mean batch {stats['mean_batch_size']:.1f}" if stats.get("mean_batch_size") else ""
        say(f"{label}: {rate:,.0f} req/s, worker CPU {result['cpu_ms_per_request'] or 0:.3f} ms/req{extra}"
            + (f", {failed} FAILED" if failed else ""))
        return result

    # -- latency --------------------------------------------------------------------------------------------------

    def latency_runs(self, s: Session, system: str, open_rate: float | None) -> list[dict[str, Any]]:
        """Closed-loop runs (each configured concurrency), then, for ours, open-loop runs at ``open_rate`` (half the
        drain rate) and at half the best closed-loop rate when that is clearly lower: on a small machine the
        benchmark's own producer shares the CPUs, so the end-to-end saturation is below the drain rate.
        """
        run = "l" + uuid.uuid4().hex[:10]
        queue_name = f"{s.namespace}.{run}"
        publisher = Publisher(s.broker_url, queue_name)
        worker, port = self._worker(s, queue_name, self.cfg.max_batch_size, run)
        factory = MessageFactory(self.amqp, TASK_NAMES[system], s.model, s.rows)
        counter = itertools.count()

        def make(task_id: str) -> TaskMessage:
            return factory(task_id, next(counter))

        results: list[dict[str, Any]] = []
        prefixes: list[tuple[str, int]] = []
        try:
            worker.start()
            modes: list[tuple[str, Any, str | None]] = [("closed", c, None) for c in self.cfg.concurrency]
            if open_rate:
                modes.append(("open", open_rate, "drain"))
            for index, (mode, arg, basis) in enumerate(modes):
                if mode == "open" and basis == "drain":  # closed loops are done: add the co-located basis
                    best = max((r["rate"] for r in results if r["mode"] == "closed"), default=0.0)
                    if 0 < best / 2 < 0.9 * open_rate:  # type: ignore[operator]
                        modes.append(("open", best / 2, "closed-loop max"))
                prefix = f"{run}-{index}-"
                lr = LatencyRun(publisher, make, self.cfg.result_backend, prefix)
                before = scrape_metrics(port)
                cpu_before = time.process_time()
                try:
                    if mode == "closed":
                        offered, achieved = None, lr.closed(arg, self.cfg.duration, warmup=1.0)
                    else:
                        offered, achieved = arg, lr.open(arg, self.cfg.duration, warmup=1.0)
                    sent = next(lr._counter)
                    producer_cpu = 1000 * (time.process_time() - cpu_before) / sent if sent else None
                finally:
                    lr.close()
                    prefixes.append((prefix, next(lr._counter)))  # the counter is past every id sent
                stats = batch_stats(before, scrape_metrics(port)) if system == "ours" else {}
                summary = latency_summary(lr.latencies)
                result = {"system": system, "broker": s.broker, "workload": s.workload.name, "mode": mode,
                          "concurrency": arg if mode == "closed" else None, "offered_rate": offered,
                          "open_basis": basis,
                          "rate": achieved, "failed": lr.failed, "max_batch_size": self.cfg.max_batch_size,
                          "max_wait_ms": self.cfg.max_wait_ms, "producer_cpu_ms_per_request": producer_cpu,
                          **summary, **stats, "cdf": cdf_points(lr.latencies)}
                if mode == "open" and stats.get("mean_batch_compute_ms") is not None:
                    result["bound_ms"] = latency_bound_ms(self.cfg.max_wait_ms, stats["mean_batch_compute_ms"])
                results.append(result)
                what = f"C={arg}" if mode == "closed" else f"open loop at {arg:,.0f} req/s (half the {basis} rate)"
                say(f"{s.broker}/{s.workload.name} {system} {what}: {achieved:,.0f} req/s, "
                    f"p50 {summary.get('p50_ms', 0):.1f} / p95 {summary.get('p95_ms', 0):.1f} / "
                    f"p99 {summary.get('p99_ms', 0):.1f} ms"
                    + (f" (bound {result['bound_ms']:.1f} ms)" if "bound_ms" in result else ""))
        except Exception:
            say(f"{s.broker}/{s.workload.name} {system} latency run failed; worker log tail:\n{worker.log()[-3000:]}")
            raise
        finally:
            worker.stop()
            for prefix, count in prefixes:
                self._forget([f"{prefix}{i:08d}" for i in range(count)])
            publisher.delete()
            publisher.close()
        return results

    # -- the matrix -----------------------------------------------------------------------------------------------

    def _raw(self, workload: Workload, batch_size: int) -> tuple[float, float]:
        return raw_torch_rate(workload, batch_size, self._raw_seconds, self.cfg.device,
                              threads=self.cfg.torch_threads)

    def raw_torch(self, workload: Workload) -> None:
        sizes = sorted({1, self.cfg.max_batch_size, *self.cfg.sweep})
        self.raw[workload.name], self.raw_ms[workload.name] = {}, {}
        for size in sizes:
            rate, ms = self._raw(workload, size)
            self.raw[workload.name][str(size)] = rate
            self.raw_ms[workload.name][str(size)] = ms
        say(f"{workload.name}: raw torch " + ", ".join(f"b{k}: {v:,.0f}/s" for k, v in self.raw[workload.name].items()))

    def run(self) -> dict[str, Any]:
        """Run everything configured; returns the results (also written by :func:`write_outputs`)."""
        cfg = self.cfg
        self.prepare()
        for name in cfg.workloads:
            workload = WORKLOADS[name]
            self.raw_torch(workload)
            for broker in cfg.brokers:
                s = self._session(broker, workload)
                try:
                    self._run_session(s)
                finally:
                    self._close_session(s)
        return self.results()

    def _run_session(self, s: Session) -> None:
        cfg = self.cfg
        n, baseline_n, sweep_n = cfg.sizes(s.workload.name)
        runs = sorted((self.drain(s, "ours", n, cfg.max_batch_size) for _ in range(max(1, cfg.repeat))),
                      key=lambda d: d["rate"])
        ours = runs[len(runs) // 2]  # the median run stands for ours; a shared machine makes single runs noisy
        ours["rates_all"] = [d["rate"] for d in runs]
        ours["cpu_ms_per_request_all"] = [d["cpu_ms_per_request"] for d in runs]
        self.drains.append({**ours, "role": "main"})
        self.drains.extend({**d, "role": "repeat"} for d in runs if d is not ours)
        if cfg.profile is not None:
            self.drain(s, "ours", n, cfg.max_batch_size, profile=cfg.profile)  # not counted: py-spy slows it
        if "baselines" not in cfg.skip:
            for system in self.systems[1:]:
                self.drains.append({**self.drain(s, system, baseline_n, cfg.max_batch_size), "role": "main"})
        if "sweep" not in cfg.skip:
            for size in cfg.sweep:
                if size != cfg.max_batch_size:  # that point is the main drain above
                    self.drains.append({**self.drain(s, "ours", sweep_n, size), "role": "sweep"})
        if "latency" not in cfg.skip:
            systems = self.systems if "baselines" not in cfg.skip else ["ours"]
            for system in systems:
                self.latency.extend(self.latency_runs(s, system, ours["rate"] / 2 if system == "ours" else None))

    def results(self) -> dict[str, Any]:
        main = [d for d in self.drains if d["role"] == "main"]
        opens = [r for r in self.latency if r["mode"] == "open" and "bound_ms" in r and "p99_ms" in r]
        checks = check_targets(main, self.raw, opens)
        return {"config": {k: (list(v) if isinstance(v, (tuple, frozenset)) else str(v) if isinstance(v, Path) else v)
                           for k, v in dataclasses.asdict(self.cfg).items()},
                "workloads": {k: {**WORKLOADS[k].config, "parameters": parameter_count(WORKLOADS[k])}
                              for k in self.cfg.workloads},
                "machine": machine_info(self.backend, self.cfg.amqp_url if "rabbitmq" in self.cfg.brokers else None),
                "systems": self.systems, "notes": self.notes, "drains": self.drains, "latency": self.latency,
                "raw_torch": self.raw, "raw_torch_batch_ms": self.raw_ms,
                "targets": [dataclasses.asdict(c) for c in checks]}


def parameter_count(workload: Workload) -> int:
    """Parameters of the workload's model, from its widths (no need to build 100 MB of weights)."""
    widths = [workload.config["in_features"], *workload.config["hidden"], workload.config["out_features"]]
    return sum(a * b + b for a, b in itertools.pairwise(widths))


# -- reporting ----------------------------------------------------------------------------------------------------


def report_tables(results: dict[str, Any]) -> list[tuple[str, list[str], list[list[Any]]]]:
    """The result tables as (title, headers, rows), for the console and the markdown summary."""
    main = [d for d in results["drains"] if d["role"] == "main"]
    by = {(d["system"], d["broker"], d["workload"]): d for d in main}
    drain_rows = []
    for d in main:
        naive = by.get(("naive", d["broker"], d["workload"]))
        cb = by.get(("celery-batches", d["broker"], d["workload"]))
        drain_rows.append([d["workload"], d["broker"], d["system"], d["counted"], d["rate"], d["cpu_ms_per_request"],
                           d["redis_cpu_ms_per_request"], d.get("mean_batch_size"),
                           ratio(d["rate"], naive["rate"]) if naive else None,
                           ratio(d["rate"], cb["rate"]) if cb else None, d.get("other_cpu_cores"), _spread(d)])
    raw = results["raw_torch"]
    sweep_rows = []
    for d in sorted((d for d in results["drains"] if d["system"] == "ours" and d["role"] != "repeat"),
                    key=lambda d: (d["workload"], d["broker"], d["max_batch_size"], d["role"] != "main")):
        r = d.get("raw_torch_rate") or raw.get(d["workload"], {}).get(str(d["max_batch_size"]))
        sweep_rows.append([d["workload"], d["broker"], d["max_batch_size"], d["counted"], d["rate"],
                           d["cpu_ms_per_request"], d.get("mean_batch_size"), d.get("mean_batch_compute_ms"),
                           ratio(d.get("compute_seconds"), d.get("seconds")), r, ratio(d["rate"], r)])
    latency_rows = [[r["workload"], r["broker"], r["system"],
                     f"closed C={r['concurrency']}" if r["mode"] == "closed" else _open_label(r),
                     r["rate"], r.get("p50_ms"), r.get("p95_ms"), r.get("p99_ms"), r.get("max_ms"),
                     r.get("mean_batch_size"), r.get("mean_batch_compute_ms"), r.get("bound_ms")]
                    for r in results["latency"]]
    target_rows = [[t["what"], t["target"], t["measured"],
                    "met" if t["met"] else "MISSED" if t["met"] is False else "-"] for t in results["targets"]]
    return [
        ("Drain: pre-filled queue, one worker", ["workload", "broker", "system", "requests", "req/s",
                                                 "worker CPU ms/req", "Redis CPU ms/req", "mean batch", "x naive",
                                                 "x celery-batches", "others' CPU (cores)", "runs (req/s)"],
         drain_rows),
        ("Ours by max_batch_size (drain) against raw torch at the same batch size",
         ["workload", "broker", "max batch", "requests", "req/s", "worker CPU ms/req", "mean batch",
          "ms/batch", "forward share", "raw torch req/s", "e2e / raw"], sweep_rows),
        ("Latency (ms)", ["workload", "broker", "system", "load", "req/s", "p50", "p95", "p99", "max",
                          "mean batch", "ms/batch", "p99 bound"], latency_rows),
        ("Targets (reported, not asserted)", ["what", "target", "measured", "verdict"], target_rows),
    ]


def _open_label(r: dict[str, Any]) -> str:
    basis = {"drain": " (1/2 drain)", "closed-loop max": " (1/2 closed max)"}.get(r.get("open_basis") or "", "")
    return f"open {r['offered_rate']:,.0f}/s{basis}"


def _spread(d: dict[str, Any]) -> str:
    rates = d.get("rates_all") or []
    return f"{len(rates)}: {min(rates):,.0f}–{max(rates):,.0f}" if len(rates) > 1 else "1"


def plot(results: dict[str, Any], out: Path, tag: str = "") -> list[Path]:
    """throughput-vs-batch-size and latency-cdf PNGs; returns their paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter

    plain = FuncFormatter(lambda v, _: f"{v:,.0f}" if v >= 1 else f"{v:g}")
    # minor ticks of a log axis: label only 2× and 5× a power of ten, so short ranges still read
    sparse = FuncFormatter(lambda v, _: plain(v) if v > 0 and f"{v:e}"[0] in "25" else "")
    paths = []
    workloads = list(results["workloads"])
    fig, axes = plt.subplots(1, len(workloads), figsize=(6.5 * len(workloads), 4.5), squeeze=False)
    for ax, workload in zip(axes[0], workloads, strict=True):
        ours = [d for d in results["drains"]
                if d["system"] == "ours" and d["workload"] == workload and d["role"] != "repeat"]
        for broker in sorted({d["broker"] for d in ours}):
            points = sorted({d["max_batch_size"]: d["rate"] for d in ours if d["broker"] == broker}.items())
            ax.plot([p[0] for p in points], [p[1] for p in points], "o-", label=f"ours ({broker})")
        raw = results["raw_torch"].get(workload, {})
        if raw:
            sizes = sorted(int(k) for k in raw)
            ax.plot(sizes, [raw[str(k)] for k in sizes], "k:", label="raw torch forward (in-process)")
        for d in results["drains"]:
            if d["workload"] == workload and d["system"] != "ours" and d["role"] == "main":
                ax.axhline(d["rate"], ls="--", lw=1, color="tab:red" if d["system"] == "naive" else "tab:purple",
                           alpha=0.6 if d["broker"] == "redis" else 0.35)
                ax.annotate(f"{d['system']} ({d['broker']})", (1, d["rate"]), fontsize=7, va="bottom")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.xaxis.set_major_formatter(plain)
        ax.yaxis.set_major_formatter(plain)
        ax.yaxis.set_minor_formatter(sparse)
        ax.set_xlabel("max_batch_size")
        ax.set_ylabel("requests / s (drain)")
        ax.set_title(f"{workload}: throughput vs max_batch_size")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    paths.append(out / f"throughput-vs-batch-size{tag}.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)

    panels = sorted({(r["workload"], r["broker"]) for r in results["latency"]},
                    key=lambda p: (workloads.index(p[0]) if p[0] in workloads else 99, p[1]))
    if panels:
        cols = min(2, len(panels))
        rows = math.ceil(len(panels) / cols)
        fig, axes = plt.subplots(rows, cols, figsize=(6.5 * cols, 4.2 * rows), squeeze=False)
        for ax, (workload, broker) in zip(axes.flat, panels, strict=False):
            for r in results["latency"]:
                if (r["workload"], r["broker"]) != (workload, broker) or not r.get("cdf"):
                    continue
                load = f"C={r['concurrency']}" if r["mode"] == "closed" else _open_label(r)
                ax.plot([p[0] for p in r["cdf"]], [p[1] for p in r["cdf"]], label=f"{r['system']} {load}")
                if r.get("bound_ms"):
                    first = not any(line.get_label().startswith("p99 goal") for line in ax.get_lines())
                    ax.axvline(r["bound_ms"], color="gray", ls=":", lw=1,
                               label="p99 goal at half saturation" if first else "_nolegend_")
            ax.set_xscale("log")
            ax.xaxis.set_major_formatter(plain)
            ax.xaxis.set_minor_formatter(sparse)
            ax.set_xlabel("latency (ms), send to result stored")
            ax.set_ylabel("fraction of requests")
            ax.set_title(f"{workload} on {broker}")
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=8)
        for ax in list(axes.flat)[len(panels):]:
            ax.set_visible(False)
        fig.tight_layout()
        paths.append(out / f"latency-cdf{tag}.png")
        fig.savefig(paths[-1], dpi=110)
        plt.close(fig)
    return paths


def write_outputs(results: dict[str, Any], out: Path, tag: str = "") -> list[Path]:
    """results{tag}.json, summary{tag}.md and the PNGs under ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    json_path = out / f"results{tag}.json"
    json_path.write_text(json.dumps(results, indent=1, default=str) + "\n")
    lines = []
    for title, headers, rows in report_tables(results):
        lines += [f"### {title}", "", markdown_table(headers, rows), ""]
    md_path = out / f"summary{tag}.md"
    md_path.write_text("\n".join(lines))
    return [json_path, md_path, *plot(results, out, tag)]


def run(config: BenchConfig) -> dict[str, Any]:
    """Run the benchmark, print the tables, write JSON, markdown and PNGs under ``config.out``."""
    say(f"benchmark: brokers {', '.join(config.brokers)}; workloads {', '.join(config.workloads)}; "
        f"max_batch_size {config.max_batch_size}, max_wait {config.max_wait_ms} ms; load average "
        f"{', '.join(f'{x:.2f}' for x in os.getloadavg())} on {os.cpu_count()} CPUs")
    results = Bench(config).run()
    print()
    for title, headers, rows in report_tables(results):
        print(title)
        print(format_table(headers, rows))
        print()
    for note in results["notes"]:
        print(f"note: {note}")
    for path in write_outputs(results, config.out, config.tag):
        say(f"wrote {path}")
    return results
