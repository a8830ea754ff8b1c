"""The project's own tools: the demo, benchmarks, the training report and the soak test."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import click

from agent_workers.cli._base import settings as _settings


@click.command()
def demo() -> None:
    """Train the seed's linear regression through the queue and score 1,000 held-out rows (the main job)."""
    from agent_workers.tools import demo as demo_module

    demo_module.main(_settings())


@click.command()
@click.option("--broker", type=click.Choice(["redis", "rabbitmq", "both"]), default="both", show_default=True)
@click.option(
    "--workload",
    type=click.Choice(["mlp", "heavy", "both", "text", "image"]),
    default="both",
    show_default=True,
    help="mlp: 64-256-256-10; heavy: 1024-4096-4096-1024 (25M parameters, weight-bound); text: token ids of "
    "8-512 to a transformer encoder, length-aware against FIFO batching (its own runs: --n, 3,000 by default); "
    "image: uint8 3x64x64 images to a small CNN in each encoding (json, b64, msgpack), against its forward pass "
    "(run alone).",
)
@click.option(
    "--image-n", type=int, default=3_000, show_default=True, help="Images per drain (image; a fifth for json)."
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
@click.option(
    "--skip",
    multiple=True,
    type=click.Choice(["baselines", "sweep", "latency", "idle", "overload", "cache"]),
    help="Leave a part out.",
)
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
    "--fill",
    type=click.Choice(["producer", "fast"]),
    default="producer",
    show_default=True,
    help="producer: each message built as a bare Celery producer sends it (send_task with kwargs, full-precision "
    "random inputs, as_task_v2 per message); fast: 256 rounded templates with positional arguments.",
)
@click.option(
    "--encoding",
    "encodings",
    default="",
    help="How our drains' requests travel, a comma list of json, b64, msgpack (mlp and heavy): the first is the "
    "main drain's, each further one is drained in the same sitting against raw torch [default: json for mlp, b64 "
    "for heavy].",
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
    image_n: int,
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
    fill: str,
    encodings: str,
) -> None:
    """Benchmark our batcher against a per-request Celery task (and celery-batches) on Redis and RabbitMQ: drains,
    latency (C=1 against a Celery no-op task), the heavy model against raw torch, an overload run with priorities and
    deadlines, and the result cache on a Zipf workload."""
    from agent_workers.tools import bench as bench_module

    settings = _settings()
    if settings.malloc_tuning:  # every raw forward pass measured here runs on the allocator the worker has
        from agent_workers.worker import allocator

        allocator.tune()
    if workload == "image":
        from agent_workers.tools.bench import image

        image_n = 600 if quick and image_n == 3_000 else image_n
        urls = {"redis": redis_url, "rabbitmq": amqp_url}
        brokers = {b: urls[b] for b in (("redis", "rabbitmq") if broker == "both" else (broker,))}
        image.run(
            settings,
            out=out,
            tag="-quick" if quick else "",
            brokers=brokers,
            n=image_n,
            json_n=max(image_n // 5, 8 * max_batch_size),  # at least 8 batches, for a rate between them
            max_batch_size=max_batch_size,
        )
        return
    ctx = click.get_current_context()
    if workload == "text":
        from agent_workers.tools.bench import text

        given = ctx.get_parameter_source("n") == click.core.ParameterSource.COMMANDLINE
        short = quick and ctx.get_parameter_source("duration") != click.core.ParameterSource.COMMANDLINE
        urls = {"redis": redis_url, "rabbitmq": amqp_url}
        text.run(
            {b: urls[b] for b in (("redis", "rabbitmq") if broker == "both" else (broker,))},
            settings,
            n=n if given else (600 if quick else 3000),
            max_batch_size=max_batch_size,
            duration=2.0 if short else duration,
            out=out,
            tag="-quick" if quick else "",
            say=click.echo,
        )
        return
    from agent_workers.tools.bench.messages import ENCODINGS

    chosen = tuple(e.strip() for e in encodings.split(",") if e.strip())
    if any(e not in ENCODINGS for e in chosen):
        raise click.BadParameter(
            f"each must be one of {', '.join(ENCODINGS)}, got {encodings!r}", param_hint="--encoding"
        )
    options: dict[str, Any] = {
        "encodings": chosen,
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
        "fill": fill,
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


@click.command("bench-cache")
@click.option("--n", "n", type=int, default=20_000, show_default=True, help="Requests per drain.")
@click.option("--distinct", type=int, default=2_000, show_default=True, help="Distinct inputs they are drawn from.")
@click.option("--zipf", "exponent", type=float, default=1.1, show_default=True, help="Zipf exponent of the draw.")
@click.option("--cache-size", type=int, default=10_000, show_default=True, help="AGENT_WORKERS_RESULT_CACHE_SIZE.")
@click.option(
    "--out", type=click.Path(file_okay=False, path_type=Path), default=Path("docs/benchmarks"), show_default=True
)
def bench_cache(n: int, distinct: int, exponent: float, cache_size: int, out: Path) -> None:
    """The result cache on a Zipf workload: hit rate and throughput, cache on against off (one broker)."""
    from agent_workers.tools.bench import cache

    cache.run(_settings(), n=n, distinct=distinct, exponent=exponent, cache_size=cache_size, out=out, say=click.echo)


@click.command("bench-producer")
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


@click.command()
@click.option("--quick", is_flag=True, help="A small smoke run (minutes less; numbers not representative).")
@click.option(
    "--docs",
    "docs_dir",
    default="docs",
    show_default=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="Where training.md and benchmarks/training*.{json,png} are written.",
)
@click.option(
    "--part",
    "parts",
    multiple=True,
    type=click.Choice(["main", "queued", "zoo"]),
    help="Run only these parts (repeatable): main = quality, coordination and fetch; queued = every step queued "
    "at once, 1/2/4 trainers; zoo = the example CNN and transformer (examples/models/zoo.py) through the queue "
    "against one process. Default: all.",
)
def report(quick: bool, docs_dir: Path, parts: tuple[str, ...]) -> None:
    """Training quality and commit-coordination report (starts and stops its own workers)."""
    from agent_workers.tools import report as report_module

    report_module.run(
        _settings(),
        quick=quick,
        docs=docs_dir,
        progress=lambda line: click.echo(line),
        parts=parts or report_module.PARTS,
    )


@click.command()
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
