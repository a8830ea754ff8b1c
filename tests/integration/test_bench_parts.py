"""The benchmark's overload, cache, image and heavy parts, run for real at a tiny size: the overload part on both
brokers (its RabbitMQ priority queue included), the cache and image parts on Redis (on RabbitMQ too in `make
test-all`), the heavy one on Redis. Every request the overload run sends gets a final answer, the priorities reach
the worker as the broker means them, and the outputs (JSON with goals and verdicts, PNGs) are written. Figures are
not asserted: they belong to docs/benchmarks.md."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from agent_workers.tools import bench
from tests.conftest import REDIS_BY_DEFAULT

pytestmark = pytest.mark.integration
#: the parts a run of no workload can have; run_part skips all but one
PARTS = frozenset({"baselines", "sweep", "latency", "idle", "overload", "cache"})


def run_part(part: str, broker: str, out: Path, **sizes: Any) -> tuple[dict[str, Any], set[str]]:
    """Run the benchmark's ``part`` alone (quick sizes, then ``sizes``): its results, and the targets it judged."""
    config = bench.BenchConfig.quick(brokers=(broker,), workloads=(), skip=PARTS - {part}, out=out, **sizes)
    results = bench.run(config)
    verdicts = {t["what"] for t in json.loads((out / "results-quick.json").read_text())["targets"]}
    return results, verdicts


def test_overload_part_answers_everything_and_writes_its_verdict(broker: str, tmp_path: Path) -> None:
    results, verdicts = run_part("overload", broker, tmp_path, overload_n=200, overload_duration=1.0)
    (overload,) = results["overload"]
    high, low = overload["classes"]["high"], overload["classes"]["low"]
    assert high["sent"] > 0 and low["sent"] > 0
    assert overload["unanswered"] == 0, "a request of the overload run got no final answer"
    assert overload["answered_twice"] == 0
    answered = sum(sum(c["states"].values()) for c in (high, low))
    assert answered == high["sent"] + low["sent"]
    assert set(high["states"]) | set(low["states"]) <= {"SUCCESS", "REVOKED"}
    assert any("high-priority p99" in what for what in verdicts)
    for name in ("overload-quick.png", "summary-quick.md"):
        assert (tmp_path / name).stat().st_size > 0


@REDIS_BY_DEFAULT  # the cache part has no broker-specific code; test_serving's result-cache tests run on both brokers
def test_cache_part_hits_repeats_and_writes_its_verdict(broker: str, tmp_path: Path) -> None:
    results, verdicts = run_part("cache", broker, tmp_path, cache_n=400, cache_distinct=40)
    (cache,) = results["cache"]
    assert [r["cache_size"] for r in cache["runs"]] == [0, 10_000]
    assert cache["runs"][1]["hit_rate"] > 0.5  # 400 requests over 40 inputs: most are repeats
    assert any("cache on / off" in what for what in verdicts)
    for name in ("cache-zipf-quick.png", "summary-quick.md"):
        assert (tmp_path / name).stat().st_size > 0


@REDIS_BY_DEFAULT  # no broker-specific code; each encoding's RabbitMQ path: test_msgpack, test_tensors (both brokers)
def test_image_part_drains_every_encoding_and_writes_its_figures(broker: str, tmp_path: Path) -> None:
    from agent_workers.config import Settings
    from agent_workers.tools.bench import image
    from tests.conftest import BROKERS, pool_env

    settings = Settings.from_env(pool_env(broker))
    model = image.MODELS[0] if broker == "redis" else image.MODELS[1]  # one CNN per broker: both served, half the time
    report = image.run(
        settings,
        out=tmp_path,
        tag="-t",
        brokers={broker: BROKERS[broker]},
        n=96,
        json_n=96,
        max_batch_size=16,
        models=(model,),
    )
    assert [r["encoding"] for r in report["runs"]] == list(image.ENCODINGS)
    assert {r["architecture"] for r in report["runs"]} == {model} and list(report["models"]) == [model]
    for run in report["runs"]:  # the fixed cost is what the worker spent beyond the model's own forward pass
        assert run["fixed_ms_per_image"] == run["cpu_ms_per_image"] - report["models"][model]["forward_ms_per_image"]
    for run in report["runs"]:  # every image answered (collect raises otherwise), a rate between batches
        # CPU is sampled every 50 ms at /proc's 10 ms ticks: a drain this small may read as 0
        assert run["counted"] >= 16 and run["rate"] > 0 and run["cpu_ms_per_image"] >= 0, run
    ratios = {r["encoding"]: r["message_ratio"] for r in report["runs"]}
    assert ratios["msgpack"] < ratios["b64"] < 1.5 < ratios["json"] < ratios["json-float"]
    assert json.loads((tmp_path / "image-t.json").read_text())["runs"] == report["runs"]
    assert (tmp_path / "image-t.png").stat().st_size > 0


def test_heavy_drains_in_each_encoding_and_c1_runs_answer_everything(tmp_path: Path) -> None:
    # every encoding's drain is served in full, and the C=1 runs after them build their messages too (the latency
    # runs once called the message factory without an encoding and stopped the benchmark)
    config = bench.BenchConfig.quick(
        brokers=("redis",),
        workloads=("heavy",),
        encodings=("b64", "json", "msgpack"),
        skip=frozenset({"baselines", "sweep", "latency", "overload", "cache"}),
        heavy_n=130,
        idle_duration=0.5,
        out=tmp_path,
    )
    results = bench.run(config)
    drains = {d["encoding"]: d for d in results["drains"] if d["system"] == "ours"}
    assert set(drains) == {"b64", "json", "msgpack"}
    assert all(d["stored"] == 130 and d["failed"] == 0 for d in drains.values())
    assert drains["b64"]["role"] == "main" and drains["msgpack"]["role"] == "encoding"
    assert {(r["system"], r["concurrency"]) for r in results["latency"]} == {("ours", 1), ("noop", 1)}
    assert all(r["count"] > 0 for r in results["latency"])
    assert (tmp_path / "encodings-quick.png").stat().st_size > 0
