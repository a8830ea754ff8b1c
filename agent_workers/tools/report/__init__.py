"""The training report behind ``agent-workers report``: quality and coordination cost of training through the queue.

Everything runs on this machine against the configured broker and Redis, in a namespace and queues of its own,
with worker processes it starts and stops itself:

1. **Linear regression** (the seed's data, :func:`agent_workers.tools.demo.seed_data`): 9,000 rows trained through
   queued ``train_step`` messages (MSE, SGD lr 0.05, batches of 100, 10 epochs) by 1, 2 and 4 concurrent trainer
   processes; test MSE on the 1,000 held-out rows against the floor (the MSE of the true function). Goal <= 1.02x.
2. **MLP on sklearn digits**, 4 concurrent trainers, Adam; test accuracy against a single-process torch loop with
   the same initial weights, batches and hyperparameters. Goal >= 96% and within 1 point.
3. **Commit coordination**: a fixed number of digits steps with 1, 2, 4 and 8 trainers, optimistic versus lock
   mode: steps/s through the queue, conflict rate (lost compare-and-sets per commit attempt), and commit latency
   (a step's start, lock wait included, to its commit) p50/p99.
4. **Parameter fetch latency** of ~1M and ~25M parameter models (the latter chunked): a full read, and the
   per-call version check a reader pays when nothing changed.
5. **All steps queued at once** (:mod:`agent_workers.tools.report.queued`): 1, 2 and 4 trainers, SGD and Adam,
   per-step, grouped and lock; quality against sequential single-process torch, steps/s, conflicts per step. It
   writes its own files (``training-queued.{json,png}``, its own markers in training.md), so ``--part queued``
   reruns it alone.
6. **Example models** (:mod:`agent_workers.tools.report.zoo`): the digits CNN and the token-order transformer of
   examples/models/zoo.py, trained on typed datasets (uint8 pixels, ragged token ids) by 1 and 4 trainers through
   the queue, against the same model trained in one process on the same batches (``training-zoo.{json,png}``,
   ``--part zoo``).

Results go to ``docs/benchmarks/training.json`` and ``.png``, and the tables into ``docs/training.md`` between
the report markers. Figures are this machine's; they are reported, never asserted.

Modules: ``lab`` (the plan, goals, a private namespace and its workers), ``parts`` (the four parts) and ``output``
(tables, figure, environment).
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from agent_workers.config import Settings
from agent_workers.tools.report.lab import Lab, Plan, Progress, layout, step_stats
from agent_workers.tools.report.output import BEGIN_MARK, END_MARK, environment, plot, render_tables, splice
from agent_workers.tools.report.parts import coordination, digits, fetch_latency, linear_regression
from agent_workers.tools.report.queued import QUEUED_BEGIN, QUEUED_END, plot_queued, queued_at_once, render_queued
from agent_workers.tools.report.zoo import ZOO_BEGIN, ZOO_END, plot_zoo, render_zoo, zoo_models

#: The parts ``--part`` can name; "main" is parts 1-4 (they share one JSON, one figure and one set of tables).
PARTS = ("main", "queued", "zoo")

__all__ = ["BEGIN_MARK", "END_MARK", "Lab", "Plan", "layout", "render_tables", "run", "splice", "step_stats"]


def run(
    settings: Settings | None = None,
    *,
    quick: bool = False,
    docs: Path = Path("docs"),
    progress: Progress = print,
    parts: tuple[str, ...] = PARTS,
) -> dict[str, Any]:
    """Run the report (``parts``: "main" = parts 1-4, "queued" = part 5) and write its files; returns the figures."""
    plan = Plan.quick() if quick else Plan()
    lab = Lab(settings or Settings.from_env(), progress)
    started = time.perf_counter()
    progress(
        f"report: namespace {lab.settings.namespace}, broker {lab.settings.broker_url.split('@')[-1]}"
        f"{' (quick)' if quick else ''}"
    )
    out = docs / "benchmarks"
    doc = docs / "training.md"
    report: dict[str, Any] = {"plan": dataclasses.asdict(plan), "environment": environment(lab)}
    try:
        if "main" in parts:
            report["linear"] = linear_regression(lab, plan)
            report["digits"] = digits(lab, plan)
            report["coordination"] = coordination(lab, plan)
            report["fetch"] = fetch_latency(lab, plan)
        if "queued" in parts:
            report["queued"] = queued_at_once(lab, plan)
        if "zoo" in parts:
            report["zoo"] = zoo_models(lab, quick=quick)
    finally:
        lab.cleanup()
    report["seconds"] = round(time.perf_counter() - started, 1)
    report["environment"]["load_average_at_end"] = [round(v, 2) for v in os.getloadavg()]
    report["finished"] = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    out.mkdir(parents=True, exist_ok=True)
    text = doc.read_text() if doc.exists() else "# Training\n"
    if "main" in parts:
        main = {k: v for k, v in report.items() if k not in ("queued", "zoo")}
        (out / "training.json").write_text(json.dumps(main, indent=2) + "\n")
        plot(main, out / "training.png")
        text = splice(text, render_tables(main))
    if "queued" in parts:
        queued = {k: v for k, v in report.items() if k not in ("linear", "digits", "coordination", "fetch", "zoo")}
        (out / "training-queued.json").write_text(json.dumps(queued, indent=2) + "\n")
        plot_queued(report["queued"], out / "training-queued.png")
        text = splice(text, render_queued(queued), begin=QUEUED_BEGIN, end=QUEUED_END)
    if "zoo" in parts:
        zoo = {k: report[k] for k in ("zoo", "environment", "finished", "seconds")}
        (out / "training-zoo.json").write_text(json.dumps(zoo, indent=2) + "\n")
        plot_zoo(report["zoo"], out / "training-zoo.png")
        text = splice(text, render_zoo(zoo), begin=ZOO_BEGIN, end=ZOO_END)
    doc.write_text(text)
    progress(f"report written under {out} and {doc} ({report['seconds']} s)")
    return report
