"""What the benchmark shows: progress lines, the result tables (console and markdown) and the files it writes."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from agent_workers.tools.bench.plots import latency_label, plot
from agent_workers.tools.bench.targets import ratio
from agent_workers.tools.stats import format_table, markdown_table

_T0 = time.monotonic()


def say(text: str) -> None:
    """A progress line, with seconds since the benchmark started."""
    print(f"[{time.monotonic() - _T0:7.1f}s] {text}", flush=True)


def report_tables(results: dict[str, Any]) -> list[tuple[str, list[str], list[list[Any]]]]:
    """The result tables as (title, headers, rows), for the console and the markdown summary."""
    main = [d for d in results["drains"] if d["role"] == "main"]
    by = {(d["system"], d["broker"], d["workload"]): d for d in main}
    drain_rows = []
    for d in main:
        naive = by.get(("naive", d["broker"], d["workload"]))
        cb = by.get(("celery-batches", d["broker"], d["workload"]))
        drain_rows.append(
            [
                d["workload"],
                d["broker"],
                d["system"],
                d["counted"],
                d["rate"],
                d["cpu_ms_per_request"],
                d["redis_cpu_ms_per_request"],
                d.get("mean_batch_size"),
                ratio(d["rate"], naive["rate"]) if naive else None,
                ratio(d["rate"], cb["rate"]) if cb else None,
                d.get("other_cpu_cores"),
                _spread(d),
            ]
        )
    raw = results["raw_torch"]
    sweep_rows = []
    for d in sorted(
        (d for d in results["drains"] if d["system"] == "ours" and d["role"] != "repeat"),
        key=lambda d: (d["workload"], d["broker"], d["max_batch_size"], d["role"] != "main", d.get("encoding", "")),
    ):
        r = d.get("raw_torch_rate") or raw.get(d["workload"], {}).get(str(d["max_batch_size"]))
        sweep_rows.append(
            [
                d["workload"],
                d["broker"],
                d["max_batch_size"],
                d.get("encoding", "json"),
                d["counted"],
                d["rate"],
                d["cpu_ms_per_request"],
                d.get("mean_batch_size"),
                d.get("mean_batch_compute_ms"),
                ratio(d.get("compute_seconds"), d.get("seconds")),
                r,
                ratio(d["rate"], r),
                ratio(d["rate"], d.get("raw_torch_sustained_rate")),
            ]
        )
    latency_rows = [
        [
            r["workload"],
            r["broker"],
            r["system"],
            latency_label(r, closed="closed C="),
            r["rate"],
            r.get("p50_ms"),
            r.get("p95_ms"),
            r.get("p99_ms"),
            r.get("max_ms"),
            r.get("mean_batch_size"),
            r.get("mean_batch_compute_ms"),
            r.get("bound_ms"),
        ]
        for r in results["latency"]
    ]
    target_rows = [
        [t["what"], t["target"], t["measured"], "met" if t["met"] else "MISSED" if t["met"] is False else "-"]
        for t in results["targets"]
    ]
    overload_rows = [
        [
            r["broker"],
            r["workload"],
            r["saturation_rate"],
            r["offered_rate"],
            cls,
            c["sent"],
            c["answered_share"],
            c["revoked_share"],
            c.get("p50_ms"),
            c.get("p99_ms"),
            c["budget_ms"],
            r["bound_ms"] if cls == "high" else None,
            r["late_answers"] if cls == "high" else None,
        ]
        for r in results.get("overload", [])
        for cls, c in r["classes"].items()
    ]
    cache_rows = [
        [
            r["broker"],
            r["n"],
            r["distinct"],
            run["cache_size"] or "off",
            run["req_per_s"],
            run["hit_rate"],
            run["deduplicated_in_batch"],
        ]
        for r in results.get("cache", [])
        for run in r["runs"]
    ]
    extra = []
    if overload_rows:
        extra.append(
            (
                "Overload: Poisson arrivals at a multiple of the drain rate, mixed priorities, every request with a "
                "deadline (latency over all answers, REVOKED ones included)",
                [
                    "broker",
                    "model",
                    "drain req/s",
                    "offered req/s",
                    "class",
                    "sent",
                    "answered",
                    "revoked",
                    "p50 ms",
                    "p99 ms",
                    "deadline ms",
                    "p99 bound",
                    "answered late",
                ],
                overload_rows,
            )
        )
    if cache_rows:
        extra.append(
            (
                "Result cache on a Zipf workload (drain, cache off against on)",
                ["broker", "requests", "distinct inputs", "cache", "req/s", "hit rate", "deduplicated in batch"],
                cache_rows,
            )
        )
    return [
        (
            "Drain: pre-filled queue, one worker",
            [
                "workload",
                "broker",
                "system",
                "requests",
                "req/s",
                "worker CPU ms/req",
                "Redis CPU ms/req",
                "mean batch",
                "x naive",
                "x celery-batches",
                "others' CPU (cores)",
                "runs (req/s)",
            ],
            drain_rows,
        ),
        (
            "Ours by max_batch_size and encoding (drain) against raw torch at the same batch size",
            [
                "workload",
                "broker",
                "max batch",
                "encoding",
                "requests",
                "req/s",
                "worker CPU ms/req",
                "mean batch",
                "ms/batch",
                "forward share",
                "raw torch req/s",
                "e2e / raw",
                "e2e / sustained raw",
            ],
            sweep_rows,
        ),
        (
            "Latency (ms)",
            [
                "workload",
                "broker",
                "system",
                "load",
                "req/s",
                "p50",
                "p95",
                "p99",
                "max",
                "mean batch",
                "ms/batch",
                "p99 bound",
            ],
            latency_rows,
        ),
        *extra,
        ("Targets (reported, not asserted)", ["what", "target", "measured", "verdict"], target_rows),
    ]


def _spread(d: dict[str, Any]) -> str:
    rates = d.get("rates_all") or []
    return f"{len(rates)}: {min(rates):,.0f}–{max(rates):,.0f}" if len(rates) > 1 else "1"


def print_tables(results: dict[str, Any]) -> None:
    """The tables and notes on the console."""
    print()
    for title, headers, rows in report_tables(results):
        print(title)
        print(format_table(headers, rows))
        print()
    for note in results["notes"]:
        print(f"note: {note}")


def write_outputs(results: dict[str, Any], out: Path, tag: str = "") -> list[Path]:
    """results{tag}.json, summary{tag}.md and the PNGs under ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    json_path = out / f"results{tag}.json"
    json_path.write_text(json.dumps(results, indent=1, default=str) + "\n")
    lines = []
    for title, headers, rows in report_tables(results):
        lines += [f"### {title}", "", markdown_table(headers, rows), ""]
    md_path = out / f"summary{tag}.md"
    md_path.write_text("\n".join(lines))
    return [json_path, md_path, *plot(results, out, tag)]
