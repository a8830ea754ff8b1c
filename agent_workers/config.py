"""Settings: the only module that reads the environment.

Every knob is an ``AGENT_WORKERS_*`` variable; :meth:`Settings.from_env` parses and validates them all at once and
raises :class:`~agent_workers.errors.ConfigError` naming the variable and the fix.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
from collections.abc import Mapping
from urllib.parse import urlparse

from agent_workers.errors import ConfigError
from agent_workers.urls import sentinel_url_problem

PREFIX = "AGENT_WORKERS_"
DEFAULT_BROKER_URL = "redis://127.0.0.1:6379/0"
DEFAULT_RESULT_BACKEND = "redis://127.0.0.1:6379/1"
DEFAULT_PARAMS_URL = "redis://127.0.0.1:6379/2"
DEFAULT_NAMESPACE = "aw"
DEFAULT_MAX_BATCH_SIZE = 64
DEFAULT_MAX_WAIT_MS = 5.0
DEFAULT_MIN_VERSION_WAIT_MS = 1000.0
DEFAULT_RESULT_RETRY_S = 30.0
DEFAULT_MAX_ETA_S = 24 * 3600.0
DEFAULT_RESULT_EXPIRES = 24 * 3600
DEFAULT_VISIBILITY_TIMEOUT = 3600
DEFAULT_RECLAIM_AFTER = 10
DEFAULT_TASK_TIME_LIMIT = 600
DEFAULT_KEEP_VERSIONS = 10
#: Applied update ids remembered per model (the newest): ~100 bytes of Redis memory per id, so ~10 MiB per model.
DEFAULT_DEDUP_WINDOW = 100_000
DEFAULT_MAX_STALENESS = 4
MAX_TRAIN_GROUP = 8  # the default group size (a group walks its steps in order: τ does not bound it)
DEFAULT_TRAIN_GROUP_MAX = 32  # the adaptive group size's cap (agent_workers/training/sizing.py)
DEFAULT_MAX_INPUT_ELEMENTS = 1_000_000
DEFAULT_MAX_MESSAGE_BYTES = 16 * 1024 * 1024
DEFAULT_LOCK_TIMEOUT = 5.0  # renewed by its holder: how long a dead holder blocks the others
DEFAULT_CHUNK_BYTES = 64 * 1024 * 1024
MAX_CHUNK_BYTES = 512 * 1024 * 1024  # Redis's proto-max-bulk-len default
DEFAULT_SENTINEL_MASTER = "mymaster"
#: The longest duration a setting may name (ten years): Redis refuses longer ``EX`` and Celery's time limits overflow.
MAX_SECONDS = 10 * 365 * 24 * 3600
#: The longest wait in milliseconds (an hour): a batch, version or latency wait beyond it is a typo.
MAX_WAIT_MS = 3600 * 1000.0
#: AMQP's ``prefetch_count`` is an unsigned short, and a worker prefetches twice its batch (a trainer: its group).
MAX_BATCH_SIZE = 65535 // 2
#: The commit lock's expiry stays below the longest wait for it (agent_workers/store/locks.py DEFAULT_LOCK_WAIT).
MAX_LOCK_TIMEOUT = 60.0
DEFAULT_DATASET_CACHE_BYTES = 1024 * 1024 * 1024

_BROKER_SCHEMES = {"redis", "rediss", "amqp", "amqps", "pyamqp", "memory", "sentinel"}
_REDIS_SCHEMES = {"redis", "rediss", "unix", "sentinel"}
# The parameter store may also live on a Redis Cluster (agent_workers/redis_clients.py); Celery's broker and result
# backend cannot.
_PARAMS_SCHEMES = _REDIS_SCHEMES | {"redis+cluster", "rediss+cluster"}
_AMQP_SCHEMES = {"amqp", "amqps", "pyamqp"}
_QUEUE_TYPES = {"classic", "quorum"}
#: The largest ``x-max-priority`` RabbitMQ accepts.
MAX_QUEUE_PRIORITY = 255
_BATCH_MODES = {"fixed", "adaptive"}
_COMMIT_MODES = {"optimistic", "lock"}


@dataclasses.dataclass(frozen=True, kw_only=True)
class BatchSettings:
    """Dynamic batching policy of an inference worker.

    Attributes:
        max_batch_size: most requests in one forward pass.
        max_wait_ms: longest a request waits for others to join its batch, in milliseconds.
        mode: ``fixed`` (size/wait) or ``adaptive`` (sizes batches to ``latency_target_ms`` from a learned cost model).
        latency_target_ms: the per-request latency goal of the adaptive mode, in milliseconds.
        flush_when_idle: flush as soon as the broker has nothing more to hand over instead of waiting out
            ``max_wait_ms`` (``AGENT_WORKERS_FLUSH_WHEN_IDLE``, on by default).
        pipeline_depth: batches in flight at once: with 2 the event loop receives and buffers the next batch while
            one computes in the compute thread; 1 computes on the event loop itself; 0 (the default) runs predict
            at 2 and computes a batch predicted under 2 ms on the loop, and training at 2 on CUDA and 1 on CPU
            (``AGENT_WORKERS_PIPELINE_DEPTH``).
        max_batch_tokens: most tokens (requests × the longest one's length) in one padded batch of a variable-length
            model (``AGENT_WORKERS_MAX_BATCH_TOKENS``, TEI's default 16384); length_batching: form such batches by
            length across the buffer, or off: in arrival order, FIFO pad-to-longest (worker/forming.py).
    """

    max_batch_size: int = DEFAULT_MAX_BATCH_SIZE
    max_wait_ms: float = DEFAULT_MAX_WAIT_MS
    mode: str = "fixed"
    latency_target_ms: float = 50.0
    flush_when_idle: bool = True
    pipeline_depth: int = 0
    max_batch_tokens: int = 16384
    length_batching: bool = True


@dataclasses.dataclass(frozen=True, kw_only=True)
class Settings:
    """Everything a worker or producer needs, parsed from ``AGENT_WORKERS_*``.

    Attributes:
        broker_url: Celery broker; Redis (default) or RabbitMQ (``amqp://``).
        result_backend: Celery result backend; must be Redis.
        params_url: Redis holding the versioned model parameters.
        namespace: prefix of every Redis key we own, so several deployments can share one Redis.
        device: ``auto`` (CUDA when available), ``cpu``, ``cuda`` or ``cuda:N``.
        batch: the dynamic batching policy.
        result_expires: seconds a result stays in the backend.
        visibility_timeout: seconds before Redis redelivers an unacknowledged message.
        reclaim_after: Redis broker: seconds without a heartbeat after which a worker counts as dead and its
            unacknowledged messages go back to their queues (0: off; only the visibility timeout restores them).
        task_time_limit: hard time limit of one task, seconds.
        keep_versions: parameter versions kept per model before old blobs are collected.
        dedup_window: how many applied update ids (the newest) are remembered, so a redelivered step is applied
            once; a redelivery of an id older than that would apply again. Costs about 100 bytes of Redis memory
            per remembered id: 100,000 ids ≈ 10 MiB per model, whatever the group commit size.
        max_staleness: τ, how far a gradient may lag the parameters it is applied to (per step: versions; group: steps).
        train_group: ``train_step`` requests of one model per group commit (one head read, k sequential optimizer
            steps, one compare-and-set) at first; 1 serves every step as its own task (the per-step path). Default 8.
        train_group_max: the adaptive group size's cap (halved per conflict, +1 per clean commit; at most
            train_group: fixed) and a grouped trainer's prefetch. Default 32.
        train_turns: optimistic trainers of one model take short best-effort turns to walk and commit
            (``CommitLock.turn``), so their compare-and-sets stop colliding. Default on.
        max_input_elements: the largest input, in numbers, that one request may carry.
        max_message_bytes: the largest message body accepted.
        track_started: also store the STARTED state of every request in the backend (one more write per batch).
        amp: autocast dtype for inference on CUDA: ``off``, ``bf16`` or ``fp16``.
        compile: wrap models in ``torch.compile``.
        plugins: modules imported at worker start-up and wherever a spec is built (the store, the CLI), so they
            can register architectures and losses.
        metrics_port: port of the worker's Prometheus endpoint; 0 disables it.
        preprocess_threads: threads that run preprocess hooks off the event loop (0: on the loop; hooks.py).
        inference_queue: queue of the inference tasks (predict, predict_many).
        training_queue: queue of the training tasks (train_step, fit).
        ready_file: a path the worker writes its node name to once it consumes (a readiness probe); removed
            at shutdown.
        commit_mode: how concurrent trainers of one model coordinate: ``optimistic`` (compare-and-set on the
            version, retry on conflict) or ``lock`` (a Redis lock held from read to commit; the compare-and-set
            still fences a holder whose lock expired).
        wait_aof: report a commit only after Redis fsynced it to its append-only file (``WAITAOF 1 0``; needs
            Redis >= 7.2 with ``appendonly yes``).
        lock_timeout: seconds a commit lock lives unless renewed; its holder renews it every third of that, so this
            is how long a crashed holder blocks the others.
        chunk_bytes: parameter blobs larger than this are stored as several keys of at most this many bytes.
        torch_threads: CPU threads torch may use in a worker process (0 = torch's default, one per core). One
            keeps the event loop and the forward pass from fighting over cores on CPU; raise it for heavy CPU
            models on big hosts. Irrelevant on GPU.
        malloc_tuning: pin glibc's malloc thresholds in the worker (agent_workers/worker/allocator.py).
        queue_type: RabbitMQ queue type of the inference and training queues: ``classic`` or ``quorum``
            (replicated, with a delivery limit and a ``<queue>.dead`` dead-letter queue; see app.py).
        queue_max_priority: RabbitMQ: declare the inference and training queues with ``x-max-priority`` (1–255;
            0, the default, declares none), so the broker itself hands higher ``priority`` messages over first.
            Every producer must declare the queues with the same argument; classic queues only. Ignored on Redis,
            whose transport always keeps a sub-list per priority step.
        sentinel_master: the master name Redis Sentinel is asked for, for every ``sentinel://`` URL.
        max_queue_size: most predict requests one worker keeps buffered or held at once (0: no cap beyond the
            prefetch window); past it, requests whose deadline passed are shed first, then the least urgent.
        min_version_wait_ms: how long a ``min_version`` request waits for the store to reach that version before
            it fails, in milliseconds.
        result_retry_s: how long a worker retries (with backoff, from its event-loop timer) results the backend
            refused and retries the broker refused to take back, before it hands their messages back to the broker.
        max_eta_s: the furthest ahead a predict request's ``eta``/``countdown`` may be, in seconds; a later one fails.
        result_cache_size: entries of the per-worker predict result cache keyed by (model, version, input); 0 off.
        model_cache_bytes: bytes of parameters a worker keeps loaded (engine models) and cached (store snapshots),
            each; least recently used models are dropped beyond it (0: no cap).
        dataset_cache_bytes: bytes of uploaded datasets a worker process keeps decoded (least recently used dropped
            beyond it; 0: none kept, every load reads Redis).
    """

    broker_url: str = DEFAULT_BROKER_URL
    result_backend: str = DEFAULT_RESULT_BACKEND
    params_url: str = DEFAULT_PARAMS_URL
    namespace: str = DEFAULT_NAMESPACE
    device: str = "auto"
    batch: BatchSettings = dataclasses.field(default_factory=BatchSettings)
    result_expires: int = DEFAULT_RESULT_EXPIRES
    visibility_timeout: int = DEFAULT_VISIBILITY_TIMEOUT
    reclaim_after: int = DEFAULT_RECLAIM_AFTER
    task_time_limit: int = DEFAULT_TASK_TIME_LIMIT
    keep_versions: int = DEFAULT_KEEP_VERSIONS
    dedup_window: int = DEFAULT_DEDUP_WINDOW
    max_staleness: int = DEFAULT_MAX_STALENESS
    train_group: int = MAX_TRAIN_GROUP
    train_group_max: int = DEFAULT_TRAIN_GROUP_MAX
    train_turns: bool = True
    max_input_elements: int = DEFAULT_MAX_INPUT_ELEMENTS
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
    track_started: bool = False
    amp: str = "off"
    compile: bool = False
    plugins: tuple[str, ...] = ()
    metrics_port: int = 0
    preprocess_threads: int = 2
    inference_queue: str = "inference"
    training_queue: str = "training"
    ready_file: str = ""
    commit_mode: str = "optimistic"
    wait_aof: bool = False
    lock_timeout: float = DEFAULT_LOCK_TIMEOUT
    chunk_bytes: int = DEFAULT_CHUNK_BYTES
    torch_threads: int = 1
    malloc_tuning: bool = True
    queue_type: str = "classic"
    queue_max_priority: int = 0
    sentinel_master: str = DEFAULT_SENTINEL_MASTER
    max_queue_size: int = 0
    min_version_wait_ms: float = DEFAULT_MIN_VERSION_WAIT_MS
    result_retry_s: float = DEFAULT_RESULT_RETRY_S
    max_eta_s: float = DEFAULT_MAX_ETA_S
    result_cache_size: int = 0
    model_cache_bytes: int = 0
    dataset_cache_bytes: int = DEFAULT_DATASET_CACHE_BYTES

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        """Build settings from ``AGENT_WORKERS_*`` variables.

        Raises: ConfigError: a variable is malformed or the combination cannot work; the message names the fix."""
        env = os.environ if environ is None else environ
        r = _Reader(env)
        batch = BatchSettings(
            max_batch_size=r.int("MAX_BATCH_SIZE", DEFAULT_MAX_BATCH_SIZE, minimum=1, maximum=MAX_BATCH_SIZE),
            max_wait_ms=r.float("MAX_WAIT_MS", DEFAULT_MAX_WAIT_MS, minimum=0.0, maximum=MAX_WAIT_MS),
            mode=r.choice("BATCH_MODE", "fixed", _BATCH_MODES),
            latency_target_ms=r.float("LATENCY_TARGET_MS", 50.0, minimum=0.1, maximum=MAX_WAIT_MS),
            flush_when_idle=r.bool("FLUSH_WHEN_IDLE", True),
            pipeline_depth=r.int("PIPELINE_DEPTH", 0, minimum=0),
            max_batch_tokens=r.int("MAX_BATCH_TOKENS", 16384, minimum=1),
            length_batching=r.bool("LENGTH_BATCHING", True),
        )
        settings = cls(
            broker_url=r.url("BROKER_URL", DEFAULT_BROKER_URL, _BROKER_SCHEMES),
            result_backend=r.url("RESULT_BACKEND", DEFAULT_RESULT_BACKEND, _REDIS_SCHEMES),
            params_url=r.url("PARAMS_URL", DEFAULT_PARAMS_URL, _PARAMS_SCHEMES),
            namespace=r.str("NAMESPACE", DEFAULT_NAMESPACE),
            device=r.str("DEVICE", "auto"),
            batch=batch,
            result_expires=r.int("RESULT_EXPIRES", DEFAULT_RESULT_EXPIRES, minimum=1, maximum=MAX_SECONDS),
            visibility_timeout=r.int("VISIBILITY_TIMEOUT", DEFAULT_VISIBILITY_TIMEOUT, minimum=1, maximum=MAX_SECONDS),
            reclaim_after=r.int("RECLAIM_AFTER", DEFAULT_RECLAIM_AFTER, minimum=0, maximum=MAX_SECONDS),
            task_time_limit=r.int("TASK_TIME_LIMIT", DEFAULT_TASK_TIME_LIMIT, minimum=1, maximum=MAX_SECONDS),
            keep_versions=r.int("KEEP_VERSIONS", DEFAULT_KEEP_VERSIONS, minimum=1),
            dedup_window=r.int("DEDUP_WINDOW", DEFAULT_DEDUP_WINDOW, minimum=1),
            max_staleness=r.int("MAX_STALENESS", DEFAULT_MAX_STALENESS, minimum=0),
            train_group=r.int("TRAIN_GROUP", MAX_TRAIN_GROUP, minimum=1, maximum=MAX_BATCH_SIZE),
            train_group_max=r.int("TRAIN_GROUP_MAX", DEFAULT_TRAIN_GROUP_MAX, minimum=1, maximum=MAX_BATCH_SIZE),
            train_turns=r.bool("TRAIN_TURNS", True),
            max_input_elements=r.int("MAX_INPUT_ELEMENTS", DEFAULT_MAX_INPUT_ELEMENTS, minimum=1),
            max_message_bytes=r.int("MAX_MESSAGE_BYTES", DEFAULT_MAX_MESSAGE_BYTES, minimum=1024),
            track_started=r.bool("TRACK_STARTED", False),
            amp=r.choice("AMP", "off", {"off", "bf16", "fp16"}),
            compile=r.bool("COMPILE", False),
            plugins=tuple(p.strip() for p in r.str("PLUGINS", "", allow_empty=True).split(",") if p.strip()),
            metrics_port=r.int("METRICS_PORT", 0, minimum=0),
            preprocess_threads=r.int("PREPROCESS_THREADS", 2, minimum=0, maximum=256),
            inference_queue=r.str("INFERENCE_QUEUE", "inference"),
            training_queue=r.str("TRAINING_QUEUE", "training"),
            ready_file=r.str("READY_FILE", "", allow_empty=True),
            commit_mode=r.choice("COMMIT_MODE", "optimistic", _COMMIT_MODES),
            wait_aof=r.bool("WAIT_AOF", False),
            lock_timeout=r.float("LOCK_TIMEOUT", DEFAULT_LOCK_TIMEOUT, minimum=0.1, maximum=MAX_LOCK_TIMEOUT),
            chunk_bytes=r.int("CHUNK_BYTES", DEFAULT_CHUNK_BYTES, minimum=1024),
            torch_threads=r.int("TORCH_THREADS", 1, minimum=0),
            malloc_tuning=r.bool("MALLOC_TUNING", True),
            queue_type=r.choice("QUEUE_TYPE", "classic", _QUEUE_TYPES),
            queue_max_priority=r.int("QUEUE_MAX_PRIORITY", 0, minimum=0),
            sentinel_master=r.str("SENTINEL_MASTER", DEFAULT_SENTINEL_MASTER),
            max_queue_size=r.int("MAX_QUEUE_SIZE", 0, minimum=0),
            min_version_wait_ms=r.float(
                "MIN_VERSION_WAIT_MS", DEFAULT_MIN_VERSION_WAIT_MS, minimum=0.0, maximum=MAX_WAIT_MS
            ),
            result_retry_s=r.float("RESULT_RETRY_S", DEFAULT_RESULT_RETRY_S, minimum=0.1, maximum=MAX_WAIT_MS / 1000),
            max_eta_s=r.float("MAX_ETA_S", DEFAULT_MAX_ETA_S, minimum=0.0, maximum=MAX_SECONDS),
            result_cache_size=r.int("RESULT_CACHE_SIZE", 0, minimum=0),
            model_cache_bytes=r.int("MODEL_CACHE_BYTES", 0, minimum=0),
            dataset_cache_bytes=r.int("DATASET_CACHE_BYTES", DEFAULT_DATASET_CACHE_BYTES, minimum=0),
        )
        settings.validate()
        return settings

    def validate(self) -> None:
        """Refuse combinations that cannot work. Raises: ConfigError: naming the variable to change."""
        if not _valid_device(self.device):
            raise ConfigError(f"AGENT_WORKERS_DEVICE={self.device!r} is not a device; use auto, cpu, cuda or cuda:N")
        if self.broker_is_redis and self.visibility_timeout <= self.task_time_limit:
            raise ConfigError(
                f"AGENT_WORKERS_VISIBILITY_TIMEOUT={self.visibility_timeout}s must exceed "
                f"AGENT_WORKERS_TASK_TIME_LIMIT={self.task_time_limit}s, or Redis redelivers running tasks; "
                "raise the visibility timeout or lower the time limit"
            )
        if self.chunk_bytes > MAX_CHUNK_BYTES:
            raise ConfigError(
                f"AGENT_WORKERS_CHUNK_BYTES={self.chunk_bytes} exceeds Redis's 512 MiB value limit; set it lower"
            )
        if self.queue_type == "quorum" and urlparse(self.broker_url).scheme not in _AMQP_SCHEMES:
            raise ConfigError(
                "AGENT_WORKERS_QUEUE_TYPE=quorum needs a RabbitMQ broker (amqp://); quorum queues are a RabbitMQ "
                "feature. Unset it or point AGENT_WORKERS_BROKER_URL at RabbitMQ"
            )
        if self.queue_max_priority > MAX_QUEUE_PRIORITY:
            raise ConfigError(
                f"AGENT_WORKERS_QUEUE_MAX_PRIORITY={self.queue_max_priority}: RabbitMQ allows 1 to "
                f"{MAX_QUEUE_PRIORITY} (10 or less is what its docs recommend)"
            )
        if self.queue_max_priority and self.queue_type == "quorum":
            raise ConfigError(
                "AGENT_WORKERS_QUEUE_MAX_PRIORITY needs classic queues: quorum queues do not take x-max-priority"
            )
        for name, url in (
            ("BROKER_URL", self.broker_url),
            ("RESULT_BACKEND", self.result_backend),
            ("PARAMS_URL", self.params_url),
        ):
            problem = sentinel_url_problem(url)
            if problem:
                raise ConfigError(f"AGENT_WORKERS_{name}: {problem}")
        if not self.namespace.replace("-", "").replace("_", "").isalnum():
            raise ConfigError(
                f"AGENT_WORKERS_NAMESPACE={self.namespace!r} must be letters, digits, '-' or '_' (it prefixes keys)"
            )

    def to_env(self) -> dict[str, str]:
        """These settings as ``AGENT_WORKERS_*`` variables (``Settings.from_env(s.to_env()) == s``), for workers."""
        env: dict[str, str] = {}
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if field.name == "batch":
                env.update({PREFIX + name: _env_value(getattr(value, attr)) for attr, name in _BATCH_VARIABLES.items()})
            else:
                env[PREFIX + field.name.upper()] = _env_value(value)
        return env

    @property
    def broker_is_redis(self) -> bool:
        """True when the broker is Redis (visibility timeout applies)."""
        return urlparse(self.broker_url).scheme in _REDIS_SCHEMES


#: BatchSettings attribute -> variable name (without the prefix): the attribute in capitals, BATCH_MODE for ``mode``.
_BATCH_VARIABLES = {
    f.name: "BATCH_MODE" if f.name == "mode" else f.name.upper() for f in dataclasses.fields(BatchSettings)
}


def unknown_variables(environ: Mapping[str, str] | None = None) -> list[tuple[str, str | None]]:
    """``AGENT_WORKERS_*`` variables no setting reads (a typo would be ignored), each with the nearest valid name."""
    env = os.environ if environ is None else environ
    known = set(Settings().to_env())
    return [
        (name, next(iter(difflib.get_close_matches(name, known, n=1, cutoff=0.6)), None))
        for name in sorted(env)
        if name.startswith(PREFIX) and name not in known
    ]


def _env_value(value: object) -> str:
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, tuple):
        return ",".join(value)
    return str(value)


def _allowed(kind: str, minimum: float, maximum: float | None) -> str:
    return f"{kind} >= {minimum}" if maximum is None else f"{kind} from {minimum} to {maximum}"


def _valid_device(device: str) -> bool:
    if device in {"auto", "cpu", "cuda"}:
        return True
    head, _, index = device.partition(":")
    return head == "cuda" and index.isdigit()


class _Reader:
    """Typed access to ``AGENT_WORKERS_*`` variables with errors that name the variable."""

    def __init__(self, env: Mapping[str, str]) -> None:
        self._env = env

    def _raw(self, name: str) -> str | None:
        value = self._env.get(PREFIX + name)
        return None if value is None or value.strip() == "" else value.strip()

    def str(self, name: str, default: str, *, allow_empty: bool = False) -> str:
        value = self._raw(name)
        return default if value is None else value

    def int(self, name: str, default: int, *, minimum: int, maximum: int | None = None) -> int:
        value = self._raw(name)
        if value is None:
            return default
        allowed = _allowed("a whole number", minimum, maximum)
        try:
            number = int(value)
        except ValueError:
            raise ConfigError(f"{PREFIX}{name}={value!r} is not an integer; set {allowed}") from None
        if number < minimum:
            raise ConfigError(f"{PREFIX}{name}={number} is too small; set {allowed}")
        if maximum is not None and number > maximum:
            raise ConfigError(f"{PREFIX}{name}={number} is too large; set {allowed}")
        return number

    def float(self, name: str, default: float, *, minimum: float, maximum: float | None = None) -> float:
        value = self._raw(name)
        if value is None:
            return default
        allowed = _allowed("a finite number", minimum, maximum)
        try:
            number = float(value)
        except ValueError:
            raise ConfigError(f"{PREFIX}{name}={value!r} is not a number; set {allowed}") from None
        if not math.isfinite(number):
            raise ConfigError(f"{PREFIX}{name}={value!r} is not finite; set {allowed}")
        if not number >= minimum:
            raise ConfigError(f"{PREFIX}{name}={number} is too small; set {allowed}")
        if maximum is not None and number > maximum:
            raise ConfigError(f"{PREFIX}{name}={number} is too large; set {allowed}")
        return number

    def bool(self, name: str, default: bool) -> bool:
        value = self._raw(name)
        if value is None:
            return default
        lowered = value.lower()
        if lowered in {"1", "true", "yes", "on"}:
            return True
        if lowered in {"0", "false", "no", "off"}:
            return False
        raise ConfigError(f"{PREFIX}{name}={value!r} is not a boolean; use 1/0, true/false, yes/no or on/off")

    def choice(self, name: str, default: str, choices: set[str]) -> str:
        value = self._raw(name)
        if value is None:
            return default
        if value not in choices:
            raise ConfigError(f"{PREFIX}{name}={value!r} is not one of {', '.join(sorted(choices))}")
        return value

    def url(self, name: str, default: str, schemes: set[str]) -> str:
        value = self._raw(name) or default
        scheme = urlparse(value).scheme
        if scheme not in schemes:
            raise ConfigError(
                f"{PREFIX}{name}={value!r} has scheme {scheme or '(none)'!r}; use one of "
                + ", ".join(f"{s}://" for s in sorted(schemes))
            )
        return value
