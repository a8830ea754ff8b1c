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

__all__ = ["BEGIN_MARK", "END_MARK", "Lab", "Plan", "layout", "render_tables", "run", "splice", "step_stats"]


def run(
    settings: Settings | None = None, *, quick: bool = False, docs: Path = Path("docs"), progress: Progress = print
) -> dict[str, Any]:
    """Run the whole report and write its files; returns the figures."""
    plan = Plan.quick() if quick else Plan()
    lab = Lab(settings or Settings.from_env(), progress)
    started = time.perf_counter()
    progress(
        f"report: namespace {lab.settings.namespace}, broker {lab.settings.broker_url.split('@')[-1]}"
        f"{' (quick)' if quick else ''}"
    )
    try:
        report: dict[str, Any] = {"plan": dataclasses.asdict(plan), "environment": environment(lab)}
        report["linear"] = linear_regression(lab, plan)
        report["digits"] = digits(lab, plan)
        report["coordination"] = coordination(lab, plan)
        report["fetch"] = fetch_latency(lab, plan)
    finally:
        lab.cleanup()
    report["seconds"] = round(time.perf_counter() - started, 1)
    report["environment"]["load_average_at_end"] = [round(v, 2) for v in os.getloadavg()]
    report["finished"] = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    out = docs / "benchmarks"
    out.mkdir(parents=True, exist_ok=True)
    (out / "training.json").write_text(json.dumps(report, indent=2) + "\n")
    plot(report, out / "training.png")
    doc = docs / "training.md"
    doc.write_text(splice(doc.read_text() if doc.exists() else "# Training\n", render_tables(report)))
    progress(
        f"report written: {out / 'training.json'}, {out / 'training.png'}, tables in {doc} ({report['seconds']} s)"
    )
    return report
