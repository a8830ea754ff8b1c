"""The benchmark's figures: throughput against max_batch_size (with raw torch and the baselines), latency CDFs, the
overload run's latency per priority class, the result cache off against on."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any


def latency_label(r: dict[str, Any], closed: str = "C=") -> str:
    """How a latency run's load reads in tables and legends: ``C=32``, or ``open 1,800/s (1/2 drain)``."""
    if r["mode"] == "closed":
        return f"{closed}{r['concurrency']}"
    basis = {"drain": " (1/2 drain)", "closed-loop max": " (1/2 closed max)"}.get(r.get("open_basis") or "", "")
    return f"open {r['offered_rate']:,.0f}/s{basis}"


def _formatters() -> tuple[Any, Any]:
    """Tick labels: plain numbers, and for the minor ticks of a log axis only 2× and 5× a power of ten."""
    from matplotlib.ticker import FuncFormatter

    plain = FuncFormatter(lambda v, _: f"{v:,.0f}" if v >= 1 else f"{v:g}")
    sparse = FuncFormatter(lambda v, _: plain(v) if v > 0 and f"{v:e}"[0] in "25" else "")
    return plain, sparse


def plot(results: dict[str, Any], out: Path, tag: str = "") -> list[Path]:
    """throughput-vs-batch-size, latency-cdf, overload and cache-zipf PNGs (those with data); returns their paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plain, sparse = _formatters()

    def finish(ax: Any, xlabel: str, title: str) -> None:
        ax.set_xlabel(xlabel)
        ax.set_title(title)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)

    paths = []
    workloads = list(results["workloads"])
    if workloads:
        paths.append(_plot_throughput(results, workloads, out / f"throughput-vs-batch-size{tag}.png", plt, finish))

    panels = sorted(
        {(r["workload"], r["broker"]) for r in results["latency"]},
        key=lambda p: (workloads.index(p[0]) if p[0] in workloads else 99, p[1]),
    )
    if panels:
        cols = min(2, len(panels))
        rows = math.ceil(len(panels) / cols)
        fig, axes = plt.subplots(rows, cols, figsize=(6.5 * cols, 4.2 * rows), squeeze=False)
        for ax, (workload, broker) in zip(axes.flat, panels, strict=False):
            for r in results["latency"]:
                if (r["workload"], r["broker"]) != (workload, broker) or not r.get("cdf"):
                    continue
                ax.plot([p[0] for p in r["cdf"]], [p[1] for p in r["cdf"]], label=f"{r['system']} {latency_label(r)}")
                if r.get("bound_ms"):
                    first = not any(line.get_label().startswith("p99 goal") for line in ax.get_lines())
                    ax.axvline(
                        r["bound_ms"],
                        color="gray",
                        ls=":",
                        lw=1,
                        label="p99 goal at half saturation" if first else "_nolegend_",
                    )
            ax.set_xscale("log")
            ax.xaxis.set_major_formatter(plain)
            ax.xaxis.set_minor_formatter(sparse)
            ax.set_ylabel("fraction of requests")
            finish(ax, "latency (ms), send to result stored", f"{workload} on {broker}")
        for ax in list(axes.flat)[len(panels) :]:
            ax.set_visible(False)
        fig.tight_layout()
        paths.append(out / f"latency-cdf{tag}.png")
        fig.savefig(paths[-1], dpi=110)
        plt.close(fig)
    if any(d["role"] == "encoding" for d in results["drains"]):
        paths.append(out / f"encodings{tag}.png")
        _plot_encodings(results["drains"], paths[-1], plt)
    paths += _plot_overload(results, out, tag, plt, finish)
    if results.get("cache"):
        paths.append(out / f"cache-zipf{tag}.png")
        _plot_cache(results["cache"], paths[-1], plt)
    return paths


def _plot_throughput(results: dict[str, Any], workloads: list[str], path: Path, plt: Any, finish: Any) -> Path:
    """throughput-vs-batch-size: per workload, ours by max_batch_size, raw torch and the baselines."""
    plain, sparse = _formatters()
    fig, axes = plt.subplots(1, len(workloads), figsize=(6.5 * len(workloads), 4.5), squeeze=False)
    for ax, workload in zip(axes[0], workloads, strict=True):
        ours = [
            d
            for d in results["drains"]
            if d["system"] == "ours" and d["workload"] == workload and d["role"] != "repeat"
        ]
        for broker in sorted({d["broker"] for d in ours}):
            points = sorted({d["max_batch_size"]: d["rate"] for d in ours if d["broker"] == broker}.items())
            ax.plot([p[0] for p in points], [p[1] for p in points], "o-", label=f"ours ({broker})")
        raw = results["raw_torch"].get(workload, {})
        if raw:
            sizes = sorted(int(k) for k in raw)
            ax.plot(sizes, [raw[str(k)] for k in sizes], "k:", label="raw torch forward (in-process)")
        for d in results["drains"]:
            if d["workload"] == workload and d["system"] != "ours" and d["role"] == "main":
                ax.axhline(
                    d["rate"],
                    ls="--",
                    lw=1,
                    color="tab:red" if d["system"] == "naive" else "tab:purple",
                    alpha=0.6 if d["broker"] == "redis" else 0.35,
                )
                ax.annotate(f"{d['system']} ({d['broker']})", (1, d["rate"]), fontsize=7, va="bottom")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.xaxis.set_major_formatter(plain)
        ax.yaxis.set_major_formatter(plain)
        ax.yaxis.set_minor_formatter(sparse)
        ax.set_ylabel("requests / s (drain)")
        finish(ax, "max_batch_size", f"{workload}: throughput vs max_batch_size")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _plot_overload(results: dict[str, Any], out: Path, tag: str, plt: Any, finish: Any) -> list[Path]:
    """overload.png: per broker, the latency CDF of each priority class, with the high class's bound."""
    runs = results.get("overload") or []
    if not runs:
        return []
    fig, axes = plt.subplots(1, len(runs), figsize=(6.5 * len(runs), 4.2), squeeze=False)
    for ax, r in zip(axes[0], runs, strict=True):
        for cls, color in (("high", "tab:green"), ("low", "tab:orange")):
            c = r["classes"][cls]
            if c.get("cdf"):
                label = f"{cls} priority ({c['answered_share']:.0%} answered, deadline {c['budget_ms']:.0f} ms)"
                ax.plot([p[0] for p in c["cdf"]], [p[1] for p in c["cdf"]], color=color, label=label)
        ax.axvline(r["bound_ms"], color="gray", ls=":", lw=1, label=f"high-priority p99 bound {r['bound_ms']:.0f} ms")
        ax.set_xscale("log")
        ax.set_ylabel("fraction of requests")
        finish(
            ax,
            "latency (ms), send to final answer (REVOKED included)",
            f"{r['broker']}: {r['offered_rate']:,.0f} req/s offered = {r['factor']:g}x drain",
        )
    fig.tight_layout()
    path = out / f"overload{tag}.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return [path]


def _plot_cache(runs: list[dict[str, Any]], path: Path, plt: Any) -> None:
    """Drain throughput with the result cache off and on, per broker, with the hit rate on each bar."""
    fig, ax = plt.subplots(figsize=(6.5, 4.0))
    width = 0.38
    for i, r in enumerate(runs):
        for j, run in enumerate(r["runs"]):
            x = i + (j - 0.5) * width
            ax.bar(
                x,
                run["req_per_s"],
                width,
                color="#888" if j == 0 else "#2a7",
                label=None if i else ("cache off" if j == 0 else f"cache {run['cache_size']}"),
            )
            if j:
                ax.annotate(f"{run['hit_rate']:.0%} hits", (x, run["req_per_s"]), ha="center", va="bottom", fontsize=8)
    ax.set_xticks(range(len(runs)), [r["broker"] for r in runs])
    ax.set_ylabel("requests / s (drain)")
    first = runs[0]
    ax.set_title(
        f"Zipf workload: {first['n']:,} requests over {first['distinct']:,} inputs (s={first['zipf_exponent']})"
    )
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _plot_encodings(drains: list[dict[str, Any]], path: Path, plt: Any) -> None:
    """encodings: per workload and broker, each drain of ours at the main batch size as end to end / raw torch
    (the raw rate measured just before it), grouped by how its requests travelled; the 90 % goal dashed."""
    ours = [d for d in drains if d["system"] == "ours" and d["role"] in ("main", "repeat", "encoding")]
    panels = sorted({(d["workload"], d["broker"]) for d in ours})
    fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 3.8), squeeze=False)
    for ax, (workload, broker) in zip(axes[0], panels, strict=True):
        mine = [d for d in ours if (d["workload"], d["broker"]) == (workload, broker) and d.get("raw_torch_rate")]
        encodings = list(dict.fromkeys(d.get("encoding", "json") for d in mine))
        for i, encoding in enumerate(encodings):
            ratios = [d["rate"] / d["raw_torch_rate"] for d in mine if d.get("encoding", "json") == encoding]
            ax.bar([i + 0.8 * (j / max(1, len(ratios)) - 0.4) for j in range(len(ratios))], ratios,
                   0.8 / max(1, len(ratios)), align="edge", color=f"C{i}")  # fmt: skip
        ax.axhline(0.9, color="#333", ls="--", lw=0.8, label="goal 90 %")
        ax.set_xticks(range(len(encodings)), encodings)
        ax.set_ylabel("end to end / raw torch (each drain)")
        ax.set_title(f"{workload} on {broker}")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
