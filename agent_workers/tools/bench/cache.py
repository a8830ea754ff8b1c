"""The result cache on a Zipf workload: hit rate and throughput with the cache on against off, in one run.

A worker is started twice on the same broker (``AGENT_WORKERS_RESULT_CACHE_SIZE`` = 0, then the chosen size), each
time draining the same queued requests: ``n`` predictions whose inputs are drawn from ``distinct`` rows with Zipf
weights (a few rows are asked for again and again, as popular items are). Throughput is requests over the drain's
wall time (from the first result to the last, so worker start-up is not counted); the hit rate comes from the
worker's own ``agent_workers_result_cache_lookups_total`` counter; in-batch duplicates (computed once even with the
cache off) from ``agent_workers_deduplicated_total``. Written to ``docs/benchmarks/cache.json`` and ``cache.png``.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from agent_workers.client import Client
from agent_workers.config import Settings
from agent_workers.models import make_spec
from agent_workers.store.params import RedisParamStore
from agent_workers.tools.supervisor import WorkerProcess, derive_settings, free_port

WIDTH = 32
HIDDEN = [2048, 2048]  # weight-bound enough that a skipped forward pass shows


def zipf_rows(n: int, distinct: int, exponent: float, seed: int = 0) -> np.ndarray:
    """``n`` rows drawn from ``distinct`` random rows with probability ∝ 1 / rank ** ``exponent``."""
    rng = np.random.default_rng(seed)
    pool = rng.standard_normal((distinct, WIDTH)).astype(np.float32)
    weights = 1.0 / np.arange(1, distinct + 1) ** exponent
    return pool[rng.choice(distinct, size=n, p=weights / weights.sum())]


def _drain(settings: Settings, model: str, rows: np.ndarray, cache_size: int, say: Callable[[str], None]) -> dict:
    port = free_port()
    worker_settings = derive_settings(settings, result_cache_size=cache_size, metrics_port=port)
    client = Client(worker_settings)
    ids = client.send_predict_bulk(model, rows)  # queued before the worker starts: a pure drain
    worker = WorkerProcess(queues=[worker_settings.inference_queue], env=worker_settings.to_env())
    arrivals: list[float] = []
    try:
        worker.start()
        client.collect(ids, timeout=600, on_result=lambda _i: arrivals.append(time.perf_counter()))
        seconds = max(arrivals) - min(arrivals)
        metrics = _samples(port)
    finally:
        worker.stop()
        client.close()
    hits = metrics.get(("agent_workers_result_cache_lookups_total", "hit"), 0.0)
    lookups = hits + metrics.get(("agent_workers_result_cache_lookups_total", "miss"), 0.0)
    row = {
        "cache_size": cache_size,
        "requests": len(rows),
        "seconds": round(seconds, 3),
        "req_per_s": round((len(rows) - 1) / seconds, 1),
        "hit_rate": round(hits / lookups, 4) if lookups else 0.0,
        "deduplicated_in_batch": int(metrics.get(("agent_workers_deduplicated_total", ""), 0.0)),
    }
    say(f"  cache {cache_size:>6}: {row['req_per_s']:>8} req/s, hit rate {row['hit_rate']:.1%}")
    return row


def _samples(port: int) -> dict[tuple[str, str], float]:
    """The worker's counters by (sample name, ``outcome`` label), summed over models."""
    from urllib.request import urlopen

    from prometheus_client.parser import text_string_to_metric_families

    text = urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    sums: dict[tuple[str, str], float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            key = (sample.name, sample.labels.get("outcome", ""))
            sums[key] = sums.get(key, 0.0) + sample.value
    return sums


def measure(
    settings: Settings | None = None,
    *,
    n: int = 20_000,
    distinct: int = 2_000,
    exponent: float = 1.1,
    cache_size: int = 10_000,
    say: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Drain the same Zipf workload with the cache off and on, on ``settings``' broker; returns the figures."""
    base = settings or Settings.from_env()
    ns = "bc" + uuid.uuid4().hex[:8]
    base = derive_settings(base, namespace=ns, inference_queue=f"{ns}.inference", training_queue=f"{ns}.training")
    store = RedisParamStore.from_settings(base)
    model = "zipf-mlp"
    store.create(model, make_spec("mlp", in_features=WIDTH, hidden=HIDDEN, out_features=10))
    rows = zipf_rows(n, distinct, exponent)
    say(f"cache benchmark: {n} requests over {distinct} distinct inputs (Zipf s={exponent}), broker {base.broker_url}")
    try:
        runs = [_drain(base, model, rows, 0, say), _drain(base, model, rows, cache_size, say)]
    finally:
        store.delete(model)
    return {
        "broker_url": base.broker_url,
        "n": n,
        "distinct": distinct,
        "zipf_exponent": exponent,
        "runs": runs,
        "speedup": round(runs[1]["req_per_s"] / runs[0]["req_per_s"], 2),
    }


def run(settings: Settings | None = None, *, out: Path = Path("docs/benchmarks"), **options: Any) -> dict[str, Any]:
    """:func:`measure`, then write cache.json and cache.png under ``out``; returns the figures."""
    say = options.get("say", print)
    report = measure(settings, **options)
    out.mkdir(parents=True, exist_ok=True)
    (out / "cache.json").write_text(json.dumps(report, indent=2) + "\n")
    plot(report, out / "cache.png")
    say(f"cache on / off throughput: {report['speedup']}x; written {out / 'cache.json'}, {out / 'cache.png'}")
    return report


def plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.5))
    labels = [f"cache {r['cache_size']}" if r["cache_size"] else "cache off" for r in report["runs"]]
    left.bar(labels, [r["req_per_s"] for r in report["runs"]], color=["#888", "#2a7"])
    left.set_ylabel("requests / s (drain: first to last result)")
    right.bar(labels, [100 * r["hit_rate"] for r in report["runs"]], color=["#888", "#2a7"])
    right.set_ylabel("result cache hit rate, %")
    fig.suptitle(
        f"Zipf workload: {report['n']} requests over {report['distinct']} inputs (s={report['zipf_exponent']})"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
