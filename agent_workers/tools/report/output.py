"""What the report writes: the markdown tables spliced into docs/training.md, the figure, and the environment."""

from __future__ import annotations

import os
import platform
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from agent_workers.tools.report.lab import ACCURACY_GOAL, MSE_GOAL, Lab
from agent_workers.tools.stats import markdown_table as _markdown_table

BEGIN_MARK = "<!-- report:begin -->"
END_MARK = "<!-- report:end -->"


def significant(value: Any) -> str:
    """A report cell: floats to four significant digits (thousands and up as whole numbers), the rest as they are."""
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) < 1000 else f"{value:,.0f}"
    return str(value)


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A markdown table of :func:`significant` cells (:func:`agent_workers.tools.stats.markdown_table`)."""
    return _markdown_table(headers, rows, cell=significant)


def render_tables(report: dict[str, Any]) -> str:
    """The markdown that goes between the report markers of docs/training.md."""
    env = report["environment"]
    if "load_average_at_start" in env:
        load = (
            f"1-minute load average {env['load_average_at_start'][0]} at the start and "
            f"{env.get('load_average_at_end', ['?'])[0]} at the end"
        )
    else:
        load = "load average not recorded"
    parts = [
        f"Measured {report['finished']} on {env['machine']} ({env['cpus']} CPUs, {load}; a shared machine "
        f"makes rates rough), broker `{env['broker']}`, Redis {env['redis']}, torch {env['torch']}, "
        f"τ = {env['max_staleness']}. Regenerate with `agent-workers report`."
    ]
    parts.append(
        "\n**Linear regression through the queue** (seed data, SGD lr 0.05, batch 100, "
        f"{report['plan']['linear_epochs']} epochs, one `train_step` message per mini-batch from a bare Celery "
        f"producer; goal: test MSE <= {MSE_GOAL} x floor)\n"
    )
    parts.append(
        markdown_table(
            [
                "path",
                "trainer processes",
                "test MSE",
                "floor",
                "ratio",
                "goal met",
                "steps/s",
                "conflict rate",
                "max staleness",
            ],
            [
                [
                    r.get("path", "per-step"),
                    r["trainers"],
                    r["test_mse"],
                    r["floor_mse"],
                    r["ratio"],
                    "yes" if r["meets_goal"] else "NO",
                    r["steps_per_s"],
                    r["conflict_rate"],
                    r["max_staleness"],
                ]
                for r in report["linear"]
            ],
        )
    )
    d = report["digits"]
    parts.append(
        f"\n**Digits MLP** ({d['hidden']} hidden, Adam lr {d['hparams']['lr']}, batch {d['batch_size']}, "
        f"{d['epochs']} epochs, {d['test_rows']} test rows; goal: >= {ACCURACY_GOAL:.0%} and within "
        "1 point of the torch loop)\n"
    )
    parts.append(
        markdown_table(
            ["run", "accuracy", "gap (points)", "goal met", "steps/s", "conflict rate", "recomputed"],
            [
                ["single-process torch loop", d["torch_accuracy"], "", "", "", "", ""],
                [
                    f"{d['trainers']} trainers through the queue",
                    d["accuracy"],
                    d["gap_points"],
                    "yes" if d["meets_goal"] else "NO",
                    d["steps_per_s"],
                    d["conflict_rate"],
                    d["recomputed"],
                ],
            ],
        )
    )
    parts.append(
        f"\n**Commit coordination** ({report['plan']['commit_steps']} digits steps, all enqueued at once; "
        "per-step: one commit per step; grouped: group commits of up to k steps; conflict rate per step's commit "
        "attempt; latency = step (or group) start, lock wait included, to commit; staleness: steps per value)\n"
    )
    parts.append(
        markdown_table(
            [
                "path",
                "mode",
                "trainers",
                "processes x threads",
                "steps/s",
                "commits",
                "conflict rate",
                "recomputed",
                "p50 ms",
                "p99 ms",
                "staleness",
            ],
            [
                [
                    f"{r.get('path', 'per-step')} (k={r.get('group', 1)})",
                    r["mode"],
                    r["trainers"],
                    f"{r['processes']} x {r['threads']}",
                    r["steps_per_s"],
                    r.get("commits", ""),
                    r["conflict_rate"],
                    r["recomputed"],
                    r["latency_p50_ms"],
                    r["latency_p99_ms"],
                    " ".join(f"{k}:{v}" for k, v in r.get("staleness", {}).items()),
                ]
                for r in report["coordination"]
            ],
        )
    )
    parts.append(
        "\n**Parameter fetch** (MLP with one hidden layer; a fresh reader without cache, and a reader whose "
        "cached version is current)\n"
    )
    parts.append(
        markdown_table(
            [
                "model",
                "parameters",
                "blob MiB",
                "chunks",
                "full read p50 ms",
                "full read max ms",
                "unchanged check p50 ms",
                "commit p50 ms",
                "raw MGET p50 ms",
                "raw SETs p50 ms",
                "read ÷ raw MGET (goal ≤ 1.5)",
                "commit ÷ raw SETs (goal ≤ 1.5)",
            ],
            [
                [
                    r["model"],
                    f"{r['parameters']:,}",
                    r["blob_mib"],
                    r["chunks"],
                    r["read_p50_ms"],
                    r["read_max_ms"],
                    r["check_p50_ms"],
                    r["commit_p50_ms"],
                    r.get("raw_get_p50_ms", "n/a"),
                    r.get("raw_set_p50_ms", "n/a"),
                    r.get("read_vs_raw_get", "n/a"),
                    r.get("commit_vs_raw_set", "n/a"),
                ]
                for r in report["fetch"]
            ],
        )
    )
    return "\n".join(parts) + "\n"


def splice(document: str, tables: str, *, begin: str = BEGIN_MARK, end: str = END_MARK) -> str:
    """Replace what lies between the ``begin``/``end`` markers (or append the markers and tables)."""
    block = f"{begin}\n{tables}{end}"
    if begin in document and end in document:
        head, _, rest = document.partition(begin)
        _, _, tail = rest.partition(end)
        return head + block + tail
    return document.rstrip("\n") + "\n\n" + block + "\n"


def plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(11, 8))
    lin = report["linear"]
    ax = axes[0][0]
    for route, style in (("per-step", "o-"), ("grouped", "s--")):
        rows = [r for r in lin if r.get("path", "per-step") == route]
        if rows:
            ax.plot([r["trainers"] for r in rows], [r["ratio"] for r in rows], style, label=f"{route}: MSE / floor")
    ax.axhline(MSE_GOAL, color="grey", linestyle="--", label=f"goal {MSE_GOAL}")
    ax.set(title="Linear regression through the queue", xlabel="trainer processes", ylabel="MSE / floor")
    ax.set_xticks([r["trainers"] for r in lin])
    ax.legend()
    coord = report["coordination"]
    runs = sorted({(r.get("path", "per-step"), r["mode"]) for r in coord})
    for (route, mode), style in zip(runs, ("o-", "s--", "^-.", "d:"), strict=False):
        rows = [r for r in coord if (r.get("path", "per-step"), r["mode"]) == (route, mode)]
        name = f"{route} {mode}"
        axes[0][1].plot([r["trainers"] for r in rows], [r["steps_per_s"] for r in rows], style, label=name)
        axes[1][0].plot([r["trainers"] for r in rows], [r["latency_p99_ms"] for r in rows], style, label=f"{name} p99")
        axes[1][0].plot(
            [r["trainers"] for r in rows], [r["latency_p50_ms"] for r in rows], style, alpha=0.4, label=f"{name} p50"
        )
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
    return {
        "machine": platform.platform(),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "redis": info.get("redis_version"),
        "broker": urlparse(lab.settings.broker_url).scheme,
        "max_staleness": lab.settings.max_staleness,
        "torch_threads_per_worker": lab.settings.torch_threads,
        "load_average_at_start": [round(v, 2) for v in os.getloadavg()],
    }
