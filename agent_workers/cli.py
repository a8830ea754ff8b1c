"""The ``agent-workers`` command: run workers, manage models, send jobs, look at the pool."""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import click

from agent_workers.config import Settings
from agent_workers.errors import AgentWorkersError


def _settings() -> Settings:
    try:
        return Settings.from_env()
    except AgentWorkersError as exc:
        raise click.ClickException(str(exc)) from None


class _Group(click.Group):
    """Turns our errors into one clear line instead of a traceback."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except AgentWorkersError as exc:
            raise click.ClickException(f"{type(exc).__name__}: {exc}") from None


@click.group(cls=_Group)
@click.version_option(package_name="agent-workers")
def main() -> None:
    """agent-workers: a Celery worker pool for deep-learning inference and training jobs.

    Every setting comes from AGENT_WORKERS_* environment variables (see docs/operations.md).
    """


@main.command()
def demo() -> None:
    """Train the seed's linear regression through the queue and score 1,000 held-out rows (the main job)."""
    from agent_workers.tools import demo as demo_module

    demo_module.main(_settings())


def _visible_gpus() -> list[str]:
    """GPU indices visible to this host, without initialising CUDA in this (parent) process."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return [g for g in visible.split(",") if g.strip()]
    if shutil.which("nvidia-smi") is None:
        return []
    out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, check=False).stdout
    return [str(i) for i, line in enumerate(out.splitlines()) if line.startswith("GPU ")]


@main.command(context_settings={"ignore_unknown_options": True})
@click.option("--queues", "-Q", default=None, help="Queues to consume (default: inference,training).")
@click.option("--name", "-n", default=None, help="Node name (default: <queues>@%h, -gpuN appended per GPU).")
@click.option("--loglevel", "-l", default="INFO", show_default=True)
@click.option(
    "--gpus/--no-gpus",
    default=True,
    show_default=True,
    help="Start one worker process per visible GPU (CUDA_VISIBLE_DEVICES pinned per process).",
)
@click.argument("celery_args", nargs=-1, type=click.UNPROCESSED)
def worker(queues: str | None, name: str | None, loglevel: str, gpus: bool, celery_args: tuple[str, ...]) -> None:
    """Start worker processes with the right pool, queues and prefetch (extra args go to `celery worker`)."""
    from agent_workers.worker.launch import settings_env, worker_command

    settings = _settings()
    wanted = queues.split(",") if queues else [settings.inference_queue, settings.training_queue]
    prefetch = 2 * settings.batch.max_batch_size if settings.inference_queue in wanted else 1
    base = name or f"{'-'.join(wanted)}@%h"
    devices = _visible_gpus() if gpus else []
    if len(devices) <= 1:
        cmd = worker_command(
            queues=wanted, hostname=base, loglevel=loglevel, prefetch_multiplier=prefetch, extra=list(celery_args)
        )
        os.execvpe(cmd[0], cmd, settings_env())
    procs = []
    for gpu in devices:
        node, _, host = base.partition("@")
        env = settings_env({"CUDA_VISIBLE_DEVICES": gpu, "AGENT_WORKERS_DEVICE": "cuda:0"})
        cmd = worker_command(
            queues=wanted,
            hostname=f"{node}-gpu{gpu}@{host or '%h'}",
            loglevel=loglevel,
            prefetch_multiplier=prefetch,
            extra=list(celery_args),
        )
        procs.append(subprocess.Popen(cmd, env=env))
    click.echo(f"started {len(procs)} worker processes, one per GPU ({', '.join(devices)})", err=True)

    def forward(signum: int, _frame: Any) -> None:
        # systemd, docker and honcho stop us with SIGTERM: pass it on so every worker shuts down warm.
        for p in procs:
            if p.poll() is None:
                p.send_signal(signum)

    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT):
        signal.signal(signum, forward)
    codes = [p.wait() for p in procs]
    sys.exit(max(codes))


@main.group()
def models() -> None:
    """Create, list and inspect models and their parameter versions."""


def _store() -> Any:
    from agent_workers.params import RedisParamStore

    return RedisParamStore.from_settings(_settings())


@models.command("create")
@click.argument("name")
@click.option("--arch", default="linear", show_default=True, help="Registered architecture.")
@click.option(
    "--config",
    "config_json",
    default='{"in_features": 10}',
    show_default=True,
    help='Architecture config as JSON, e.g. \'{"in_features": 64, "hidden": [256, 256]}\'.',
)
@click.option("--seed", default=0, show_default=True, help="Seed of the initial weights.")
@click.option("--replace", is_flag=True, help="Recreate the model if it exists (all versions are dropped).")
@click.option(
    "--weights",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    default=None,
    help="Initial weights from a .safetensors file (pickle checkpoints are refused).",
)
def models_create(name: str, arch: str, config_json: str, seed: int, replace: bool, weights: Path | None) -> None:
    """Create NAME at version 0 (seeded random weights, or --weights)."""
    from agent_workers.models import load_weights, make_spec

    try:
        config = json.loads(config_json)
    except json.JSONDecodeError as exc:
        raise click.ClickException(f"--config is not valid JSON: {exc}") from None
    spec = make_spec(arch, **config)
    module = load_weights(spec, weights) if weights is not None else None
    _store().create(name, spec, seed=seed, module=module, replace=replace)
    click.echo(f"created {name} ({arch}) at version 0" + (f" from {weights}" if weights else ""))


@models.command("list")
def models_list() -> None:
    """List models with their current versions."""
    store = _store()
    for name in store.list():
        head = store.head(name)
        spec = store.spec(name, head.epoch)
        click.echo(f"{name}\tv{head.version}\t{spec.arch}\t{json.dumps(spec.config)}")


@models.command("show")
@click.argument("name")
def models_show(name: str) -> None:
    """Show NAME's spec, version and parameter shapes."""
    store = _store()
    snap = store.read(name)
    spec = store.spec(name, snap.epoch)
    click.echo(
        json.dumps(
            {
                "model": name,
                "version": snap.version,
                **spec.to_json(),
                "parameters": {k: list(v.shape) for k, v in snap.parameters().items()},
            },
            indent=2,
        )
    )


@models.command("history")
@click.argument("name")
@click.option("--limit", default=20, show_default=True)
def models_history(name: str, limit: int) -> None:
    """Show NAME's newest commits."""
    for record in _store().history(name, limit):
        click.echo(json.dumps(record))


@models.command("rollback")
@click.argument("name")
@click.argument("version", type=int)
def models_rollback(name: str, version: int) -> None:
    """Make VERSION's parameters current again (as a new version)."""
    new = _store().rollback(name, version)
    click.echo(f"{name}: version {version} restored as version {new}")


def _read_rows(path: Path) -> list[list[float]]:
    if path.suffix == ".npy":
        import numpy as np

        return np.load(path, allow_pickle=False).tolist()
    if path.suffix == ".csv":
        with path.open() as f:
            return [[float(v) for v in row] for row in csv.reader(f) if row]
    data = json.loads(path.read_text())
    return data if isinstance(data, list) and data and isinstance(data[0], list) else [data]


@main.command()
@click.argument("model")
@click.argument("path", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--many", is_flag=True, help="Send all rows in one predict_many message instead of one each.")
@click.option("--timeout", default=60.0, show_default=True)
def predict(model: str, path: Path, many: bool, timeout: float) -> None:
    """Score the rows of PATH (.json, .csv or .npy) with MODEL; prints one JSON result per row."""
    from agent_workers.client import Client

    client = Client(_settings())
    rows = _read_rows(path)
    if many:
        click.echo(json.dumps(client.predict_many(model, rows, timeout=timeout)))
        return
    for result in client.predict_bulk(model, rows, timeout=timeout):
        click.echo(json.dumps(result))


@main.command()
@click.option("--timeout", default=2.0, show_default=True, help="Seconds to wait for workers to answer.")
def status(timeout: float) -> None:
    """Workers online, models and versions, queue depths."""
    from agent_workers.client import producer_app

    settings = _settings()
    app = producer_app(settings)
    replies = app.control.inspect(timeout=timeout).ping() or {}
    click.echo(f"workers online: {len(replies)}")
    for name in sorted(replies):
        click.echo(f"  {name}")
    store = _store()
    click.echo("models:")
    for name in store.list():
        click.echo(f"  {name}\tv{store.head(name).version}")
    click.echo("queues:")
    with app.connection_for_read() as conn:
        channel = conn.default_channel
        for queue in (settings.inference_queue, settings.training_queue):
            try:
                depth = channel.queue_declare(queue=queue, passive=True).message_count
            except Exception:  # noqa: BLE001 - a queue nobody declared yet
                depth = 0
            click.echo(f"  {queue}\t{depth}")


@main.command()
@click.option("--broker", type=click.Choice(["redis", "rabbitmq", "both"]), default="both", show_default=True)
@click.option(
    "--workload",
    type=click.Choice(["mlp", "heavy", "both"]),
    default="both",
    show_default=True,
    help="mlp: 64-256-256-10; heavy: 1024-4096-4096-1024 (25M parameters, weight-bound).",
)
@click.option("--n", "n", type=int, default=20_000, show_default=True, help="Requests pre-filled for our drain (mlp).")
@click.option(
    "--baseline-n", type=int, default=None, help="Requests for the naive/celery-batches drains (mlp; default: --n)."
)
@click.option("--sweep-n", type=int, default=5_000, show_default=True, help="Requests per sweep point (mlp).")
@click.option("--heavy-n", type=int, default=4_000, show_default=True, help="Requests for our drain (heavy).")
@click.option(
    "--heavy-small-n",
    type=int,
    default=1_000,
    show_default=True,
    help="Requests for the heavy baselines and sweep points.",
)
@click.option("--sweep", default="1,8,32,64,128", show_default=True, help="max_batch_size values to sweep.")
@click.option("--concurrency", "-c", default="32", show_default=True, help="Closed-loop producers (comma list).")
@click.option("--duration", type=float, default=5.0, show_default=True, help="Seconds measured per latency run.")
@click.option("--max-batch-size", type=int, default=64, show_default=True)
@click.option("--max-wait-ms", type=float, default=5.0, show_default=True)
@click.option(
    "--with-celery-batches",
    is_flag=True,
    help="Also measure celery-batches 0.11 (pip install --no-deps if missing; it pins celery<5.7).",
)
@click.option("--skip", multiple=True, type=click.Choice(["baselines", "sweep", "latency"]), help="Leave a part out.")
@click.option("--quick", is_flag=True, help="CI-sized run (small N, sweep 1,64, 2 s latency runs).")
@click.option("--redis-url", default="redis://127.0.0.1:6379/0", show_default=True, help="Redis broker.")
@click.option("--amqp-url", default="amqp://guest:guest@127.0.0.1:5672//", show_default=True, help="RabbitMQ broker.")
@click.option(
    "--out",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path("docs/benchmarks"),
    show_default=True,
    help="Where the JSON, markdown summary and PNGs go (names end -quick for --quick).",
)
@click.option(
    "--repeat",
    type=int,
    default=1,
    show_default=True,
    help="Drains of ours per broker and workload; the median is reported (a shared machine is noisy).",
)
@click.option(
    "--profile",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Also run one extra drain of ours under py-spy (not counted) and save its stacks here.",
)
def bench(
    broker: str,
    workload: str,
    n: int,
    baseline_n: int | None,
    sweep_n: int,
    heavy_n: int,
    heavy_small_n: int,
    sweep: str,
    concurrency: str,
    duration: float,
    max_batch_size: int,
    max_wait_ms: float,
    with_celery_batches: bool,
    skip: tuple[str, ...],
    quick: bool,
    redis_url: str,
    amqp_url: str,
    out: Path,
    repeat: int,
    profile: Path | None,
) -> None:
    """Benchmark our batcher against a per-request Celery task (and celery-batches) on Redis and RabbitMQ."""
    from agent_workers.tools import bench as bench_module

    settings = _settings()
    ctx = click.get_current_context()
    options: dict[str, Any] = {
        "brokers": ("redis", "rabbitmq") if broker == "both" else (broker,),
        "workloads": ("mlp", "heavy") if workload == "both" else (workload,),
        "sweep": tuple(int(s) for s in sweep.split(",") if s.strip()),
        "concurrency": tuple(int(c) for c in concurrency.split(",") if c.strip()),
        "max_batch_size": max_batch_size,
        "max_wait_ms": max_wait_ms,
        "with_celery_batches": with_celery_batches,
        "skip": frozenset(skip),
        "redis_url": redis_url,
        "amqp_url": amqp_url,
        "out": out,
        "profile": profile,
        "repeat": repeat,
        "result_backend": settings.result_backend,
        "params_url": settings.params_url,
        "device": settings.device,
        "torch_threads": settings.torch_threads,
    }
    sizes = {
        "n": n,
        "baseline_n": baseline_n,
        "sweep_n": sweep_n,
        "heavy_n": heavy_n,
        "heavy_small_n": heavy_small_n,
        "duration": duration,
    }
    if quick:  # quick sizes, unless given on the command line
        options.update(
            {k: v for k, v in sizes.items() if ctx.get_parameter_source(k) == click.core.ParameterSource.COMMANDLINE}
        )
        if ctx.get_parameter_source("sweep") != click.core.ParameterSource.COMMANDLINE:
            del options["sweep"]
        config = bench_module.BenchConfig.quick(**options)
    else:
        config = bench_module.BenchConfig(**options, **sizes)
    bench_module.run(config)


@main.command("bench-producer")
@click.option("-n", "n", type=int, default=2000, show_default=True, help="Requests per path.")
@click.option("--broker-url", default=None, help="Broker to publish to (default: AGENT_WORKERS_BROKER_URL).")
def bench_producer(n: int, broker_url: str | None) -> None:
    """Producer CPU per predict request: apply_async against the client's single and bulk paths (no worker)."""
    import dataclasses

    from agent_workers.tools import producer_bench

    settings = _settings()
    if broker_url:
        settings = dataclasses.replace(settings, broker_url=broker_url)
    producer_bench.report(settings, n, say=click.echo)


@main.command()
@click.option("--quick", is_flag=True, help="A small smoke run (minutes less; numbers not representative).")
@click.option(
    "--docs",
    "docs_dir",
    default="docs",
    show_default=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="Where training.md and benchmarks/training.{json,png} are written.",
)
def report(quick: bool, docs_dir: Path) -> None:
    """Training quality and commit-coordination report (starts and stops its own workers)."""
    from agent_workers.tools import report as report_module

    report_module.run(_settings(), quick=quick, docs=docs_dir, progress=lambda line: click.echo(line))


@main.command()
@click.option("--requests", "n_requests", type=int, default=100_000, show_default=True, help="Predictions to send.")
@click.option(
    "--duration",
    type=float,
    default=300.0,
    show_default=True,
    help="Seconds to spread them over (ignored with --drain).",
)
@click.option(
    "--kill-every",
    type=float,
    default=30.0,
    show_default=True,
    help="Seconds between SIGKILLs of worker 0 (restarted at once); 0 = never.",
)
@click.option(
    "--kill-after-push",
    is_flag=True,
    help="Kill right after a push (the worst moment for a Redis broker) instead of on an independent clock.",
)
@click.option("--workers", type=int, default=2, show_default=True, help="Inference worker processes.")
@click.option("--drain", is_flag=True, help="Measure throughput instead: publish everything at once, time the drain.")
@click.option("--broker-url", default=None, help="Broker of the queue (default: the soak's own redis-server).")
@click.option(
    "--visibility-timeout",
    type=int,
    default=10,
    show_default=True,
    help="Seconds before a Redis broker redelivers a killed worker's messages.",
)
@click.option("--max-batch-size", type=int, default=64, show_default=True)
@click.option("--report-every", type=float, default=10.0, show_default=True, help="Seconds between progress lines.")
@click.option(
    "--out",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path("docs/benchmarks"),
    show_default=True,
    help="Where soak.json and soak.png are written.",
)
def soak(
    n_requests: int,
    duration: float,
    kill_every: float,
    kill_after_push: bool,
    workers: int,
    drain: bool,
    broker_url: str | None,
    visibility_timeout: int,
    max_batch_size: int,
    report_every: float,
    out: Path,
) -> None:
    """Sustained load with periodic worker SIGKILLs; counts sent, completed, lost, duplicated; tracks worker RSS."""
    from agent_workers.tools import soak as soak_module

    if workers < 1 or n_requests < 1:
        raise click.BadParameter("--workers and --requests must be at least 1")
    config = soak_module.SoakConfig(
        requests=n_requests,
        duration=duration,
        kill_every=0.0 if drain else kill_every,
        workers=workers,
        drain=drain,
        broker_url=broker_url,
        visibility_timeout=visibility_timeout,
        max_batch_size=max_batch_size,
        report_every=report_every,
        out=out,
        device=_settings().device,
        kill_after_push=kill_after_push,
    )
    result = soak_module.run(config, say=click.echo)
    if result["lost"] or result["failed"] or result["wrong"]:
        sys.exit(1)
