"""The training report behind ``agent-workers report``: quality and coordination cost of training through the queue.

Everything runs on this machine against the configured broker and Redis, in a namespace and queues of its own,
with worker processes it starts and stops itself:

1. **Linear regression** (the seed's data, :func:`agent_workers.demo.seed_data`): 9,000 rows trained through
   queued ``train_step`` messages (MSE, SGD lr 0.05, batches of 100, 10 epochs) by 1, 2 and 4 concurrent trainer
   processes; test MSE on the 1,000 held-out rows against the floor (the MSE of the true function). Goal <= 1.02x.
2. **MLP on sklearn digits**, 4 concurrent trainers, Adam; test accuracy against a single-process torch loop with
   the same initial weights, batches and hyperparameters. Goal >= 96% and within 1 point.
3. **Commit coordination**: a fixed number of digits steps with 1, 2, 4 and 8 trainers, optimistic versus lock
   mode: steps/s through the queue, conflict rate (lost compare-and-sets per commit attempt), and commit latency
   (a step's start, lock wait included, to its commit) p50/p99.
4. **Parameter fetch latency** of ~1M and ~25M parameter models (the latter chunked): a full read, and the
   per-call version check a reader pays when nothing changed.

Results go to ``docs/benchmarks/training.json`` and ``.png``, and the tables into ``docs/training.md`` between
the report markers. Figures are this machine's; they are reported, never asserted.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import platform
import statistics
import time
import uuid
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch

from agent_workers.client import Client
from agent_workers.config import PREFIX, Settings
from agent_workers.datasets import DatasetStore
from agent_workers.keys import Keys
from agent_workers.models import ModelSpec, make_spec, parameter_count
from agent_workers.params import RedisParamStore
from agent_workers.supervisor import WorkerProcess

Progress = Callable[[str], None]

BEGIN_MARK = "<!-- report:begin -->"
END_MARK = "<!-- report:end -->"
MSE_GOAL = 1.02
ACCURACY_GOAL = 0.96
ACCURACY_GAP_GOAL = 0.01

LINEAR_HP = {"loss": "mse", "optimizer": "sgd", "lr": 0.05}
DIGITS_HP = {"loss": "cross_entropy", "optimizer": "adam", "lr": 0.005}
DIGITS_HIDDEN = [128]
DIGITS_BATCH = 32


@dataclasses.dataclass(frozen=True)
class Plan:
    """How much work each part does (``quick`` shrinks everything for a smoke run)."""

    linear_trainers: tuple[int, ...] = (1, 2, 4)
    linear_epochs: int = 10
    digits_trainers: int = 4
    digits_epochs: int = 20
    commit_trainers: tuple[int, ...] = (1, 2, 4, 8)
    commit_steps: int = 400
    fetch_sizes: tuple[tuple[str, int, int], ...] = (("~1M", 1000, 1000), ("~25M", 5000, 5000))
    fetch_reads: tuple[int, ...] = (20, 5)

    @classmethod
    def quick(cls) -> Plan:
        return cls(linear_trainers=(1, 2), linear_epochs=2, digits_epochs=3, commit_trainers=(1, 4),
                   commit_steps=60, fetch_sizes=(("~1M", 1000, 1000),), fetch_reads=(5,))


def layout(trainers: int) -> tuple[int, int]:
    """(processes, threads each) for ``trainers`` concurrent trainers: processes up to 4, then threads.

    Four processes with torch are already two per core here; past that, pool threads in the same processes give
    the same commit races (each thread has its own Redis connection) without more interpreters.
    """
    processes = min(trainers, 4)
    return processes, math.ceil(trainers / processes)


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0-100), linear interpolation; NaN for no values."""
    return float(np.percentile(np.asarray(values, dtype=np.float64), q)) if len(values) else float("nan")


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    def cell(value: Any) -> str:
        if isinstance(value, float):
            return f"{value:.4g}" if abs(value) < 1000 else f"{value:,.0f}"
        return str(value)

    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


class Lab:
    """A private namespace and training queue, worker processes started on demand, and cleanup."""

    def __init__(self, base: Settings, progress: Progress) -> None:
        tag = "report" + uuid.uuid4().hex[:8]
        # Workers inherit this process's AGENT_WORKERS_* (supervisor.settings_env) plus these overrides.
        self.env = {f"{PREFIX}NAMESPACE": tag, f"{PREFIX}TRAINING_QUEUE": f"{tag}.training",
                    f"{PREFIX}INFERENCE_QUEUE": f"{tag}.inference", f"{PREFIX}METRICS_PORT": "0"}
        self.settings = dataclasses.replace(base, namespace=tag, training_queue=f"{tag}.training",
                                            inference_queue=f"{tag}.inference", metrics_port=0)
        self.progress = progress
        self.store = RedisParamStore.from_settings(self.settings)
        self.datasets = DatasetStore(client=self.store.client, keys=Keys(self.settings.namespace))
        self.client = Client(self.settings)

    def workers(self, trainers: int, *, mode: str = "optimistic") -> list[WorkerProcess]:
        """Start worker processes giving ``trainers`` concurrent trainers in commit ``mode``; returns them."""
        processes, threads = layout(trainers)
        env = {**self.env, f"{PREFIX}COMMIT_MODE": mode}
        started = [WorkerProcess(queues=[self.settings.training_queue], env=env, loglevel="WARNING",
                                 extra=["-c", str(threads)]) for _ in range(processes)]
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


def stop_all(workers: Sequence[WorkerProcess]) -> None:
    for w in workers:
        w.stop()


def step_stats(results: Sequence[dict[str, Any]], seconds: float) -> dict[str, Any]:
    """Throughput and coordination cost of a set of ``train_step`` results."""
    attempts = sum(r["attempts"] for r in results)
    conflicts = sum(r["conflicts"] for r in results)
    latencies = [r["latency_ms"] for r in results if not r["duplicate"]]
    return {
        "steps": len(results),
        "seconds": round(seconds, 3),
        "steps_per_s": round(len(results) / seconds, 2) if seconds > 0 else None,
        "attempts": attempts,
        "conflicts": conflicts,
        "conflict_rate": round(conflicts / attempts, 4) if attempts else 0.0,
        "recomputed": sum(r["recomputed"] for r in results),
        "max_staleness": max((r["staleness"] for r in results), default=0),
        "latency_p50_ms": round(percentile(latencies, 50), 2),
        "latency_p99_ms": round(percentile(latencies, 99), 2),
    }


def train_through_queue(lab: Lab, model: str, x: np.ndarray, y: np.ndarray, *, epochs: int, batch_size: int,
                        hparams: dict[str, Any], window: int, label: str) -> tuple[list[dict[str, Any]], float]:
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
    results = lab.client.train(model, dataset, len(x), epochs=epochs, batch_size=batch_size, hparams=hparams,
                               window=window, timeout=300, on_step=on_step)
    return results, time.perf_counter() - started


# -- 1. linear regression ---------------------------------------------------------------------------------------


def linear_regression(lab: Lab, plan: Plan) -> list[dict[str, Any]]:
    from agent_workers.demo import N_FEATURES, N_TEST, seed_data

    x, y = seed_data()
    x_train, y_train, x_test, y_test = x[:-N_TEST], y[:-N_TEST], x[-N_TEST:], y[-N_TEST:]
    floor = float(np.mean((x_test[:, 0] - y_test) ** 2))
    rows = []
    for n in plan.linear_trainers:
        lab.progress(f"[1/4] linear regression, {n} trainer process(es): starting workers")
        workers = lab.workers(n)
        try:
            model = f"linear-{n}"
            lab.store.create(model, make_spec("linear", in_features=N_FEATURES, out_features=1), seed=0, replace=True)
            results, seconds = train_through_queue(lab, model, x_train, y_train.reshape(-1, 1),
                                                   epochs=plan.linear_epochs, batch_size=100, hparams=LINEAR_HP,
                                                   window=2 * n, label=f"linear x{n}")
        finally:
            stop_all(workers)
        params = lab.store.read(model).parameters()
        pred = x_test @ params["weight"].numpy().T + params["bias"].numpy()
        mse = float(np.mean((pred[:, 0] - y_test) ** 2))
        row = {"trainers": n, "test_mse": round(mse, 5), "floor_mse": round(floor, 5),
               "ratio": round(mse / floor, 4), "meets_goal": mse / floor <= MSE_GOAL,
               "version": lab.store.head(model).version, **step_stats(results, seconds)}
        lab.progress(f"  -> test MSE {mse:.4f}, floor {floor:.4f}, ratio {mse / floor:.3f} "
                     f"(goal <= {MSE_GOAL}); {row['steps_per_s']} steps/s, conflict rate {row['conflict_rate']}")
        rows.append(row)
    return rows


# -- 2. digits --------------------------------------------------------------------------------------------------


def digits_data() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """sklearn's 8x8 digits scaled to [0, 1]; a stratified 80/20 split (seed 0)."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    x, y = load_digits(return_X_y=True)
    x = (x / 16.0).astype(np.float32)
    x_train, x_test, y_train, y_test = train_test_split(x, y, test_size=0.2, stratify=y, random_state=0)
    return x_train, x_test, y_train.astype(np.int64), y_test.astype(np.int64)


def digits_spec() -> ModelSpec:
    return make_spec("mlp", in_features=64, hidden=DIGITS_HIDDEN, out_features=10)


def accuracy(module: torch.nn.Module, x: np.ndarray, y: np.ndarray) -> float:
    with torch.no_grad():
        return float((module(torch.from_numpy(x)).argmax(1).numpy() == y).mean())


def torch_loop(spec: ModelSpec, x: np.ndarray, y: np.ndarray, *, epochs: int, seed: int = 0) -> torch.nn.Module:
    """The single-process reference: same initial weights, batch order and Adam settings as the queued run."""
    torch.manual_seed(seed)
    module = spec.build()
    opt = torch.optim.Adam(module.parameters(), lr=DIGITS_HP["lr"])
    rng = np.random.default_rng(0)  # Client.train's batch order (its seed 0)
    steps = math.ceil(len(x) / DIGITS_BATCH)
    for _ in range(epochs):
        order = rng.permutation(len(x))
        for i in range(steps):
            rows = order[i * DIGITS_BATCH : (i + 1) * DIGITS_BATCH]
            opt.zero_grad()
            loss = torch.nn.functional.cross_entropy(module(torch.from_numpy(x[rows])), torch.from_numpy(y[rows]))
            loss.backward()
            opt.step()
    return module


def digits(lab: Lab, plan: Plan) -> dict[str, Any]:
    x_train, x_test, y_train, y_test = digits_data()
    spec = digits_spec()
    n = plan.digits_trainers
    lab.progress(f"[2/4] digits MLP, single-process torch loop ({plan.digits_epochs} epochs)")
    reference = accuracy(torch_loop(spec, x_train, y_train, epochs=plan.digits_epochs), x_test, y_test)
    lab.progress(f"  -> torch loop accuracy {reference:.4f}")
    lab.progress(f"[2/4] digits MLP, {n} trainer processes through the queue: starting workers")
    workers = lab.workers(n)
    try:
        torch.manual_seed(0)
        lab.store.create("digits", spec, module=spec.build(), replace=True)
        results, seconds = train_through_queue(lab, "digits", x_train, y_train, epochs=plan.digits_epochs,
                                               batch_size=DIGITS_BATCH, hparams=DIGITS_HP, window=2 * n,
                                               label=f"digits x{n}")
    finally:
        stop_all(workers)
    module = spec.build()
    module.load_state_dict(lab.store.read("digits").parameters())
    ours = accuracy(module, x_test, y_test)
    gap = reference - ours
    lab.progress(f"  -> queued accuracy {ours:.4f} (torch loop {reference:.4f}, gap {gap * 100:+.2f} points)")
    return {"trainers": n, "epochs": plan.digits_epochs, "hidden": DIGITS_HIDDEN, "hparams": DIGITS_HP,
            "batch_size": DIGITS_BATCH, "test_rows": len(y_test), "accuracy": round(ours, 4),
            "torch_accuracy": round(reference, 4), "gap_points": round(gap * 100, 2),
            "meets_goal": ours >= ACCURACY_GOAL and gap <= ACCURACY_GAP_GOAL, **step_stats(results, seconds)}


# -- 3. commit coordination ------------------------------------------------------------------------------------


def coordination(lab: Lab, plan: Plan) -> list[dict[str, Any]]:
    x_train, _, y_train, _ = digits_data()
    dataset = lab.datasets.upload(x_train, y_train)
    spec = digits_spec()
    rng = np.random.default_rng(1)
    batches = [rng.choice(len(x_train), DIGITS_BATCH, replace=False).tolist() for _ in range(plan.commit_steps)]
    rows = []
    for mode in ("optimistic", "lock"):
        for n in plan.commit_trainers:
            processes, threads = layout(n)
            lab.progress(f"[3/4] {plan.commit_steps} steps, {n} trainers ({processes} process(es) x {threads} "
                         f"thread(s)), {mode}: starting workers")
            workers = lab.workers(n, mode=mode)
            try:
                model = f"coord-{mode}-{n}"
                torch.manual_seed(0)
                lab.store.create(model, spec, module=spec.build(), replace=True)
                started = time.perf_counter()
                handles = [lab.client.send_train_step(model, dataset=dataset, rows=b, hparams=DIGITS_HP)
                           for b in batches]
                results = [lab.client.wait(h, 300) for h in handles]
                seconds = time.perf_counter() - started
            finally:
                stop_all(workers)
            row = {"mode": mode, "trainers": n, "processes": processes, "threads": threads,
                   **step_stats(results, seconds)}
            lab.progress(f"  -> {row['steps_per_s']} steps/s, conflict rate {row['conflict_rate']}, "
                         f"latency p50 {row['latency_p50_ms']} ms, p99 {row['latency_p99_ms']} ms")
            rows.append(row)
    return rows


# -- 4. fetch latency ------------------------------------------------------------------------------------------


def fetch_latency(lab: Lab, plan: Plan) -> list[dict[str, Any]]:
    rows = []
    for (label, width, hidden), reads in zip(plan.fetch_sizes, plan.fetch_reads, strict=True):
        spec = make_spec("mlp", in_features=width, hidden=[hidden], out_features=10)
        torch.manual_seed(0)
        module = spec.build()
        params = parameter_count(module)
        lab.progress(f"[4/4] fetch latency, {label} parameters ({params:,}): creating the model")
        model = f"fetch-{label.strip('~')}"
        lab.store.create(model, spec, module=module, replace=True)
        del module
        cold = RedisParamStore.from_settings(lab.settings, cache=False)
        warm = RedisParamStore.from_settings(lab.settings)
        head = cold.head(model)
        full = []
        for _ in range(reads):
            t = time.perf_counter()
            cold.read(model)
            full.append(time.perf_counter() - t)
        warm.read(model)
        checks = []
        for _ in range(200):
            t = time.perf_counter()
            warm.read(model)  # unchanged version: one HMGET, no download
            checks.append(time.perf_counter() - t)
        snap = cold.read(model)
        commits = []
        for _ in range(min(reads, 3)):
            current = cold.head(model)
            t = time.perf_counter()
            cold.commit(model, expected=current.version, tensors=snap.tensors, epoch=current.epoch)
            commits.append(time.perf_counter() - t)
        blob_mb = sum(t.numel() * t.element_size() for t in snap.tensors.values()) / 2**20
        row = {"model": label, "parameters": params, "blob_mib": round(blob_mb, 1), "chunks": head.chunks,
               "read_p50_ms": round(statistics.median(full) * 1000, 2), "read_max_ms": round(max(full) * 1000, 2),
               "check_p50_ms": round(statistics.median(checks) * 1000, 3),
               "check_p99_ms": round(percentile(checks, 99) * 1000, 3),
               "commit_p50_ms": round(statistics.median(commits) * 1000, 2)}
        lab.progress(f"  -> full read p50 {row['read_p50_ms']} ms ({row['chunks']} chunk(s), {row['blob_mib']} MiB), "
                     f"unchanged-version check p50 {row['check_p50_ms']} ms, commit p50 {row['commit_p50_ms']} ms")
        lab.store.delete(model)
        rows.append(row)
    return rows


# -- output -----------------------------------------------------------------------------------------------------


def render_tables(report: dict[str, Any]) -> str:
    """The markdown that goes between the report markers of docs/training.md."""
    env = report["environment"]
    if "load_average_at_start" in env:
        load = (f"1-minute load average {env['load_average_at_start'][0]} at the start and "
                f"{env.get('load_average_at_end', ['?'])[0]} at the end")
    else:
        load = "load average not recorded"
    parts = [f"Measured {report['finished']} on {env['machine']} ({env['cpus']} CPUs, {load}; a shared machine "
             f"makes rates rough), broker `{env['broker']}`, Redis {env['redis']}, torch {env['torch']}, "
             f"τ = {env['max_staleness']}. Regenerate with `agent-workers report`."]
    parts.append("\n**Linear regression through the queue** (seed data, SGD lr 0.05, batch 100, "
                 f"{report['plan']['linear_epochs']} epochs; goal: test MSE <= {MSE_GOAL} x floor)\n")
    parts.append(markdown_table(
        ["trainer processes", "test MSE", "floor", "ratio", "goal met", "steps/s", "conflict rate",
         "max staleness"],
        [[r["trainers"], r["test_mse"], r["floor_mse"], r["ratio"], "yes" if r["meets_goal"] else "NO",
          r["steps_per_s"], r["conflict_rate"], r["max_staleness"]] for r in report["linear"]]))
    d = report["digits"]
    parts.append(f"\n**Digits MLP** ({d['hidden']} hidden, Adam lr {d['hparams']['lr']}, batch {d['batch_size']}, "
                 f"{d['epochs']} epochs, {d['test_rows']} test rows; goal: >= {ACCURACY_GOAL:.0%} and within "
                 "1 point of the torch loop)\n")
    parts.append(markdown_table(
        ["run", "accuracy", "gap (points)", "goal met", "steps/s", "conflict rate", "recomputed"],
        [["single-process torch loop", d["torch_accuracy"], "", "", "", "", ""],
         [f"{d['trainers']} trainers through the queue", d["accuracy"], d["gap_points"],
          "yes" if d["meets_goal"] else "NO", d["steps_per_s"], d["conflict_rate"], d["recomputed"]]]))
    parts.append(f"\n**Commit coordination** ({report['plan']['commit_steps']} digits steps, all enqueued at once; "
                 "latency = step start, lock wait included, to commit)\n")
    parts.append(markdown_table(
        ["mode", "trainers", "processes x threads", "steps/s", "conflict rate", "recomputed", "p50 ms", "p99 ms"],
        [[r["mode"], r["trainers"], f"{r['processes']} x {r['threads']}", r["steps_per_s"], r["conflict_rate"],
          r["recomputed"], r["latency_p50_ms"], r["latency_p99_ms"]] for r in report["coordination"]]))
    parts.append("\n**Parameter fetch** (MLP with one hidden layer; a fresh reader without cache, and a reader whose "
                 "cached version is current)\n")
    parts.append(markdown_table(
        ["model", "parameters", "blob MiB", "chunks", "full read p50 ms", "full read max ms",
         "unchanged check p50 ms", "commit p50 ms"],
        [[r["model"], f"{r['parameters']:,}", r["blob_mib"], r["chunks"], r["read_p50_ms"], r["read_max_ms"],
          r["check_p50_ms"], r["commit_p50_ms"]] for r in report["fetch"]]))
    return "\n".join(parts) + "\n"


def splice(document: str, tables: str) -> str:
    """Replace what lies between the report markers (or append the markers and tables)."""
    block = f"{BEGIN_MARK}\n{tables}{END_MARK}"
    if BEGIN_MARK in document and END_MARK in document:
        head, _, rest = document.partition(BEGIN_MARK)
        _, _, tail = rest.partition(END_MARK)
        return head + block + tail
    return document.rstrip("\n") + "\n\n" + block + "\n"


def plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(11, 8))
    lin = report["linear"]
    ax = axes[0][0]
    ax.plot([r["trainers"] for r in lin], [r["ratio"] for r in lin], "o-", label="test MSE / floor")
    ax.axhline(MSE_GOAL, color="grey", linestyle="--", label=f"goal {MSE_GOAL}")
    ax.set(title="Linear regression through the queue", xlabel="trainer processes", ylabel="MSE / floor")
    ax.set_xticks([r["trainers"] for r in lin])
    ax.legend()
    coord = report["coordination"]
    for mode, style in (("optimistic", "o-"), ("lock", "s--")):
        rows = [r for r in coord if r["mode"] == mode]
        axes[0][1].plot([r["trainers"] for r in rows], [r["steps_per_s"] for r in rows], style, label=mode)
        axes[1][0].plot([r["trainers"] for r in rows], [r["latency_p99_ms"] for r in rows], style,
                        label=f"{mode} p99")
        axes[1][0].plot([r["trainers"] for r in rows], [r["latency_p50_ms"] for r in rows], style, alpha=0.4,
                        label=f"{mode} p50")
    ticks = sorted({r["trainers"] for r in coord})
    axes[0][1].set_xticks(ticks)
    axes[1][0].set_xticks(ticks)
    axes[0][1].set(title="Digits steps/s through the queue", xlabel="trainers", ylabel="steps/s")
    axes[0][1].legend()
    axes[1][0].set(title="Commit latency (start to commit)", xlabel="trainers", ylabel="ms", yscale="log")
    axes[1][0].legend()
    fetch = report["fetch"]
    ax = axes[1][1]
    labels = [f"{r['model']}\n{r['blob_mib']} MiB" for r in fetch]
    pos = np.arange(len(fetch))
    ax.bar(pos - 0.2, [r["read_p50_ms"] for r in fetch], 0.4, label="full read p50")
    ax.bar(pos + 0.2, [r["check_p50_ms"] for r in fetch], 0.4, label="unchanged-version check p50")
    ax.set_xticks(pos, labels)
    ax.set(title="Parameter fetch", ylabel="ms", yscale="log")
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def environment(lab: Lab) -> dict[str, Any]:
    from urllib.parse import urlparse

    info = lab.store.client.info("server")
    return {"machine": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version(),
            "torch": torch.__version__, "redis": info.get("redis_version"),
            "broker": urlparse(lab.settings.broker_url).scheme, "max_staleness": lab.settings.max_staleness,
            "torch_threads_per_worker": lab.settings.torch_threads,
            "load_average_at_start": [round(v, 2) for v in os.getloadavg()]}


def run(settings: Settings | None = None, *, quick: bool = False, docs: Path = Path("docs"),
        progress: Progress = print) -> dict[str, Any]:
    """Run the whole report and write its files; returns the figures."""
    plan = Plan.quick() if quick else Plan()
    lab = Lab(settings or Settings.from_env(), progress)
    started = time.perf_counter()
    progress(f"report: namespace {lab.settings.namespace}, broker {lab.settings.broker_url.split('@')[-1]}"
             f"{' (quick)' if quick else ''}")
    try:
        report: dict[str, Any] = {"plan": dataclasses.asdict(plan), "environment": environment(lab)}
        report["linear"] = linear_regression(lab, plan)
        report["digits"] = digits(lab, plan)
        report["coordination"] = coordination(lab, plan)
        report["fetch"] = fetch_latency(lab, plan)
    finally:
        lab.cleanup()
    report["seconds"] = round(time.perf_counter() - started, 1)
    report["environment"]["load_average_at_end"] = [round(v, 2) for v in os.getloadavg()]
    report["finished"] = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    out = docs / "benchmarks"
    out.mkdir(parents=True, exist_ok=True)
    (out / "training.json").write_text(json.dumps(report, indent=2) + "\n")
    plot(report, out / "training.png")
    doc = docs / "training.md"
    doc.write_text(splice(doc.read_text() if doc.exists() else "# Training\n", render_tables(report)))
    progress(f"report written: {out / 'training.json'}, {out / 'training.png'}, tables in {doc} "
             f"({report['seconds']} s)")
    return report
