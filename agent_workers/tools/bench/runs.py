"""One system's runs in one session (a broker and a workload): the drain of a pre-filled queue, and the closed-
and open-loop latency runs, each against a worker process of its own."""

from __future__ import annotations

import dataclasses
import itertools
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from agent_workers.config import Settings
from agent_workers.contract import RESULT_KEY_PREFIX
from agent_workers.tools.bench.config import BenchConfig
from agent_workers.tools.bench.latency import LatencyRun, cdf_points, latency_bound_ms
from agent_workers.tools.bench.measure import (
    RawTorch,
    Sampler,
    batch_stats,
    drain_rate,
    interpolate,
    read_done_times,
    scrape_metrics,
    wait_all_stored,
)
from agent_workers.tools.bench.messages import MessageFactory, ProducerFactory, Publisher
from agent_workers.tools.bench.output import say
from agent_workers.tools.bench.workloads import BASELINES_PLUGIN, TASK_NAMES, Workload
from agent_workers.tools.stats import latency_summary
from agent_workers.tools.supervisor import WorkerProcess, derive_settings, free_port
from agent_workers.wire import TaskMessage


@dataclasses.dataclass
class Session:
    """One broker × workload: a namespace of our own, with the model created in it."""

    broker: str
    broker_url: str
    workload: Workload
    namespace: str
    model: str
    rows: list[list[float]]


def py_spy(pid: int, directory: Path, name: str) -> subprocess.Popen[bytes] | None:
    """Start py-spy sampling ``pid`` into ``<directory>/py-spy-<name>.txt``; None when py-spy is not installed."""
    import shutil

    binary = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    if not Path(binary).exists():
        say("py-spy not found (pip install py-spy); not profiling")
        return None
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"py-spy-{name}.txt"
    say(f"profiling worker {pid} into {path}")
    return subprocess.Popen(
        [binary, "record", "-p", str(pid), "-o", str(path), "-f", "raw", "-r", "200"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


class Runs:
    """Drains and latency runs against worker processes started for each.

    Args:
        config: the benchmark's configuration.
        settings: what the workers inherit besides each run's own settings (the environment's).
        backend: a client of the Redis result backend.
        amqp: a producer app's ``amqp`` (builds the messages).
    """

    def __init__(self, config: BenchConfig, settings: Settings, backend: Any, amqp: Any) -> None:
        self.cfg = config
        self.settings = settings
        self.backend = backend
        self.amqp = amqp

    def worker(
        self, s: Session, queue_name: str, max_batch_size: int, run: str, **changes: Any
    ) -> tuple[WorkerProcess, int]:
        """A worker process (not started) serving ``queue_name`` for session ``s``, and its metrics port; ``changes``
        are further settings (the overload run's ``queue_max_priority``)."""
        port = free_port()
        settings = derive_settings(
            self.settings,
            broker_url=s.broker_url,
            result_backend=self.cfg.result_backend,
            params_url=self.cfg.params_url,
            namespace=s.namespace,
            inference_queue=queue_name,
            training_queue=f"{queue_name}.training",
            device=self.cfg.device,
            metrics_port=port,
            plugins=(BASELINES_PLUGIN,),
            result_expires=3600,
            torch_threads=self.cfg.torch_threads,
            batch={"max_batch_size": max_batch_size, "max_wait_ms": self.cfg.max_wait_ms},
            **changes,
        )
        return WorkerProcess(queues=[queue_name], env=settings.to_env(), name=f"{run}@%h", loglevel="WARNING"), port

    def _factory(self, s: Session, system: str, encoding: str) -> MessageFactory | ProducerFactory:
        if self.cfg.fill == "fast":
            return MessageFactory(self.amqp, TASK_NAMES[system], s.model, s.rows)
        # the baselines take JSON lists only
        encoding = encoding if system == "ours" else "json"
        return ProducerFactory(self.amqp, TASK_NAMES[system], s.model, s.workload.in_features, encoding=encoding)

    def _messages(self, s: Session, system: str, ids: Sequence[str], encoding: str) -> Iterator[TaskMessage]:
        make = self._factory(s, system, encoding)
        return (make(task_id, i) for i, task_id in enumerate(ids))

    def forget(self, ids: Sequence[str]) -> None:
        """Delete the result records of ``ids``."""
        for start in range(0, len(ids), 5000):
            self.backend.delete(*(RESULT_KEY_PREFIX + i for i in ids[start : start + 5000]))

    # -- drain ----------------------------------------------------------------------------------------------------

    def drain(
        self,
        s: Session,
        system: str,
        n: int,
        max_batch_size: int,
        *,
        paired: RawTorch | None = None,
        profile: Path | None = None,
        encoding: str = "json",
    ) -> dict[str, Any]:
        """Pre-fill ``n`` requests, start a worker, time it from its first stored result to its last.

        ``paired`` is the raw torch loop at ``max_batch_size`` measured just before (its fastest window's rate and
        its sustained rate are kept in the result).
        ``encoding`` is how our requests travel (``json``, ``b64``, ``msgpack``; the baselines' always JSON). With
        ``profile``, py-spy samples the worker from ready to exit into ``<profile>/py-spy-*.txt`` (collapsed
        stacks, 200 Hz; py-spy pauses the worker to sample, so this drain is not counted).
        """
        sent = encoding if system == "ours" and self.cfg.fill == "producer" else "json"
        label = f"{s.broker}/{s.workload.name} {system} drain ({sent}, max_batch_size={max_batch_size}, n={n:,})"
        run = "b" + uuid.uuid4().hex[:10]
        queue_name = f"{s.namespace}.{run}"
        ids = [f"{run}-{i:07d}" for i in range(n)]
        publisher = Publisher(s.broker_url, queue_name)
        worker = None
        try:
            started = time.perf_counter()
            publisher.fill(self._messages(s, system, ids, sent))
            say(f"{label}: filled in {time.perf_counter() - started:.1f}s, queue depth {publisher.depth():,}")
            worker, port = self.worker(s, queue_name, max_batch_size, run)
            worker.start(wait=False)
            last = [0.0]

            def progress(done: int) -> None:
                if time.monotonic() - last[0] >= 2.0 or done == n:
                    last[0] = time.monotonic()
                    say(f"{label}: {done:,}/{n:,} results stored")

            with Sampler(worker.pid, self.backend) as sampler:
                worker.wait_ready()
                spy = py_spy(worker.pid, profile, f"{s.broker}-{s.workload.name}-{system}") if profile else None
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
            self.forget(ids)
            publisher.delete()
            publisher.close()
        rate, seconds, counted = drain_rate(times)
        first, last_t = min(times), max(times)
        cpu = interpolate(sampler.worker, last_t) - interpolate(sampler.worker, first)
        server, machine, me = (sampler.used(x, first, last_t) for x in (sampler.server, sampler.machine, sampler.me))
        others = machine - cpu - (server or 0.0) - (me or 0.0) if machine is not None else None
        stats = batch_stats({}, metrics) if system == "ours" else {}
        result = {
            "system": system,
            "broker": s.broker,
            "workload": s.workload.name,
            "encoding": sent,
            "max_batch_size": max_batch_size,
            "max_wait_ms": self.cfg.max_wait_ms,
            "n": n,
            "stored": len(times),
            "failed": failed,
            "rate": rate,
            "seconds": seconds,
            "counted": counted,
            "cpu_ms_per_request": 1000 * cpu / counted if counted else None,
            "redis_cpu_ms_per_request": 1000 * server / counted if counted and server is not None else None,
            "worker_cpu_utilisation": cpu / seconds if seconds else None,
            "other_cpu_cores": others / seconds if others is not None and seconds else None,
            "raw_torch_rate": paired.rate if paired else None,
            "raw_torch_sustained_rate": paired.sustained_rate if paired else None,
            **stats,
        }
        extra = f", mean batch {stats['mean_batch_size']:.1f}" if stats.get("mean_batch_size") else ""
        extra += (
            f", {rate / paired.rate:.0%} of raw torch ({rate / paired.sustained_rate:.0%} sustained)" if paired else ""
        )
        say(
            f"{label}: {rate:,.0f} req/s, worker CPU {result['cpu_ms_per_request'] or 0:.3f} ms/req{extra}"
            + (f", {failed} FAILED" if failed else "")
        )
        return result

    # -- latency --------------------------------------------------------------------------------------------------

    def latency_runs(
        self,
        s: Session,
        system: str,
        open_rate: float | None,
        concurrency: Sequence[int] | None = None,
        duration: float | None = None,
    ) -> list[dict[str, Any]]:
        """Closed-loop runs (each configured concurrency), then, for ours, open-loop runs at ``open_rate`` (half the
        drain rate) and at half the best closed-loop rate when that is clearly lower: on a small machine the
        benchmark's own producer shares the CPUs, so the end-to-end saturation is below the drain rate.
        ``concurrency`` and ``duration`` override the configured ones (the C=1 comparison with the no-op task).
        """
        duration = self.cfg.duration if duration is None else duration
        run = "l" + uuid.uuid4().hex[:10]
        queue_name = f"{s.namespace}.{run}"
        publisher = Publisher(s.broker_url, queue_name)
        worker, port = self.worker(s, queue_name, self.cfg.max_batch_size, run)
        factory = self._factory(s, system, self.cfg.encodings_of(s.workload.name)[0])
        counter = itertools.count()

        def make(task_id: str) -> TaskMessage:
            return factory(task_id, next(counter))

        results: list[dict[str, Any]] = []
        prefixes: list[tuple[str, int]] = []
        try:
            worker.start()
            modes: list[tuple[str, Any, str | None]] = [
                ("closed", c, None) for c in concurrency or self.cfg.concurrency
            ]
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
                        offered, achieved = None, lr.closed(arg, duration, warmup=1.0)
                    else:
                        offered, achieved = arg, lr.open(arg, duration, warmup=1.0)
                    sent = lr.n_sent
                    producer_cpu = 1000 * (time.process_time() - cpu_before) / sent if sent else None
                finally:
                    lr.close()
                    prefixes.append((prefix, lr.n_sent))
                stats = batch_stats(before, scrape_metrics(port)) if system == "ours" else {}
                summary = latency_summary(lr.latencies)
                result = {
                    "system": system,
                    "broker": s.broker,
                    "workload": s.workload.name,
                    "mode": mode,
                    "concurrency": arg if mode == "closed" else None,
                    "offered_rate": offered,
                    "open_basis": basis,
                    "rate": achieved,
                    "failed": lr.failed,
                    "max_batch_size": self.cfg.max_batch_size,
                    "max_wait_ms": self.cfg.max_wait_ms,
                    "producer_cpu_ms_per_request": producer_cpu,
                    **summary,
                    **stats,
                    "cdf": cdf_points(lr.latencies),
                }
                if mode == "open" and stats.get("mean_batch_compute_ms") is not None:
                    result["bound_ms"] = latency_bound_ms(self.cfg.max_wait_ms, stats["mean_batch_compute_ms"])
                results.append(result)
                what = f"C={arg}" if mode == "closed" else f"open loop at {arg:,.0f} req/s (half the {basis} rate)"
                say(
                    f"{s.broker}/{s.workload.name} {system} {what}: {achieved:,.0f} req/s, "
                    f"p50 {summary.get('p50_ms', 0):.1f} / p95 {summary.get('p95_ms', 0):.1f} / "
                    f"p99 {summary.get('p99_ms', 0):.1f} ms"
                    + (f" (bound {result['bound_ms']:.1f} ms)" if "bound_ms" in result else "")
                )
        except Exception:
            say(f"{s.broker}/{s.workload.name} {system} latency run failed; worker log tail:\n{worker.log()[-3000:]}")
            raise
        finally:
            worker.stop()
            for prefix, count in prefixes:
                self.forget([f"{prefix}{i:08d}" for i in range(count)])
            publisher.delete()
            publisher.close()
        return results
