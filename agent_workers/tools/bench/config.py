"""What a benchmark run measures: brokers, workloads, sizes, the batching policy, and where results go."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

DEFAULT_SWEEP = (1, 8, 32, 64, 128)
#: How each workload's requests travel unless ``encodings`` says: the mlp's 64 floats as a JSON list (what the
#: baselines take too), the heavy model's 1,024 as a float32 tensor in base64 (what the Client sends for numpy).
DEFAULT_ENCODINGS = {"mlp": "json", "heavy": "b64", "wide": "json"}


@dataclasses.dataclass(frozen=True, kw_only=True)
class BenchConfig:
    """What to run. Sizes are per workload: ``n`` and friends for ``mlp``, ``heavy_*`` for ``heavy``.

    Attributes:
        n: requests pre-filled for our drain (mlp).
        baseline_n: requests for the naive and celery-batches drains (mlp; None: same as ``n``).
        sweep_n: requests per point of the max_batch_size sweep (mlp).
        heavy_n / heavy_small_n: our drain / the baselines and sweep points of the heavy model.
        concurrency: closed-loop producer counts.
        repeat: drains of ours per broker and workload; the median one is reported, all are kept in the JSON.
        duration: seconds measured per latency run (after a 1 s warm-up).
        fill: ``producer`` builds every message as a bare Celery producer sends it (``send_task`` with kwargs,
            full-precision random inputs, ``as_task_v2`` per message); ``fast`` reuses 256 rounded templates with
            positional arguments (cheaper to decode: flatters the worker by ~1.5x).
        idle_duration: seconds measured per C=1 run of ours and of the Celery no-op task.
        overload_n: requests of the drain that measures the ``wide`` model's saturation rate before the overload run.
        overload_factor / overload_high_share / overload_duration: the overload run's offered rate (× saturation),
            its share of high-priority requests, and its measured seconds (after a 1 s warm-up).
        cache_n / cache_distinct: requests and distinct inputs of the Zipf workload of the cache run.
        encodings: how our drains' requests travel (``json``, ``b64``, ``msgpack``; ``fill="producer"`` only): the
            first is the main drain's, each further one gets its own drains in the same sitting (``repeat`` times,
            alternating), each against a raw torch rate measured just before it. Empty: the workload's default
            (:data:`DEFAULT_ENCODINGS`).
    """

    brokers: tuple[str, ...] = ("redis", "rabbitmq")
    workloads: tuple[str, ...] = ("mlp", "heavy")
    n: int = 20_000
    baseline_n: int | None = None
    sweep_n: int = 5_000
    heavy_n: int = 4_000
    heavy_small_n: int = 1_000
    sweep: tuple[int, ...] = DEFAULT_SWEEP
    concurrency: tuple[int, ...] = (32,)
    duration: float = 5.0
    max_batch_size: int = 64
    max_wait_ms: float = 5.0
    with_celery_batches: bool = False
    skip: frozenset[str] = frozenset()
    redis_url: str = "redis://127.0.0.1:6379/0"
    amqp_url: str = "amqp://guest:guest@127.0.0.1:5672//"
    result_backend: str = "redis://127.0.0.1:6379/1"
    params_url: str = "redis://127.0.0.1:6379/2"
    device: str = "cpu"
    torch_threads: int = 1
    out: Path = Path("docs/benchmarks")
    tag: str = ""
    profile: Path | None = None
    repeat: int = 1
    fill: str = "producer"
    idle_duration: float = 5.0
    overload_n: int = 3_000
    overload_factor: float = 2.0
    overload_high_share: float = 0.2
    overload_duration: float = 10.0
    cache_n: int = 20_000
    cache_distinct: int = 2_000
    encodings: tuple[str, ...] = ()

    @classmethod
    def quick(cls, **overrides: Any) -> BenchConfig:
        """CI-sized: small drains, two sweep points, 2 s latency runs."""
        sizes: dict[str, Any] = {
            "n": 2_000,
            "baseline_n": 1_000,
            "sweep_n": 1_000,
            "heavy_n": 400,
            "heavy_small_n": 150,
            "sweep": (1, 64),
            "duration": 2.0,
            "idle_duration": 2.0,
            "overload_n": 600,
            "overload_duration": 3.0,
            "cache_n": 3_000,
            "cache_distinct": 300,
            "tag": "-quick",
        }
        sizes.update(overrides)
        return cls(**sizes)

    def sizes(self, workload: str) -> tuple[int, int, int]:
        """(our drain, baseline drains, sweep point) request counts for ``workload``."""
        if workload == "heavy":
            return self.heavy_n, self.heavy_small_n, self.heavy_small_n
        return self.n, self.baseline_n or self.n, self.sweep_n

    def encodings_of(self, workload: str) -> tuple[str, ...]:
        """The encodings our drains of ``workload`` use, the main drain's first."""
        return self.encodings or (DEFAULT_ENCODINGS.get(workload, "json"),)

    def broker_url(self, broker: str) -> str:
        return self.redis_url if broker == "redis" else self.amqp_url

    def as_json(self) -> dict[str, Any]:
        """The configuration as it goes into results.json (tuples as lists, paths as strings)."""
        return {
            k: (list(v) if isinstance(v, (tuple, frozenset)) else str(v) if isinstance(v, Path) else v)
            for k, v in dataclasses.asdict(self).items()
        }
