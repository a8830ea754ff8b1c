"""Collect an A/B sitting of benchmark runs into one JSON and draw it (docs/benchmarks/).

The sitting's directory holds, for sides A and B alternated over rounds 1, 2, ...:

* ``heavy_<side>_<round>/results.json`` and ``mlp_<side>_<round>/results.json``: ``agent-workers bench`` outputs
  (``--workload heavy`` drains against raw torch; ``--workload mlp`` drains and C=1 runs);
* ``image_ab.jsonl``: one JSON line per image drain (side, round, architecture, broker, encoding, CPU and fixed
  cost per image, rate); or ``image_<side>_<round>/image.json``: ``agent-workers bench --workload image`` outputs,
  whose compact-encoding drains (b64, msgpack) are taken.

Usage: ``python scripts/ab_figures.py SITTING_DIR --out docs/benchmarks/NAME`` writes ``NAME.json`` and ``NAME.png``
(heavy end to end / raw torch, image worker CPU per image, mlp drain rate and C=1 p50, each by side and broker).
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path
from typing import Any


def collect(sitting: Path) -> dict[str, list[dict[str, Any]]]:
    """Every run of the sitting, flattened: heavy and mlp drains, mlp C=1 latencies, image drains."""
    out: dict[str, list[dict[str, Any]]] = {"heavy": [], "mlp": [], "mlp_c1": [], "image": []}
    for path in sorted(sitting.glob("*_*_*/results.json")):
        workload, side, round_ = re.fullmatch(r"(\w+?)_([AB])_(\d+)", path.parent.name).groups()  # type: ignore[union-attr]
        results = json.loads(path.read_text())
        for d in results["drains"]:
            row = {"side": side, "round": int(round_), "broker": d["broker"], "encoding": d.get("encoding", "json")}
            row |= {k: d.get(k) for k in ("rate", "cpu_ms_per_request", "other_cpu_cores", "mean_batch_compute_ms")}
            if d.get("raw_torch_rate"):
                row |= {"raw_torch_rate": d["raw_torch_rate"], "e2e_over_raw": d["rate"] / d["raw_torch_rate"]}
                row["forward_share"] = d["compute_seconds"] / d["seconds"] if d.get("compute_seconds") else None
            if d.get("raw_torch_sustained_rate"):
                row["e2e_over_sustained_raw"] = d["rate"] / d["raw_torch_sustained_rate"]
            out[workload].append(row)
        for r in results.get("latency", []):
            if workload == "mlp" and r.get("system") == "ours" and r.get("concurrency") == 1:
                out["mlp_c1"].append({"side": side, "round": int(round_), "broker": r["broker"], "p50_ms": r["p50_ms"]})
    lines = (sitting / "image_ab.jsonl").read_text().splitlines() if (sitting / "image_ab.jsonl").exists() else []
    out["image"] = [json.loads(line) for line in lines if line.strip()]
    for path in sorted(sitting.glob("image_*_*/image.json")):
        _, side, round_ = path.parent.name.split("_")
        for run in json.loads(path.read_text())["runs"]:
            if run["encoding"] in ("b64", "msgpack"):
                keys = ("architecture", "broker", "encoding", "cpu_ms_per_image", "fixed_ms_per_image", "rate")
                out["image"].append({"side": side, "round": int(round_)} | {k: run[k] for k in keys})
    return out


def plot(runs: dict[str, list[dict[str, Any]]], path: Path, labels: dict[str, str]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # the image panels draw one CNN: the scale (bench_cnn_wide) when the sitting drained it
    architectures = {r.get("architecture", "bench_cnn") for r in runs["image"]}
    cnn = "bench_cnn_wide" if "bench_cnn_wide" in architectures else "bench_cnn"
    runs = runs | {"image": [r for r in runs["image"] if r.get("architecture", "bench_cnn") == cnn]}
    panels = [
        ("heavy", "e2e_over_raw", "heavy: end to end / raw torch", lambda r: r["broker"]),
        ("image", "cpu_ms_per_image", f"{cnn}: worker CPU ms / image", lambda r: f"{r['broker']}\n{r['encoding']}"),
        ("image", "rate", f"{cnn}: drain images/s", lambda r: f"{r['broker']}\n{r['encoding']}"),
        ("mlp", "rate", "mlp: drain req/s", lambda r: r["broker"]),
        ("mlp_c1", "p50_ms", "mlp: C=1 p50 ms", lambda r: r["broker"]),
    ]
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.8))
    for ax, (kind, key, title, group) in zip(axes, panels, strict=True):
        rows = [r for r in runs[kind] if r.get(key) is not None]
        groups = sorted({group(r) for r in rows})
        for offset, (side, marker) in zip((-0.15, 0.15), (("A", "o"), ("B", "s")), strict=True):
            xs = [groups.index(group(r)) + offset for r in rows if r["side"] == side]
            ys = [r[key] for r in rows if r["side"] == side]
            ax.scatter(xs, ys, marker=marker, label=labels.get(side, side))
        ax.set_xticks(range(len(groups)), groups, fontsize=8)
        ax.set_title(title, fontsize=10)
        if kind == "heavy":
            ax.axhline(0.9, color="k", linestyle="--", linewidth=1, label="goal 0.9")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("sitting", type=Path)
    parser.add_argument("--out", type=Path, required=True, help="path without suffix: .json and .png are written")
    parser.add_argument("--label-a", default="A")
    parser.add_argument("--label-b", default="B")
    args = parser.parse_args()
    runs = collect(args.sitting)
    labels = {"A": args.label_a, "B": args.label_b}
    args.out.with_suffix(".json").write_text(json.dumps({"labels": labels, **runs}, indent=2) + "\n")
    plot(runs, args.out.with_suffix(".png"), labels)
    print(f"wrote {args.out.with_suffix('.json')} and {args.out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
