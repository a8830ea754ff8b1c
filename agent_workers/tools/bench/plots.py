"""The benchmark's figures: throughput against max_batch_size (with raw torch and the baselines), latency CDFs."""

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


def plot(results: dict[str, Any], out: Path, tag: str = "") -> list[Path]:
    """throughput-vs-batch-size and latency-cdf PNGs; returns their paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter

    plain = FuncFormatter(lambda v, _: f"{v:,.0f}" if v >= 1 else f"{v:g}")
    # minor ticks of a log axis: label only 2× and 5× a power of ten, so short ranges still read
    sparse = FuncFormatter(lambda v, _: plain(v) if v > 0 and f"{v:e}"[0] in "25" else "")

    def finish(ax: Any, xlabel: str, title: str) -> None:
        ax.set_xlabel(xlabel)
        ax.set_title(title)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)

    paths = []
    workloads = list(results["workloads"])
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
    paths.append(out / f"throughput-vs-batch-size{tag}.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)

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
    return paths
