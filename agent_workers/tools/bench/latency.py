"""Latency runs: requests sent in a closed or an open loop, each timed from its send to its result being stored."""

from __future__ import annotations

import math
import queue
import threading
import time
from collections.abc import Callable, Sequence

import numpy as np

from agent_workers.client.results import ResultListener
from agent_workers.tools.bench.messages import Publisher
from agent_workers.tools.stats import percentile
from agent_workers.wire import TaskMessage


def cdf_points(seconds: Sequence[float], points: int = 200) -> list[tuple[float, float]]:
    """(latency ms, fraction ≤ it) at ``points`` evenly spaced fractions, for plotting a CDF from the JSON."""
    if not seconds:
        return []
    ms = sorted(s * 1000.0 for s in seconds)
    fractions = [i / (points - 1) for i in range(points)]
    return [(percentile(ms, 100.0 * f), f) for f in fractions]


def latency_bound_ms(max_wait_ms: float, batch_compute_ms: float) -> float:
    """The p99 goal at half the saturation rate: max_wait + 3 × batch compute + 10 ms."""
    return max_wait_ms + 3.0 * batch_compute_ms + 10.0


class LatencyRun:
    """Sends requests (closed or open loop) through a :class:`Publisher` and times each until its result is stored.

    Args:
        publisher: where requests go.
        make: ``make(task_id) -> TaskMessage``.
        backend_url: the Redis result backend (results are announced there by PUBLISH on their key).
        prefix: task-id prefix of this run (what the listener subscribes to).
    """

    def __init__(self, publisher: Publisher, make: Callable[[str], TaskMessage], backend_url: str, prefix: str) -> None:
        self.publisher, self.make, self.prefix = publisher, make, prefix
        self.sent: dict[str, float] = {}
        self.latencies: list[float] = []
        #: (task id, latency s, succeeded) of each request sent in the measured window, in the order answered
        self.answers: list[tuple[str, float, bool]] = []
        self.failed = 0
        self.completed_in_window = 0
        self.window: tuple[float, float] = (math.inf, math.inf)
        self._lock = threading.Lock()
        self._slots: queue.Queue[int] = queue.Queue()
        self.n_sent = 0
        self.listener = ResultListener(backend_url, self._heard, prefix=prefix)

    def _heard(self, task_id: str, record: bytes) -> None:
        self._on_result(task_id, time.perf_counter(), b'"SUCCESS"' in record[:40])

    def _on_result(self, task_id: str, now: float, ok: bool) -> None:
        with self._lock:
            t0 = self.sent.pop(task_id, None)
            if t0 is None:
                return
            if self.window[0] <= t0 < self.window[1]:
                self.latencies.append(now - t0)
                self.answers.append((task_id, now - t0, ok))
                if not ok:
                    self.failed += 1
            if self.window[0] <= now < self.window[1]:
                self.completed_in_window += 1
        self._slots.put(0)

    def _send(self, t0: float | None = None) -> None:
        task_id = f"{self.prefix}{self.n_sent:08d}"
        self.n_sent += 1
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
