"""The soak's run: its own redis-server and workers, the paced producer, the killer, and the drain mode."""

from __future__ import annotations

import dataclasses
import random
import shutil
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import numpy as np
import redis

from agent_workers.client import Client
from agent_workers.client.results import ResultListener, is_final
from agent_workers.config import Settings
from agent_workers.models import make_spec
from agent_workers.store.params import RedisParamStore
from agent_workers.tools.broker import backlog
from agent_workers.tools.soak.account import account, rss_report, summarize, write
from agent_workers.tools.stats import process_cpu_seconds, redis_cpu_seconds, rss_mb
from agent_workers.tools.supervisor import LocalRedis, WorkerProcess, derive_settings

TICK = 0.05  # seconds between pacing steps of the producer
IN_FEATURES = 4


def rows_for(n: int) -> np.ndarray:
    """Deterministic inputs: row ``i`` is a function of ``i`` only."""
    i = np.arange(n, dtype=np.float64)[:, None]
    return np.hstack([np.sin(i), np.cos(i), (i % 100) / 100.0, np.ones_like(i)]).astype(np.float32)


@dataclasses.dataclass(frozen=True, kw_only=True)
class SoakConfig:
    """What to run.

    Attributes:
        requests: predictions to send.
        duration: seconds to spread them over (soak); ignored by ``drain``.
        kill_every: seconds between SIGKILLs of the victim worker; 0 = never.
        workers: inference worker processes.
        drain: measure throughput (publish everything at once, time the drain) instead of soaking.
        broker_url: broker of the queue; None = the soak's own Redis.
        visibility_timeout: seconds before a Redis broker redelivers a killed worker's messages.
        max_batch_size / max_wait_ms: the workers' batching policy.
        report_every: seconds between progress lines.
        drain_timeout: seconds allowed, after the last send, for every result to arrive.
        out: where soak.json and soak.png go; None = nowhere.
        device: the workers' ``AGENT_WORKERS_DEVICE``.
        kill_after_push: kill right after the producer pushed a bulk, the worst moment for a Redis broker: the
            worker's blocking pop may already have taken the messages, not yet recorded as unacknowledged. By
            default kills come on their own clock, at any phase of the producer's pushes.
    """

    requests: int = 100_000
    duration: float = 300.0
    kill_every: float = 30.0
    workers: int = 2
    drain: bool = False
    broker_url: str | None = None
    visibility_timeout: int = 10
    max_batch_size: int = 64
    max_wait_ms: float = 5.0
    report_every: float = 10.0
    drain_timeout: float = 120.0
    out: Path | None = Path("docs/benchmarks")
    device: str = "cpu"
    kill_after_push: bool = False


@dataclasses.dataclass
class Sample:
    """One observation of the run."""

    t: float
    sent: int
    completed: int
    backlog: int
    rss_mb: list[float | None]
    pids: list[int | None]


class Soak:
    """One soak or drain run; :meth:`run` returns the report (also printed through ``say``)."""

    def __init__(
        self, config: SoakConfig, say: Callable[[str], None] = print, settings: Settings | None = None
    ) -> None:
        self.config = config
        self.base = settings or Settings.from_env()  # what the workers inherit besides the soak's own settings
        self.say = say
        self.tag = uuid.uuid4().hex[:8]
        self.server: LocalRedis | None = None
        self.workers: list[WorkerProcess] = []
        self.samples: list[Sample] = []
        self.kills: list[float] = []
        self.death_ms: list[float] = []  # from SIGKILL to the process being gone (its sockets close last)
        self.ids: list[str] = []

    # -- setup ----------------------------------------------------------------------------------------------------

    def _settings(self) -> Settings:
        """The workers' (and this process's) settings: the environment's, on the soak's own Redis and queues."""
        assert self.server is not None
        cfg = self.config
        own = f"redis://127.0.0.1:{self.server.port}"
        ns = f"soak{self.tag}"
        return derive_settings(
            self.base,
            broker_url=cfg.broker_url or f"{own}/0",
            result_backend=f"{own}/1",
            params_url=f"{own}/2",
            namespace=ns,
            inference_queue=f"{ns}.inference",
            training_queue=f"{ns}.training",
            device=cfg.device,
            visibility_timeout=cfg.visibility_timeout,
            task_time_limit=max(1, cfg.visibility_timeout // 2),
            metrics_port=0,
            queue_type="classic",
            batch={"max_batch_size": cfg.max_batch_size, "max_wait_ms": cfg.max_wait_ms},
        )

    def _backlog(self, broker: Any) -> int:
        """Messages waiting in the broker (Redis: queued + delivered-unacknowledged; RabbitMQ: ready)."""
        try:
            return backlog(broker, self.settings.inference_queue)
        except Exception:  # noqa: BLE001 - a sample without the backlog is still a sample
            return -1

    def _sample(self, t: float, sent: int, results: redis.Redis, broker: Any) -> Sample:
        pids = [w.proc.pid if w.proc is not None and w.proc.poll() is None else None for w in self.workers]
        sample = Sample(
            t=t,
            sent=sent,
            completed=int(results.dbsize()),
            backlog=self._backlog(broker),
            rss_mb=[rss_mb(p) for p in pids],
            pids=pids,
        )
        self.samples.append(sample)
        return sample

    def _line(self, s: Sample) -> str:
        rss = "  ".join(f"w{i} {'-' if r is None else f'{r:.0f}'}" for i, r in enumerate(s.rss_mb))
        return (
            f"[{s.t:6.0f}s] sent {s.sent:>7,}/{self.config.requests:,}  completed {s.completed:>7,}  "
            f"backlog {s.backlog:>6,}  kills {len(self.kills)}  RSS MiB: {rss}"
        )

    # -- run ------------------------------------------------------------------------------------------------------

    def run(self) -> dict[str, Any]:
        cfg = self.config
        self.server = LocalRedis(args=["--save", "", "--appendonly", "no"]).start()
        self.settings = self._settings()
        env = self.settings.to_env()
        results = redis.Redis.from_url(self.settings.result_backend)
        broker_conn = None
        if self.settings.broker_is_redis:
            broker: Any = redis.Redis.from_url(self.settings.broker_url)
        else:
            from kombu import Connection

            broker_conn = Connection(self.settings.broker_url)
            broker = broker_conn.default_channel
        client = Client(self.settings)
        store = RedisParamStore.from_settings(self.settings)
        counts: Counter[str] | None = None if cfg.drain else Counter()
        listener = None if counts is None else ResultListener(self.settings.result_backend, _counter(counts))
        try:
            model = "soak"
            store.create(model, make_spec("linear", in_features=IN_FEATURES), seed=7)
            self.say(
                f"soak {self.tag}: {cfg.workers} worker(s), broker {urlparse(self.settings.broker_url).scheme}, "
                f"results and parameters on redis-server :{self.server.port}"
            )
            for i in range(cfg.workers):
                self.workers.append(
                    WorkerProcess(
                        queues=[self.settings.inference_queue],
                        env=env,
                        name=f"soak{self.tag}-w{i}@%h",
                        loglevel="WARNING",
                    )
                )
            for w in self.workers:
                w.start(wait=False)
            for w in self.workers:
                w.wait_ready()
            rows = rows_for(cfg.requests)
            if cfg.drain:
                report = self._drain(client, rows, results, broker)
            else:
                report = self._soak(client, rows, results, broker)
            report.update(account(results, store, model, rows, self.ids, counts))
            report["rss"] = rss_report(
                [
                    [(s.t, s.rss_mb[slot]) for s in self.samples if s.rss_mb[slot] is not None]
                    for slot in range(len(self.workers))
                ],
                killed=bool(self.kills),
            )
            report["config"] = {k: (str(v) if isinstance(v, Path) else v) for k, v in dataclasses.asdict(cfg).items()}
            summarize(report, kills=len(self.kills), death_ms=self.death_ms, say=self.say)
            if cfg.out is not None and report["mode"] == "soak":
                write(report, self.samples, cfg.out, cfg.broker_url, self.say)
            return report
        finally:
            if listener is not None:
                listener.close()
            for w in self.workers:
                w.stop(timeout=20)
            client.close()
            if broker_conn is not None:
                try:
                    broker.queue_delete(self.settings.inference_queue)
                    broker.queue_delete(self.settings.training_queue)
                finally:
                    broker_conn.close()
            self.server.stop()
            shutil.rmtree(self.server.dir, ignore_errors=True)

    def _soak(self, client: Client, rows: np.ndarray, results: redis.Redis, broker: Any) -> dict[str, Any]:
        cfg = self.config
        rate = cfg.requests / cfg.duration
        start = time.monotonic()
        loading = threading.Event()
        loading.set()
        pushed = threading.Event()
        killer = threading.Thread(target=self._killer, args=(start, loading, pushed), name="soak-killer", daemon=True)
        if cfg.kill_every > 0:
            killer.start()
        next_report = cfg.report_every
        next_sample = 0.0
        progress = (0, 0.0)  # (completed, when it last grew)
        try:
            while True:
                t = time.monotonic() - start
                sent = len(self.ids)
                target = min(cfg.requests, int(rate * t) + 1)
                if target > sent:
                    self.ids.extend(client.send_predict_bulk("soak", rows[sent:target]))
                    pushed.set()
                if len(self.ids) >= cfg.requests:
                    loading.clear()  # no kills while the last requests drain
                if t >= next_sample:
                    sample = self._sample(t, len(self.ids), results, broker)
                    next_sample += 1.0
                    if t >= next_report:
                        self.say(self._line(sample))
                        next_report += cfg.report_every
                    if sample.completed > progress[0]:
                        progress = (sample.completed, t)
                    if sample.sent >= cfg.requests and sample.completed >= cfg.requests:
                        break
                    # Nothing queued or unacknowledged, and nothing completed for longer than a redelivery takes:
                    # what is missing now is nowhere.
                    if (
                        sample.sent >= cfg.requests
                        and sample.backlog == 0
                        and t - progress[1] > 2 * cfg.visibility_timeout + 5
                    ):
                        self.say(
                            f"{cfg.requests - sample.completed} requests have no result and the broker holds "
                            "none of them"
                        )
                        break
                    if sample.sent >= cfg.requests and t > cfg.duration + cfg.drain_timeout:
                        self.say(f"drain timeout: {cfg.requests - sample.completed} requests have no result")
                        break
                time.sleep(TICK)  # the producer's pace, not a synchronisation
        finally:
            loading.clear()
            if killer.is_alive():
                killer.join(30)
        last = self._sample(time.monotonic() - start, len(self.ids), results, broker)
        self.say(self._line(last))
        return {"mode": "soak", "seconds": last.t, "kills": self.kills, "death_ms": self.death_ms, "rate_target": rate}

    def _killer(self, start: float, loading: threading.Event, pushed: threading.Event) -> None:
        """Every ``kill_every`` seconds while the load runs: SIGKILL worker 0 and start its replacement."""
        cfg = self.config
        victim = self.workers[0]
        rng = random.Random(0)
        # Each kill at a random phase of the producer's pushes (TICK apart), unless asked for the worst one.
        kills = 1
        next_kill = start + cfg.kill_every + rng.uniform(0, TICK)
        while loading.is_set():
            wait = next_kill - time.monotonic()
            if wait > 0:
                time.sleep(min(wait, 0.1))
                continue
            if cfg.kill_after_push:
                pushed.clear()
                pushed.wait(5)
            if not loading.is_set():
                return
            killed = time.monotonic()
            self.kills.append(killed - start)
            victim.kill()
            assert victim.proc is not None
            victim.proc.wait(10)
            self.death_ms.append(1000 * (time.monotonic() - killed))
            victim.start(wait=False)  # the replacement, as systemd or Kubernetes would start it
            kills += 1
            next_kill = start + kills * cfg.kill_every + rng.uniform(0, TICK)

    def _drain(self, client: Client, rows: np.ndarray, results: redis.Redis, broker: Any) -> dict[str, Any]:
        cfg = self.config
        pids = [w.proc.pid for w in self.workers if w.proc is not None]
        cpu_before = [process_cpu_seconds(p) for p in pids]
        redis_before = redis_cpu_seconds(results)
        start = time.monotonic()
        for lo in range(0, cfg.requests, 10_000):
            self.ids.extend(client.send_predict_bulk("soak", rows[lo : lo + 10_000]))
        published = time.monotonic() - start
        done: list[tuple[float, int]] = []
        deadline = start + cfg.drain_timeout
        while time.monotonic() < deadline:
            n = int(results.dbsize())
            done.append((time.monotonic() - start, n))
            if n >= cfg.requests:
                break
            time.sleep(0.02)
        elapsed = done[-1][0]
        cpu = [process_cpu_seconds(p) - b for p, b in zip(pids, cpu_before, strict=True)]
        # The soak's own redis-server: broker (unless --broker-url), results and parameters. Its CPU per request
        # bounds what one Redis can carry: about 1 / (CPU seconds per request) requests/s per core.
        redis_cpu = redis_cpu_seconds(results) - redis_before
        # Steady rate: between 10% and 90% of the requests done (start-up and tail excluded).
        lo = next((t for t, n in done if n >= 0.1 * cfg.requests), None)
        hi = next((t for t, n in done if n >= 0.9 * cfg.requests), None)
        steady = 0.8 * cfg.requests / (hi - lo) if lo is not None and hi is not None and hi > lo else None
        load = Path("/proc/loadavg").read_text().split()[:3] if Path("/proc/loadavg").exists() else []
        self.say(
            f"drained {done[-1][1]:,}/{cfg.requests:,} requests with {cfg.workers} worker(s) in "
            f"{elapsed:.2f} s (published in {published:.2f} s): {done[-1][1] / elapsed:,.0f} requests/s overall"
            + (f", {steady:,.0f} requests/s steady (10%-90%)" if steady else "")
            + f"; worker CPU {', '.join(f'{c:.1f} s' for c in cpu)}; redis-server CPU {redis_cpu:.2f} s "
            f"({1e6 * redis_cpu / cfg.requests:.0f} us per request); load average {' '.join(load)}"
        )
        return {
            "mode": "drain",
            "seconds": elapsed,
            "publish_seconds": published,
            "rate": done[-1][1] / elapsed,
            "steady_rate": steady,
            "worker_cpu_seconds": cpu,
            "redis_cpu_seconds": redis_cpu,
            "loadavg": load,
        }


def _counter(counts: Counter[str]) -> Callable[[str, bytes], None]:
    """A result listener's callback counting, per task id, the final results published (the batcher publishes
    each result it stores), so a request computed twice shows up twice."""

    def count(task_id: str, record: bytes) -> None:
        if is_final(record):
            counts[task_id] += 1

    return count


def run(config: SoakConfig, say: Callable[[str], None] = print) -> dict[str, Any]:
    """Run a soak (or a drain) and return its report."""
    return Soak(config, say).run()
