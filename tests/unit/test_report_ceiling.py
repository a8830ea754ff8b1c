"""The queued report's model of the ceiling: Amdahl's bound on trainers that take turns, and the cores' bound."""

from __future__ import annotations

from typing import Any

from agent_workers.tools.report.queued import ceiling, render_queued


def row(path: str, trainers: int, *, walk: float, worker: float, redis_ms: float) -> dict[str, Any]:
    return {"optimizer": "sgd", "path": path, "mode": "optimistic", "trainers": trainers, "steps": 900,
            "ratio": 1.0, "sequential_ratio": 1.0, "gap": 0.0, "meets_goal": True, "steps_per_s": 1000.0,
            "conflicts_per_step": 0.0, "recomputed": 0, "rebased": 0, "commits": 40, "walk_ms_per_step": walk,
            "worker_cpu_ms_per_step": worker, "redis_cpu_ms_per_step": redis_ms}  # fmt: skip


def test_the_ceiling_comes_from_the_one_trainer_grouped_run_alone() -> None:
    rows = [
        row("grouped", 1, walk=0.5, worker=0.75, redis_ms=0.25),
        row("grouped", 2, walk=0.5, worker=2.0, redis_ms=1.0),  # not the yardstick: several trainers
        row("grouped-fixed", 1, walk=0.5, worker=3.0, redis_ms=1.0),  # not the yardstick: the older path
    ]
    assert ceiling(rows, cpus=2) == [
        {
            "optimizer": "sgd",
            "walk_ms": 0.5,
            "worker_ms": 0.75,
            "redis_ms": 0.25,
            "one_trainer_steps_per_s": 1000.0,
            "turns_bound_x": 1.5,
            "cores_bound_steps_per_s": 2000.0,
        }  # fmt: skip
    ]
    report = {"queued": rows, "finished": "now", "plan": {"queued_epochs": 10},
              "environment": {"cpus": 2, "broker": "redis", "max_staleness": 4}}  # fmt: skip
    text = render_queued(report)
    assert "0.75 / 0.5 = 1.5x one trainer" in text and "cap the machine at 2000.0 steps/s" in text
