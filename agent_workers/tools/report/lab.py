"""The report's laboratory: what each part runs (the plan and its goals), a private namespace with worker processes
started on demand, and the cost of a set of queued training steps."""

from __future__ import annotations

import dataclasses
import math
import os
import time
import uuid
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from agent_workers.client import Client
from agent_workers.config import Settings
from agent_workers.keys import Keys
from agent_workers.store.params import RedisParamStore
from agent_workers.tools.stats import percentile
from agent_workers.tools.supervisor import WorkerProcess, derive_settings
from agent_workers.training.datasets import DatasetStore

Progress = Callable[[str], None]

MSE_GOAL = 1.02
ACCURACY_GOAL = 0.96
ACCURACY_GAP_GOAL = 0.01

LINEAR_HP = {"loss": "mse", "optimizer": "sgd", "lr": 0.05}
DIGITS_HP = {"loss": "cross_entropy", "optimizer": "adam", "lr": 0.005}
DIGITS_HIDDEN = [128]
DIGITS_BATCH = 32

#: The two queue paths of train_step the report compares: one pool task and one commit per step
#: (``AGENT_WORKERS_TRAIN_GROUP=1``), and group commits of up to ``AGENT_WORKERS_TRAIN_GROUP`` queued steps.
PATHS = ("per-step", "grouped")
#: The queued part's yardstick: the grouped path as it was before adaptive group sizes and turns (a fixed k, every
#: trainer walking at once), run beside today's in the same sitting.
FIXED_PATH = "grouped-fixed"


@dataclasses.dataclass(frozen=True)
class Plan:
    """How much work each part does (``quick`` shrinks everything for a smoke run)."""

    linear_trainers: tuple[int, ...] = (1, 2, 4)
    linear_epochs: int = 10
    digits_trainers: int = 4
    digits_epochs: int = 20
    commit_trainers: tuple[int, ...] = (1, 2, 4, 8)
    commit_steps: int = 400
    #: (train_step path, commit mode) pairs of the coordination part.
    commit_runs: tuple[tuple[str, str], ...] = (
        ("per-step", "optimistic"),
        ("grouped", "optimistic"),
        ("per-step", "lock"),
        ("grouped", "lock"),
    )
    linear_paths: tuple[str, ...] = PATHS
    #: The hard case (report/queued.py): every step queued before the workers start.
    queued_optimizers: tuple[str, ...] = ("sgd", "adam")
    queued_runs: tuple[tuple[str, str], ...] = (
        ("per-step", "optimistic"),
        (FIXED_PATH, "optimistic"),
        ("grouped", "optimistic"),
        ("grouped", "lock"),
    )
    queued_trainers: tuple[int, ...] = (1, 2, 4)
    queued_epochs: int = 10
    fetch_sizes: tuple[tuple[str, int, int], ...] = (("~1M", 1000, 1000), ("~25M", 5000, 5000))
    fetch_reads: tuple[int, ...] = (20, 5)

    @classmethod
    def quick(cls) -> Plan:
        return cls(
            linear_trainers=(1, 2),
            linear_epochs=2,
            digits_epochs=3,
            commit_trainers=(1, 4),
            commit_steps=60,
            commit_runs=(("per-step", "optimistic"), ("grouped", "optimistic")),
            fetch_sizes=(("~1M", 1000, 1000),),
            fetch_reads=(5,),
            queued_optimizers=("adam",),
            queued_runs=(("grouped", "optimistic"),),
            queued_trainers=(1, 2),
            queued_epochs=2,
        )


def layout(trainers: int) -> tuple[int, int]:
    """(processes, threads each) for ``trainers`` concurrent trainers: processes up to 4, then threads.

    Four processes with torch are already two per core here; past that, pool threads in the same processes give
    the same commit races (each thread has its own Redis connection) without more interpreters.
    """
    processes = min(trainers, 4)
    return processes, math.ceil(trainers / processes)


class Lab:
    """A private namespace and training queue, worker processes started on demand, and cleanup."""

    def __init__(self, base: Settings, progress: Progress) -> None:
        tag = "report" + uuid.uuid4().hex[:8]
        # The workers get these settings (Settings.to_env), commit mode aside.
        self.settings = derive_settings(
            base, namespace=tag, training_queue=f"{tag}.training", inference_queue=f"{tag}.inference", metrics_port=0
        )
        self.progress = progress
        self.store = RedisParamStore.from_settings(self.settings)
        self.datasets = DatasetStore(client=self.store.client, keys=Keys(self.settings.namespace))
        self.client = Client(self.settings)

    def group(self, path: str) -> int:
        """``AGENT_WORKERS_TRAIN_GROUP`` of the workers of ``path``."""
        return 1 if path == "per-step" else self.settings.train_group

    def workers(
        self, trainers: int, *, mode: str = "optimistic", path: str = "per-step", **settings: Any
    ) -> list[WorkerProcess]:
        """Start worker processes giving ``trainers`` concurrent trainers in commit ``mode`` on the train_step
        ``path`` (a grouped worker is one trainer per process: its groups run in the event loop); returns them.
        ``settings``: other Settings fields of the workers (``plugins=(...)``)."""
        processes, threads = layout(trainers)
        fixed = {"train_group_max": self.group(path), "train_turns": False} if path == FIXED_PATH else {}
        env = derive_settings(
            self.settings, commit_mode=mode, train_group=self.group(path), **fixed, **settings
        ).to_env()
        started = [
            WorkerProcess(
                queues=[self.settings.training_queue], env=env, loglevel="WARNING", extra=["-c", str(threads)]
            )
            for _ in range(processes)
        ]
        for w in started:
            w.start(wait=False)
        try:
            for w in started:
                w.wait_ready()
        except BaseException:
            stop_all(started)
            raise
        return started

    def cleanup(self) -> None:
        client = self.store.client
        keys = list(client.scan_iter(match=f"{self.settings.namespace}:*", count=1000))
        if keys:
            client.delete(*keys)
        try:
            with self.client.app.connection_for_write() as conn:
                for queue in (self.settings.training_queue, self.settings.inference_queue):
                    try:
                        conn.default_channel.queue_delete(queue)
                    except Exception:  # noqa: BLE001 - never declared
                        pass
        except Exception as exc:  # noqa: BLE001 - cleanup is best effort
            self.progress(f"  (could not delete the report's queues: {exc})")


def cpu_seconds(workers: Sequence[WorkerProcess]) -> float:
    """CPU seconds (user + system, every thread) the worker processes have used so far, from ``/proc``; 0.0 where
    it cannot be read (not Linux, or a process gone)."""
    total = 0.0
    for w in workers:
        try:
            # Fields 14 and 15 of /proc/<pid>/stat (utime, stime), counted after the parenthesised command name.
            fields = open(f"/proc/{w.pid}/stat").read().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total


def redis_cpu_seconds(client: Any) -> float:
    """CPU seconds the Redis server has used since it started (``INFO cpu``: the whole server, whoever used it)."""
    info = client.info("cpu")
    return float(info["used_cpu_sys"]) + float(info["used_cpu_user"])


def stop_all(workers: Sequence[WorkerProcess]) -> None:
    for w in workers:
        w.stop()


def step_stats(results: Sequence[dict[str, Any]], seconds: float) -> dict[str, Any]:
    """Throughput and coordination cost of a set of ``train_step`` results."""
    attempts = sum(r["attempts"] for r in results)
    conflicts = sum(r["conflicts"] for r in results)
    latencies = [r["latency_ms"] for r in results if not r["duplicate"]]
    staleness: dict[str, int] = {}
    for r in sorted(results, key=lambda r: r["staleness"]):
        staleness[str(r["staleness"])] = staleness.get(str(r["staleness"]), 0) + 1
    return {
        "steps": len(results),
        "seconds": round(seconds, 3),
        "steps_per_s": round(len(results) / seconds, 2) if seconds > 0 else None,
        "attempts": attempts,
        "conflicts": conflicts,
        "conflict_rate": round(conflicts / attempts, 4) if attempts else 0.0,
        "recomputed": sum(r["recomputed"] for r in results),
        "max_staleness": max((r["staleness"] for r in results), default=0),
        "staleness": staleness,
        "commits": len({r.get("version") for r in results if not r["duplicate"]}),
        "latency_p50_ms": round(percentile(latencies, 50), 2),
        "latency_p99_ms": round(percentile(latencies, 99), 2),
    }


def train_through_queue(
    lab: Lab,
    model: str,
    x: np.ndarray,
    y: np.ndarray,
    *,
    epochs: int,
    batch_size: int,
    hparams: dict[str, Any],
    window: int,
    label: str,
) -> tuple[list[dict[str, Any]], float]:
    """Upload ``x, y`` and train ``model`` on it with queued steps; returns (step results, seconds)."""
    dataset = lab.datasets.upload(x, y)
    total = epochs * math.ceil(len(x) / batch_size)
    done = [0]
    last = [time.perf_counter()]

    def on_step(_: dict[str, Any]) -> None:
        done[0] += 1
        now = time.perf_counter()
        if now - last[0] >= 5 or done[0] == total:
            last[0] = now
            lab.progress(f"  {label}: {done[0]}/{total} steps")

    started = time.perf_counter()
    results = lab.client.train(
        model,
        dataset,
        len(x),
        epochs=epochs,
        batch_size=batch_size,
        hparams=hparams,
        window=window,
        timeout=300,
        on_step=on_step,
    )
    return results, time.perf_counter() - started


def send_steps(
    lab: Lab,
    model: str,
    dataset: str,
    n_rows: int,
    *,
    epochs: int,
    batch_size: int,
    hparams: dict[str, Any],
    window: int,
    label: str,
) -> tuple[list[dict[str, Any]], float]:
    """Train ``model`` with one ``train_step`` message per mini-batch, sent by a bare Celery producer
    (``send_task`` by name, as any other application would) with at most ``window`` in flight; returns
    (step results, seconds)."""
    from celery import Celery

    from agent_workers.contract import TRAIN_STEP
    from agent_workers.training.datasets import epoch_batches

    producer = Celery("report-producer", broker=lab.settings.broker_url, backend=lab.settings.result_backend)
    total = epochs * math.ceil(n_rows / batch_size)
    results: list[dict[str, Any]] = []
    in_flight: list[Any] = []
    last = time.perf_counter()
    started = last
    try:
        for _, _, rows in epoch_batches(n_rows, epochs=epochs, batch_size=batch_size, seed=0):
            if len(in_flight) >= window:
                results.append(in_flight.pop(0).get(timeout=300))
            in_flight.append(
                producer.send_task(
                    TRAIN_STEP,
                    kwargs={"model": model, "dataset": dataset, "rows": rows.tolist(), "hparams": hparams},
                    queue=lab.settings.training_queue,
                )
            )
            if time.perf_counter() - last >= 5:
                last = time.perf_counter()
                lab.progress(f"  {label}: {len(results)}/{total} steps")
        results.extend(h.get(timeout=300) for h in in_flight)
        return results, time.perf_counter() - started
    finally:
        producer.close()
