"""The soak's figure: requests over time, what the broker holds against what is not yet completed, worker RSS; kills
marked."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any
from urllib.parse import urlparse


def plot(report: dict[str, Any], path: Path) -> Path:
    """Requests over time, requests not (yet) completed against the broker's backlog, and worker RSS; kills marked.

    Returns ``path``.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    samples = report["samples"]
    t = [s["t"] for s in samples]
    fig, (top, middle, bottom) = plt.subplots(
        3, 1, figsize=(10, 9), sharex=True, gridspec_kw={"height_ratios": [2, 2, 2]}
    )
    top.plot(t, [s["sent"] for s in samples], label="sent")
    top.plot(t, [s["completed"] for s in samples], label="completed", ls="--")
    top.set_ylabel("requests")
    broker = urlparse(report["config"].get("broker_url") or "redis://").scheme
    top.set_title(
        f"soak ({broker} broker): {report['sent']:,} sent, {report['completed']:,} completed, "
        f"{report['lost']:,} lost, {report.get('duplicated', 0):,} computed twice, "
        f"{len(report['kills'])} SIGKILLs"
    )
    top.legend(loc="upper left", fontsize=8)
    middle.plot(t, [s["sent"] - s["completed"] for s in samples], label="sent - completed (in flight, or lost)")
    held = (
        "held by the broker (queued + unacknowledged)"
        if broker in ("redis", "rediss")
        else "ready in the broker (its unacknowledged deliveries are not counted)"
    )
    middle.plot(t, [max(0, s["backlog"]) for s in samples], label=held)
    middle.set_ylabel("requests")
    middle.legend(loc="upper left", fontsize=8)
    for slot in range(len(samples[0]["rss_mb"])):
        role = report["rss"][f"w{slot}"]["role"]
        bottom.plot(
            t,
            [s["rss_mb"][slot] if s["rss_mb"][slot] is not None else math.nan for s in samples],
            label=f"worker {slot} ({role})",
        )
    bottom.set_ylabel("worker RSS (MiB)")
    bottom.set_xlabel("seconds")
    bottom.legend(loc="lower right", fontsize=8)
    for ax in (top, middle, bottom):
        for k in report["kills"]:
            ax.axvline(k, color="tab:red", lw=0.8, alpha=0.5)
        ax.grid(alpha=0.3)
    bottom.annotate(
        "red lines: SIGKILL of worker 0, restarted at once",
        (0.01, 0.03),
        xycoords="axes fraction",
        fontsize=8,
        color="tab:red",
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
