"""A bounded soak: sustained load with periodic SIGKILLs, then an account of every request.

``agent-workers soak`` (``make soak``) starts a ``redis-server`` of its own on a free port (broker, results and
parameters; ``--broker-url`` puts the queue on another broker, e.g. RabbitMQ), starts ``--workers`` inference
worker processes and sends ``--requests`` predictions paced evenly over ``--duration`` seconds. Every
``--kill-every`` seconds it SIGKILLs worker 0 (the *victim*) and starts a replacement at once, as systemd or
Kubernetes would; the other workers are never killed, so their memory over the whole run shows whether anything
leaks. It prints a line every ``--report-every`` seconds and, after the queue drained, the account:

* **sent**: requests published;
* **completed**: requests with a stored result; **lost** = sent - completed;
* **duplicated**: requests computed more than once (a killed worker computed and stored them but died before its
  ack, so the broker redelivered them; their results are identical and simply stored again);
* **failed** / **wrong**: results that are a failure, or whose output differs from torch run locally;
* worker **RSS** over time, and its growth between the first and the last fifth of the run.

It writes ``soak.json`` and ``soak.png`` to ``--out`` (docs/benchmarks) and exits 1 when anything was lost, failed or
wrong. ``--drain`` measures throughput instead: the workers start first, then all requests are published at once
and the run times how long the workers take to clear them (no kills); docs/scaling.md compares 1 and 2 workers.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import shutil
import statistics
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
from agent_workers.config import Settings
from agent_workers.models import make_spec
from agent_workers.params import RedisParamStore
from agent_workers.supervisor import LocalRedis, WorkerProcess

RESULT_PREFIX = "celery-task-meta-"
IN_FEATURES = 4
TICK = 0.05  # seconds between pacing steps of the producer
READY_STATES = ("SUCCESS", "FAILURE", "REVOKED")


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


def rss_mb(pid: int | None) -> float | None:
    """Resident memory of ``pid`` in MiB (from /proc), None when it is gone."""
    if pid is None:
        return None
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
    except (OSError, ValueError):
        return None
    return None


def cpu_seconds(pid: int | None) -> float:
    """User + system CPU seconds used by ``pid`` so far (0 when it is gone)."""
    if pid is None:
        return 0.0
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return 0.0


def _redis_cpu(client: redis.Redis) -> float:
    info = client.info("cpu")
    return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])


def rows_for(n: int) -> np.ndarray:
    """Deterministic inputs: row ``i`` is a function of ``i`` only."""
    i = np.arange(n, dtype=np.float64)[:, None]
    return np.hstack([np.sin(i), np.cos(i), (i % 100) / 100.0, np.ones_like(i)]).astype(np.float32)


def growth(samples: list[tuple[float, float]], skip: float = 0.1) -> dict[str, float] | None:
    """Median RSS of the first and last fifth of ``(t, rss)`` samples, after skipping the first ``skip`` of them
    (start-up: model load, first batches)."""
    if len(samples) < 10:
        return None
    body = samples[int(len(samples) * skip) :]
    fifth = max(1, len(body) // 5)
    first = statistics.median(r for _, r in body[:fifth])
    last = statistics.median(r for _, r in body[-fifth:])
    return {"first_mb": first, "last_mb": last, "growth_mb": last - first,
            "growth_pct": 100.0 * (last - first) / first if first else 0.0}


class ResultCounter:
    """Counts, per task id, how often a ready result was published (the batcher publishes each result it stores),
    so a request computed twice shows up twice. Listens on a pattern subscription in a thread."""

    def __init__(self, url: str) -> None:
        self.counts: Counter[str] = Counter()
        self._client = redis.Redis.from_url(url)
        self._pubsub = self._client.pubsub(ignore_subscribe_messages=True)
        self._pubsub.psubscribe(RESULT_PREFIX + "*")
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="soak-results", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        skip = len(RESULT_PREFIX)
        while not self._stop.is_set():
            message = self._pubsub.get_message(timeout=0.2)
            if message is None or message["type"] != "pmessage":
                continue
            data = message["data"]
            if any(f'"{s}"'.encode() in data for s in READY_STATES):
                self.counts[message["channel"][skip:].decode()] += 1

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self._pubsub.close()
        self._client.close()


class Soak:
    """One soak or drain run; :meth:`run` returns the report (also printed through ``say``)."""

    def __init__(self, config: SoakConfig, say: Callable[[str], None] = print) -> None:
        self.config = config
        self.say = say
        self.tag = uuid.uuid4().hex[:8]
        self.server: LocalRedis | None = None
        self.workers: list[WorkerProcess] = []
        self.samples: list[Sample] = []
        self.kills: list[float] = []
        self.death_ms: list[float] = []  # from SIGKILL to the process being gone (its sockets close last)
        self.ids: list[str] = []

    # -- setup ----------------------------------------------------------------------------------------------------

    def _env(self) -> dict[str, str]:
        assert self.server is not None
        own = f"redis://127.0.0.1:{self.server.port}"
        ns = f"soak{self.tag}"
        time_limit = max(1, self.config.visibility_timeout // 2)
        return {
            "AGENT_WORKERS_BROKER_URL": self.config.broker_url or f"{own}/0",
            "AGENT_WORKERS_RESULT_BACKEND": f"{own}/1",
            "AGENT_WORKERS_PARAMS_URL": f"{own}/2",
            "AGENT_WORKERS_NAMESPACE": ns,
            "AGENT_WORKERS_INFERENCE_QUEUE": f"{ns}.inference",
            "AGENT_WORKERS_TRAINING_QUEUE": f"{ns}.training",
            "AGENT_WORKERS_DEVICE": self.config.device,
            "AGENT_WORKERS_VISIBILITY_TIMEOUT": str(self.config.visibility_timeout),
            "AGENT_WORKERS_TASK_TIME_LIMIT": str(time_limit),
            "AGENT_WORKERS_MAX_BATCH_SIZE": str(self.config.max_batch_size),
            "AGENT_WORKERS_MAX_WAIT_MS": str(self.config.max_wait_ms),
            "AGENT_WORKERS_METRICS_PORT": "0",
            "AGENT_WORKERS_QUEUE_TYPE": "classic",
        }

    def _backlog(self, broker: Any) -> int:
        """Messages waiting in the broker (Redis: queued + delivered-unacknowledged; RabbitMQ: ready)."""
        try:
            if isinstance(broker, redis.Redis):
                return int(broker.llen(self.settings.inference_queue)) + int(broker.hlen("unacked"))
            return int(broker.queue_declare(self.settings.inference_queue, passive=True).message_count)
        except Exception:  # noqa: BLE001 - a sample without the backlog is still a sample
            return -1

    def _sample(self, t: float, sent: int, results: redis.Redis, broker: Any) -> Sample:
        pids = [w.proc.pid if w.proc is not None and w.proc.poll() is None else None for w in self.workers]
        sample = Sample(t=t, sent=sent, completed=int(results.dbsize()), backlog=self._backlog(broker),
                        rss_mb=[rss_mb(p) for p in pids], pids=pids)
        self.samples.append(sample)
        return sample

    def _line(self, s: Sample) -> str:
        rss = "  ".join(f"w{i} {'-' if r is None else f'{r:.0f}'}" for i, r in enumerate(s.rss_mb))
        return (f"[{s.t:6.0f}s] sent {s.sent:>7,}/{self.config.requests:,}  completed {s.completed:>7,}  "
                f"backlog {s.backlog:>6,}  kills {len(self.kills)}  RSS MiB: {rss}")

    # -- run ------------------------------------------------------------------------------------------------------

    def run(self) -> dict[str, Any]:
        cfg = self.config
        self.server = LocalRedis(args=["--save", "", "--appendonly", "no"]).start()
        env = self._env()
        self.settings = Settings.from_env(env)
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
        counter = None if cfg.drain else ResultCounter(self.settings.result_backend)
        try:
            model = "soak"
            store.create(model, make_spec("linear", in_features=IN_FEATURES), seed=7)
            self.say(f"soak {self.tag}: {cfg.workers} worker(s), broker {urlparse(self.settings.broker_url).scheme}, "
                     f"results and parameters on redis-server :{self.server.port}")
            for i in range(cfg.workers):
                self.workers.append(WorkerProcess(queues=[self.settings.inference_queue], env=env,
                                                  name=f"soak{self.tag}-w{i}@%h", loglevel="WARNING"))
            for w in self.workers:
                w.start(wait=False)
            for w in self.workers:
                w.wait_ready()
            rows = rows_for(cfg.requests)
            if cfg.drain:
                report = self._drain(client, rows, results, broker)
            else:
                report = self._soak(client, rows, results, broker, counter)
            report.update(self._account(results, store, model, rows, counter))
            report["config"] = {k: (str(v) if isinstance(v, Path) else v) for k, v in dataclasses.asdict(cfg).items()}
            self._finish(report)
            return report
        finally:
            if counter is not None:
                counter.close()
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

    def _soak(self, client: Client, rows: np.ndarray, results: redis.Redis, broker: Any,
              counter: ResultCounter | None) -> dict[str, Any]:
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
                    if (sample.sent >= cfg.requests and sample.backlog == 0
                            and t - progress[1] > 2 * cfg.visibility_timeout + 5):
                        self.say(f"{cfg.requests - sample.completed} requests have no result and the broker holds "
                                 "none of them")
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
        return {"mode": "soak", "seconds": last.t, "kills": self.kills, "death_ms": self.death_ms,
                "rate_target": rate}

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
        cpu_before = [cpu_seconds(p) for p in pids]
        redis_before = _redis_cpu(results)
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
        cpu = [cpu_seconds(p) - b for p, b in zip(pids, cpu_before, strict=True)]
        # The soak's own redis-server: broker (unless --broker-url), results and parameters. Its CPU per request
        # bounds what one Redis can carry: about 1 / (CPU seconds per request) requests/s per core.
        redis_cpu = _redis_cpu(results) - redis_before
        # Steady rate: between 10% and 90% of the requests done (start-up and tail excluded).
        lo = next((t for t, n in done if n >= 0.1 * cfg.requests), None)
        hi = next((t for t, n in done if n >= 0.9 * cfg.requests), None)
        steady = 0.8 * cfg.requests / (hi - lo) if lo is not None and hi is not None and hi > lo else None
        load = Path("/proc/loadavg").read_text().split()[:3] if Path("/proc/loadavg").exists() else []
        self.say(f"drained {done[-1][1]:,}/{cfg.requests:,} requests with {cfg.workers} worker(s) in "
                 f"{elapsed:.2f} s (published in {published:.2f} s): {done[-1][1] / elapsed:,.0f} requests/s overall"
                 + (f", {steady:,.0f} requests/s steady (10%-90%)" if steady else "")
                 + f"; worker CPU {', '.join(f'{c:.1f} s' for c in cpu)}; redis-server CPU {redis_cpu:.2f} s "
                 f"({1e6 * redis_cpu / cfg.requests:.0f} us per request); load average {' '.join(load)}")
        return {"mode": "drain", "seconds": elapsed, "publish_seconds": published,
                "rate": done[-1][1] / elapsed, "steady_rate": steady, "worker_cpu_seconds": cpu,
                "redis_cpu_seconds": redis_cpu, "loadavg": load}

    # -- accounting -----------------------------------------------------------------------------------------------

    def _account(self, results: redis.Redis, store: RedisParamStore, model: str, rows: np.ndarray,
                 counter: ResultCounter | None) -> dict[str, Any]:
        snap = store.read(model)
        params = snap.parameters()
        want = rows[: len(self.ids)] @ params["weight"].numpy().T + params["bias"].numpy()
        lost = failed = wrong = 0
        lost_rows: list[int] = []
        for lo in range(0, len(self.ids), 2000):
            chunk = self.ids[lo : lo + 2000]
            for k, raw in enumerate(results.mget([RESULT_PREFIX + i for i in chunk])):
                if raw is None:
                    lost += 1
                    lost_rows.append(lo + k)
                    continue
                meta = json.loads(raw)
                if meta["status"] != "SUCCESS":
                    failed += 1
                elif not np.allclose(meta["result"]["outputs"], want[lo + k], rtol=1e-4, atol=1e-5):
                    wrong += 1
        report: dict[str, Any] = {"sent": len(self.ids), "completed": len(self.ids) - lost, "lost": lost,
                                  "failed": failed, "wrong": wrong,
                                  "lost_examples": [{"row": r, "id": self.ids[r]} for r in lost_rows[:20]]}
        if counter is not None:
            time.sleep(0.5)  # the last pub/sub messages are in flight; they only add to the duplicate count
            counts = counter.counts
            report["duplicated"] = sum(1 for i in self.ids if counts.get(i, 0) > 1)
            report["executions"] = sum(counts.get(i, 0) for i in self.ids)
        report["rss"] = self._rss_report()
        return report

    def _rss_report(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for slot in range(len(self.workers)):
            series = [(s.t, s.rss_mb[slot]) for s in self.samples if s.rss_mb[slot] is not None]
            role = "victim" if slot == 0 and self.kills else "survivor"
            out[f"w{slot}"] = {"role": role, "growth": growth(series) if role == "survivor" else None,
                               "max_mb": max((r for _, r in series), default=None)}
        return out

    def _finish(self, report: dict[str, Any]) -> None:
        if report["mode"] == "soak":
            self.say(f"sent {report['sent']:,}  completed {report['completed']:,}  lost {report['lost']:,}  "
                     f"duplicated {report.get('duplicated', 0):,} (computed twice after a kill; same result)  "
                     f"failed {report['failed']:,}  wrong {report['wrong']:,}  kills {len(self.kills)}")
            if self.death_ms:
                self.say(f"a SIGKILLed worker took {min(self.death_ms):.0f}-{max(self.death_ms):.0f} ms to be gone "
                         "(its broker connection stays open until then)")
            for name, info in report["rss"].items():
                g = info["growth"]
                if g is not None:
                    self.say(f"{name} ({info['role']}, never killed): RSS {g['first_mb']:.0f} MiB -> "
                             f"{g['last_mb']:.0f} MiB ({g['growth_mb']:+.1f} MiB, {g['growth_pct']:+.1f}%) between "
                             "the first and the last fifth of the run")
                else:
                    self.say(f"{name} ({info['role']}): peak RSS {info['max_mb'] or 0:.0f} MiB")
        else:
            self.say(f"lost {report['lost']:,}  failed {report['failed']:,}  wrong {report['wrong']:,}")
        if self.config.out is not None and report["mode"] == "soak":
            # soak.{json,png} for the soak's own Redis broker, soak-<scheme>.* for another broker (e.g. amqp)
            stem = "soak" if self.config.broker_url is None else f"soak-{urlparse(self.config.broker_url).scheme}"
            self.config.out.mkdir(parents=True, exist_ok=True)
            report["samples"] = [dataclasses.asdict(s) for s in self.samples]
            (self.config.out / f"{stem}.json").write_text(json.dumps(report, indent=1) + "\n")
            png = plot(report, self.config.out / f"{stem}.png")
            self.say(f"wrote {self.config.out / f'{stem}.json'} and {png}")


def plot(report: dict[str, Any], path: Path) -> Path:
    """Requests over time, requests not (yet) completed against the broker's backlog, and worker RSS; kills marked.

    Returns ``path``.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    samples = report["samples"]
    t = [s["t"] for s in samples]
    fig, (top, middle, bottom) = plt.subplots(3, 1, figsize=(10, 9), sharex=True,
                                              gridspec_kw={"height_ratios": [2, 2, 2]})
    top.plot(t, [s["sent"] for s in samples], label="sent")
    top.plot(t, [s["completed"] for s in samples], label="completed", ls="--")
    top.set_ylabel("requests")
    broker = urlparse(report["config"].get("broker_url") or "redis://").scheme
    top.set_title(f"soak ({broker} broker): {report['sent']:,} sent, {report['completed']:,} completed, "
                  f"{report['lost']:,} lost, {report.get('duplicated', 0):,} computed twice, "
                  f"{len(report['kills'])} SIGKILLs")
    top.legend(loc="upper left", fontsize=8)
    middle.plot(t, [s["sent"] - s["completed"] for s in samples], label="sent - completed (in flight, or lost)")
    held = ("held by the broker (queued + unacknowledged)" if broker in ("redis", "rediss")
            else "ready in the broker (its unacknowledged deliveries are not counted)")
    middle.plot(t, [max(0, s["backlog"]) for s in samples], label=held)
    middle.set_ylabel("requests")
    middle.legend(loc="upper left", fontsize=8)
    for slot in range(len(samples[0]["rss_mb"])):
        role = report["rss"][f"w{slot}"]["role"]
        bottom.plot(t, [s["rss_mb"][slot] if s["rss_mb"][slot] is not None else math.nan for s in samples],
                    label=f"worker {slot} ({role})")
    bottom.set_ylabel("worker RSS (MiB)")
    bottom.set_xlabel("seconds")
    bottom.legend(loc="lower right", fontsize=8)
    for ax in (top, middle, bottom):
        for k in report["kills"]:
            ax.axvline(k, color="tab:red", lw=0.8, alpha=0.5)
        ax.grid(alpha=0.3)
    bottom.annotate("red lines: SIGKILL of worker 0, restarted at once", (0.01, 0.03), xycoords="axes fraction",
                    fontsize=8, color="tab:red")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def run(config: SoakConfig, say: Callable[[str], None] = print) -> dict[str, Any]:
    """Run a soak (or a drain) and return its report."""
    return Soak(config, say).run()
