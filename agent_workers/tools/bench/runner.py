"""The benchmark's matrix: per workload and broker, drains of each system and of the batch-size sweep, then the
latency runs; :func:`run` prints the tables and writes the outputs."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import numpy as np

from agent_workers.config import Settings
from agent_workers.tools.bench import cache
from agent_workers.tools.bench.config import BenchConfig
from agent_workers.tools.bench.measure import RawTorch, machine_info, raw_torch
from agent_workers.tools.bench.output import print_tables, say, write_outputs
from agent_workers.tools.bench.overload import WORKLOAD as OVERLOAD_WORKLOAD
from agent_workers.tools.bench.overload import run_overload
from agent_workers.tools.bench.runs import Runs, Session
from agent_workers.tools.bench.targets import check_cache, check_idle_latency, check_overload, check_targets
from agent_workers.tools.bench.workloads import CELERY_BATCHES_PIN, WORKLOADS, Workload, parameter_count
from agent_workers.tools.supervisor import derive_settings


def ensure_celery_batches() -> str | None:
    """Import celery-batches, installing the pinned release ``--no-deps`` (it pins celery<5.7); None if it fails."""
    try:
        import celery_batches  # noqa: F401

        return None
    except ImportError:
        pass
    say(f"installing {CELERY_BATCHES_PIN} --no-deps (its celery<5.7 pin would downgrade Celery) ...")
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", CELERY_BATCHES_PIN],
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode != 0:
        return f"pip install --no-deps {CELERY_BATCHES_PIN} failed: {proc.stderr.strip()[-300:]}"
    return None


class Bench:
    """Runs the configured matrix and collects results (see :func:`run`)."""

    def __init__(self, config: BenchConfig, settings: Settings | None = None) -> None:
        import redis

        from agent_workers.client import producer_app

        self.cfg = config
        self.backend = redis.Redis.from_url(config.result_backend)
        self.params = redis.Redis.from_url(config.params_url)
        base = Settings(broker_url=config.redis_url, result_backend=config.result_backend)
        # the workers inherit the environment's settings besides each run's own
        self.runs = Runs(config, settings or Settings.from_env(), self.backend, producer_app(base).amqp)
        self.systems = ["ours", "naive"]
        self.notes: list[str] = []
        self.drains: list[dict[str, Any]] = []
        self.latency: list[dict[str, Any]] = []
        self.raw: dict[str, dict[str, float]] = {}
        self.raw_ms: dict[str, dict[str, float]] = {}
        self.overload: list[dict[str, Any]] = []
        self.cache: list[dict[str, Any]] = []
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
                self.notes.append(
                    "celery-batches not measured: not importable (pass --with-celery-batches to install "
                    f"{CELERY_BATCHES_PIN} with --no-deps)"
                )
        for note in self.notes:
            say(note)

    def _session(self, broker: str, workload: Workload) -> Session:
        from agent_workers.store.params import RedisParamStore

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

    # -- the matrix -----------------------------------------------------------------------------------------------

    def _raw(self, workload: Workload, batch_size: int) -> RawTorch:
        return raw_torch(workload, batch_size, self._raw_seconds, self.cfg.device, threads=self.cfg.torch_threads)

    def _drain(
        self,
        s: Session,
        system: str,
        n: int,
        max_batch_size: int,
        profile: Path | None = None,
        encoding: str | None = None,
    ) -> dict[str, Any]:
        paired = self._raw(s.workload, max_batch_size) if system == "ours" else None
        encoding = encoding or self.cfg.encodings_of(s.workload.name)[0]
        return self.runs.drain(s, system, n, max_batch_size, paired=paired, profile=profile, encoding=encoding)

    def raw_torch(self, workload: Workload) -> None:
        sizes = sorted({1, self.cfg.max_batch_size, *self.cfg.sweep})
        self.raw[workload.name], self.raw_ms[workload.name] = {}, {}
        for size in sizes:
            rate, ms, _sustained = self._raw(workload, size)
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
        for broker in cfg.brokers if "overload" not in cfg.skip else ():
            self._overload(broker)
        for broker in cfg.brokers if "cache" not in cfg.skip else ():
            self._cache(broker)
        return self.results()

    def _overload(self, broker: str) -> None:
        """The ``wide`` model's drain rate (its saturation), then the overload run at a multiple of it."""
        cfg = self.cfg
        s = self._session(broker, WORKLOADS[OVERLOAD_WORKLOAD])
        try:
            saturation = self._drain(s, "ours", cfg.overload_n, cfg.max_batch_size)
            self.drains.append({**saturation, "role": "saturation"})
            self.overload.append(
                run_overload(
                    self.runs,
                    s,
                    saturation=saturation["rate"],
                    batch_ms=saturation.get("mean_batch_compute_ms") or 0.0,
                    factor=cfg.overload_factor,
                    high_share=cfg.overload_high_share,
                    duration=cfg.overload_duration,
                )
                | {"model": {**s.workload.config, "parameters": parameter_count(s.workload)}}
            )
        finally:
            self._close_session(s)

    def _cache(self, broker: str) -> None:
        """The result cache on a Zipf workload, off against on, on ``broker`` (agent_workers.tools.bench.cache)."""
        cfg = self.cfg
        settings = derive_settings(
            self.runs.settings,
            broker_url=cfg.broker_url(broker),
            result_backend=cfg.result_backend,
            params_url=cfg.params_url,
            torch_threads=cfg.torch_threads,
            device=cfg.device,
        )
        report = cache.measure(settings, n=cfg.cache_n, distinct=cfg.cache_distinct, say=say)
        self.cache.append({**report, "broker": broker})

    def _run_session(self, s: Session) -> None:
        cfg = self.cfg
        n, baseline_n, sweep_n = cfg.sizes(s.workload.name)
        encodings = cfg.encodings_of(s.workload.name)
        # alternating encodings, so that the shared machine's drifting load falls on each alike
        every = [
            (e, self._drain(s, "ours", n, cfg.max_batch_size, encoding=e))
            for _ in range(max(1, cfg.repeat))
            for e in encodings
        ]
        runs = sorted((d for e, d in every if e == encodings[0]), key=lambda d: d["rate"])
        self.drains.extend({**d, "role": "encoding"} for e, d in every if e != encodings[0])
        ours = runs[len(runs) // 2]  # the median run stands for ours; a shared machine makes single runs noisy
        ours["rates_all"] = [d["rate"] for d in runs]
        ours["cpu_ms_per_request_all"] = [d["cpu_ms_per_request"] for d in runs]
        self.drains.append({**ours, "role": "main"})
        self.drains.extend({**d, "role": "repeat"} for d in runs if d is not ours)
        if cfg.profile is not None:
            self._drain(s, "ours", n, cfg.max_batch_size, profile=cfg.profile)  # not counted: py-spy slows it
        if "baselines" not in cfg.skip:
            for system in self.systems[1:]:
                self.drains.append({**self._drain(s, system, baseline_n, cfg.max_batch_size), "role": "main"})
        if "sweep" not in cfg.skip:
            for size in cfg.sweep:
                if size != cfg.max_batch_size:  # that point is the main drain above
                    self.drains.append({**self._drain(s, "ours", sweep_n, size), "role": "sweep"})
        if "idle" not in cfg.skip:  # one request at a time: ours against a Celery no-op task on the same broker
            for system in ("ours", "noop"):
                self.latency.extend(
                    self.runs.latency_runs(s, system, None, concurrency=(1,), duration=cfg.idle_duration)
                )
        if "latency" not in cfg.skip:
            systems = self.systems if "baselines" not in cfg.skip else ["ours"]
            for system in systems:
                self.latency.extend(self.runs.latency_runs(s, system, ours["rate"] / 2 if system == "ours" else None))

    def results(self) -> dict[str, Any]:
        main = [d for d in self.drains if d["role"] == "main"]
        opens = [r for r in self.latency if r["mode"] == "open" and "bound_ms" in r and "p99_ms" in r]
        checks = (
            check_targets(main, self.raw, opens)
            + check_idle_latency(self.latency)
            + check_overload(self.overload)
            + check_cache(self.cache)
        )
        return {
            "config": self.cfg.as_json(),
            "workloads": {
                k: {**WORKLOADS[k].config, "parameters": parameter_count(WORKLOADS[k])} for k in self.cfg.workloads
            },
            "machine": machine_info(self.backend, self.cfg.amqp_url if "rabbitmq" in self.cfg.brokers else None),
            "systems": self.systems,
            "notes": self.notes,
            "drains": self.drains,
            "latency": self.latency,
            "raw_torch": self.raw,
            "raw_torch_batch_ms": self.raw_ms,
            "overload": self.overload,
            "cache": self.cache,
            "targets": [dataclasses.asdict(c) for c in checks],
        }


def run(config: BenchConfig) -> dict[str, Any]:
    """Run the benchmark, print the tables, write JSON, markdown and PNGs under ``config.out``."""
    say(
        f"benchmark: brokers {', '.join(config.brokers)}; workloads {', '.join(config.workloads)}; "
        f"max_batch_size {config.max_batch_size}, max_wait {config.max_wait_ms} ms; load average "
        f"{', '.join(f'{x:.2f}' for x in os.getloadavg())} on {os.cpu_count()} CPUs"
    )
    results = Bench(config).run()
    print_tables(results)
    for path in write_outputs(results, config.out, config.tag):
        say(f"wrote {path}")
    return results
