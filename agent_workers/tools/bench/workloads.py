"""What the benchmark serves: the systems compared, their task names, and the models (workloads)."""

from __future__ import annotations

import dataclasses
import itertools
import json
from typing import Any

from agent_workers.contract import PREDICT

SYSTEMS = ("ours", "naive", "celery-batches", "noop")
#: The task each system's requests name; the baselines are registered by the worker plugin
#: ``agent_workers.tools.baselines`` (its ``NAIVE`` and ``CELERY_BATCHES``).
TASK_NAMES = {
    "ours": PREDICT,
    "naive": "agent_workers.bench.predict_naive",
    "celery-batches": "agent_workers.bench.predict_celery_batches",
    "noop": "agent_workers.bench.noop",
}
BASELINES_PLUGIN = "agent_workers.tools.baselines"
CELERY_BATCHES_PIN = "celery-batches==0.11"


@dataclasses.dataclass(frozen=True)
class Workload:
    """A model to serve: an ``mlp`` config, and how many decimals its random inputs carry in JSON."""

    name: str
    config: dict[str, Any]
    decimals: int = 4

    @property
    def in_features(self) -> int:
        return int(self.config["in_features"])

    def spec(self) -> Any:
        from agent_workers.models import make_spec

        return make_spec("mlp", **json.loads(json.dumps(self.config)))


WORKLOADS = {
    # the reference model of the issue: 64 -> 256 -> 256 -> 10 (85,002 parameters)
    "mlp": Workload("mlp", {"in_features": 64, "hidden": [256, 256], "out_features": 10}),
    # weight-bound: 1024 -> 4096 -> 4096 -> 1024, 25,175,040 parameters (100 MB of float32)
    "heavy": Workload("heavy", {"in_features": 1024, "hidden": [4096, 4096], "out_features": 1024}),
    # the overload run's: compute-bound with small messages (38 million multiply-adds per row, 64 floats in, 10 out)
    "wide": Workload("wide", {"in_features": 64, "hidden": [6144, 6144], "out_features": 10}),
}


def parameter_count(workload: Workload) -> int:
    """Parameters of the workload's model, from its widths (no need to build 100 MB of weights)."""
    widths = [workload.config["in_features"], *workload.config["hidden"], workload.config["out_features"]]
    return sum(a * b + b for a, b in itertools.pairwise(widths))
