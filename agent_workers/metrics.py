"""Prometheus metrics of a worker process (exposed on ``AGENT_WORKERS_METRICS_PORT`` when set)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram, start_http_server

BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
TIME_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)

REQUESTS = Counter("agent_workers_requests_total", "Inference requests by outcome", ["model", "outcome"])
BATCH_SIZE = Histogram("agent_workers_batch_size", "Requests per forward pass", ["model"], buckets=BATCH_BUCKETS)
QUEUE_WAIT = Histogram(
    "agent_workers_queue_wait_seconds",
    "Time a request waited in the worker for its batch",
    ["model"],
    buckets=TIME_BUCKETS,
)
COMPUTE = Histogram("agent_workers_compute_seconds", "Forward-pass time of a batch", ["model"], buckets=TIME_BUCKETS)
PARAM_VERSION = Gauge("agent_workers_param_version", "Parameter version being served or trained", ["model"])
QUEUE_DEPTH = Gauge(
    "agent_workers_queue_depth", "Messages waiting in the broker, per queue this worker consumes", ["queue"]
)
FILL_RATIO = Histogram(
    "agent_workers_batch_fill_ratio",
    "Requests per forward pass divided by the largest batch allowed",
    ["model"],
    buckets=(0.05, 0.1, 0.25, 0.5, 0.75, 0.9, 1.0),
)
COMPUTE_PER_REQUEST = Histogram(
    "agent_workers_compute_seconds_per_request",
    "Forward-pass time of a batch divided by the requests it answered",
    ["model"],
    buckets=TIME_BUCKETS,
)
OLDEST_REQUEST_AGE = Gauge(
    "agent_workers_oldest_request_age_seconds",
    "Age of the oldest request this worker has taken from the queue and not yet answered (0 when none)",
    ["queue"],
)
REVOKED = Counter(
    "agent_workers_shed_total", "Requests revoked before compute for their deadline, by reason", ["reason"]
)
CACHE_LOOKUPS = Counter(
    "agent_workers_result_cache_lookups_total", "Result cache lookups by outcome (hit or miss)", ["model", "outcome"]
)
DEDUPLICATED = Counter(
    "agent_workers_deduplicated_total", "Requests answered from an identical request's row in the same batch", ["model"]
)
BATCH_TOKENS = Counter(
    "agent_workers_batch_tokens_total",
    "Tokens computed in padded batches of variable-length models: kind=real or padding (padding waste = padding / "
    "(real + padding))",
    ["model", "kind"],
)
MODEL_CACHE_BYTES = Gauge(
    "agent_workers_model_cache_bytes", "Parameter bytes a worker holds, per cache (engine or store)", ["cache"]
)
COMMITS = Counter("agent_workers_commits_total", "Training commits by outcome", ["model", "outcome"])
STALENESS = Histogram(
    "agent_workers_commit_staleness",
    "Versions between a gradient's read and its commit",
    ["model"],
    buckets=(0, 1, 2, 4, 8, 16, 32),
)

_started: set[int] = set()


def serve(port: int) -> None:
    """Start the metrics HTTP endpoint once per process."""
    if port and port not in _started:
        start_http_server(port)
        _started.add(port)


UNKNOWN_MODEL = "_unknown"


class ModelLabels:
    """The metric label of a model name: the name once this worker has resolved it in the store, else one label
    for all (``UNKNOWN_MODEL``), so a stream of made-up names cannot grow ``/metrics``."""

    def __init__(self) -> None:
        self._known: set[str] = set()

    def known(self, model: str) -> None:
        """Mark ``model`` as one the store holds."""
        self._known.add(model)

    def label(self, model: object) -> str:
        """The label to count a request for ``model`` under."""
        return model if isinstance(model, str) and model in self._known else UNKNOWN_MODEL
