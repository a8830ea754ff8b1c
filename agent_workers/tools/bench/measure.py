"""Measuring a drain: CPU sampled while it runs, the stored results' ``date_done`` times, the worker's Prometheus
counters, and the in-process torch rate it is compared with; and what machine it all ran on."""

from __future__ import annotations

import bisect
import os
import platform
import re
import threading
import time
from collections.abc import Callable, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from agent_workers.contract import RESULT_KEY_PREFIX
from agent_workers.tools.bench.workloads import Workload
from agent_workers.tools.stats import machine_cpu_seconds, process_cpu_seconds, redis_cpu_seconds

#: A drain fails when no result arrives for this long.
STALL_SECONDS = 120.0


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
            machine = machine_cpu_seconds()
            if machine is not None:
                self.machine.append((now, machine))
            try:
                self.server.append((now, redis_cpu_seconds(self.redis)))
            except Exception:  # noqa: BLE001 - Redis CPU is a nice-to-have
                pass
            if self._stop.wait(self.interval):
                return

    def used(self, series: list[tuple[float, float]], first: float, last: float) -> float | None:
        """CPU seconds ``series`` (one of the sampled lists) grew by between ``first`` and ``last``; None if empty."""
        return interpolate(series, last) - interpolate(series, first) if series else None


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
            pipe.getrange(RESULT_KEY_PREFIX + task_id, 0, 40)
            pipe.getrange(RESULT_KEY_PREFIX + task_id, -400, -1)
        replies = pipe.execute()
        for head, tail in zip(replies[0::2], replies[1::2], strict=True):
            if b'"SUCCESS"' not in head:
                failed += 1
            match = _DATE_DONE.search(tail) or _DATE_DONE.search(head + tail)
            if match:
                times.append(datetime.fromisoformat(match.group(1).decode()).timestamp())
    return times, failed


def wait_all_stored(
    client: Any,
    ids: Sequence[str],
    *,
    on_progress: Callable[[int], None],
    alive: Callable[[], bool],
    poll: float = 0.05,
) -> None:
    """Block until every result key exists; results arrive roughly in order, so check a moving window.

    Raises:
        RuntimeError: the worker died, or no result arrived for ``STALL_SECONDS``.
    """
    done = 0
    last_progress = time.monotonic()
    while done < len(ids):
        window = ids[done : done + 1000]
        found = int(client.exists(*(RESULT_KEY_PREFIX + i for i in window)))
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
    return {
        "batches": batches or None,
        "mean_batch_size": delta("agent_workers_batch_size_sum") / batches if batches else None,
        "mean_batch_compute_ms": 1000 * delta("agent_workers_compute_seconds_sum") / batches if batches else None,
        "compute_seconds": delta("agent_workers_compute_seconds_sum") if batches else None,
    }


class RawTorch(NamedTuple):
    """The in-process forward loop's rates: ``rate`` (examples/s) and ``ms`` (per batch) of its fastest window,
    and ``sustained_rate``, all its iterations over all its time."""

    rate: float
    ms: float
    sustained_rate: float


def raw_torch_rate(
    workload: Workload, batch_size: int, seconds: float = 1.0, device: str = "cpu", repeats: int = 10, threads: int = 0
) -> tuple[float, float]:
    """:func:`raw_torch`'s fastest window: (examples/s, ms per batch)."""
    raw = raw_torch(workload, batch_size, seconds, device, repeats, threads)
    return raw.rate, raw.ms


def raw_torch(
    workload: Workload, batch_size: int, seconds: float = 1.0, device: str = "cpu", repeats: int = 10, threads: int = 0
) -> RawTorch:
    """In-process forward loop at ``batch_size``, same threads and device as a worker.

    ``threads`` is the worker's ``AGENT_WORKERS_TORCH_THREADS`` (0: torch's default); it is set for the loop only.

    Each step is what the worker's forward does (host array in, host array out). The loop runs ``repeats`` windows
    of ``seconds / repeats``. The fastest window is the yardstick of ``end-to-end / raw``: torch's intra-op threads
    slow down by large factors when another process takes one of their cores, so on a shared machine the best
    window is the one that measures torch rather than the neighbours (and it makes the ratio conservative). The
    sustained rate (every iteration over the whole loop) is what a loop of forward passes keeps up, alone, for
    as long as a drain: 3–6 % below the best window on a quiet machine.
    """
    import torch

    from agent_workers.worker.inference import resolve_device

    dev = resolve_device(device)
    module = workload.spec().build().to(dev).eval()
    x = np.random.default_rng(0).standard_normal((batch_size, workload.in_features), dtype=np.float32)

    def step() -> None:
        module(torch.from_numpy(x).to(dev)).float().cpu().numpy()

    windows = []
    total_iters, total_seconds = 0, 0.0
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
                elapsed = time.perf_counter() - start
                windows.append(elapsed / iters)
                total_iters, total_seconds = total_iters + iters, total_seconds + elapsed
    finally:
        torch.set_num_threads(before)
    per_batch = min(windows)
    return RawTorch(batch_size / per_batch, 1000 * per_batch, batch_size * total_iters / total_seconds)


def machine_info(redis_client: Any, amqp_url: str | None) -> dict[str, Any]:
    """What the numbers were measured on."""
    import celery
    import kombu
    import torch

    info: dict[str, Any] = {
        "nproc": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_default_threads": torch.get_num_threads(),
        "celery": celery.__version__,
        "kombu": kombu.__version__,
        "loadavg_at_start": list(os.getloadavg()),
    }
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
