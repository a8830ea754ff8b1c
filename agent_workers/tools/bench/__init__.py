"""The benchmark behind ``agent-workers bench`` / ``make bench``: our batcher against per-request Celery.

Every run measures, on the same machine, broker and model, with the same worker command line
(``celery -A tasks worker -P threads -c 1 --prefetch-multiplier 2×max_batch_size -E``):

* ``ours``: ``agent_workers.predict`` through the dynamic batcher;
* ``naive``: a plain Celery task doing one forward pass per message (``agent_workers.tools.baselines``);
* ``celery-batches``: celery-batches 0.11 (only with ``--with-celery-batches``, which installs it ``--no-deps``).

Modes:

* **drain**: the queue is pre-filled with N single-example requests (raw protocol-v2 messages published in bulk; the
  fill is not measured), then the worker starts. Throughput is counted between the first and the last result the
  worker stored (their ``date_done``), so start-up and the model load are excluded; worker CPU comes from
  ``/proc/<pid>/stat`` over the same interval. A sweep repeats it for several ``max_batch_size`` values.
* **closed loop**: C producers each send one request and wait for its result (pub/sub on the result key) before the
  next; latency percentiles and the rate they reach.
* **open loop**: Poisson arrivals at half the drain rate of ``ours``; latency counted from the *intended* send time,
  so a late sender cannot hide queueing (coordinated omission).

Modules: ``config`` (what to run), ``workloads`` (models and task names), ``messages`` (building and publishing
requests), ``measure`` (drain measurement, raw torch, machine), ``latency`` (closed and open loops), ``targets``,
``runs`` (one system's drain and latency runs), ``runner`` (the matrix), ``output`` and ``plots``. The pure parts
(rates, tables, targets) are unit-tested in tests/unit/test_bench.py.
"""

from agent_workers.tools.bench.config import DEFAULT_SWEEP, BenchConfig
from agent_workers.tools.bench.latency import LatencyRun, cdf_points, latency_bound_ms
from agent_workers.tools.bench.measure import drain_rate, interpolate, raw_torch_rate
from agent_workers.tools.bench.messages import MessageFactory, ProducerFactory, Publisher, task_message
from agent_workers.tools.bench.output import report_tables, write_outputs
from agent_workers.tools.bench.runner import Bench, run
from agent_workers.tools.bench.runs import Runs, Session
from agent_workers.tools.bench.targets import (
    Check,
    check_cache,
    check_idle_latency,
    check_overload,
    check_targets,
    ratio,
)
from agent_workers.tools.bench.workloads import WORKLOADS, Workload, parameter_count

__all__ = [
    "DEFAULT_SWEEP",
    "WORKLOADS",
    "Bench",
    "BenchConfig",
    "Check",
    "LatencyRun",
    "MessageFactory",
    "ProducerFactory",
    "Publisher",
    "Runs",
    "Session",
    "Workload",
    "cdf_points",
    "check_cache",
    "check_idle_latency",
    "check_overload",
    "check_targets",
    "drain_rate",
    "interpolate",
    "latency_bound_ms",
    "parameter_count",
    "raw_torch_rate",
    "ratio",
    "report_tables",
    "run",
    "task_message",
    "write_outputs",
]
