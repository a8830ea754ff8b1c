"""The Celery app: JSON only, late acks, queues routed by task name, results in Redis with an expiry."""

from __future__ import annotations

import ssl
from functools import cached_property
from typing import Any
from urllib.parse import parse_qs, urlparse

from celery import Celery

from agent_workers.config import Settings
from agent_workers.contract import queues, task_routes
from agent_workers.store.params import RedisParamStore
from agent_workers.training.datasets import DatasetStore
from agent_workers.worker.bootsteps import BatcherStep, DeadLetterQueues, QueueDepthStep, SignalWakeup, StartupChecks
from agent_workers.worker.inference import InferenceEngine
from agent_workers.worker.reclaim import ReclaimStep


class WorkerApp(Celery):
    """A Celery app that carries our settings and, lazily, the parameter store and the inference engine."""

    settings: Settings

    @cached_property
    def store(self) -> RedisParamStore:
        return RedisParamStore.from_settings(self.settings)

    @cached_property
    def datasets(self) -> DatasetStore:
        return DatasetStore.from_settings(self.settings)

    @cached_property
    def engine(self) -> InferenceEngine:
        return InferenceEngine(store=self.store, settings=self.settings)


def create_app(settings: Settings | None = None, **extra_conf: Any) -> WorkerApp:
    """Build the Celery app for ``settings`` (read from the environment when omitted)."""
    from agent_workers.worker import control  # noqa: F401 - registers the `celery inspect models` command

    settings = settings or Settings.from_env()
    app = WorkerApp(
        "agent_workers",
        broker=settings.broker_url,
        backend=settings.result_backend,
        include=["tasks.inference", "tasks.training"],
        set_as_current=False,
    )
    app.settings = settings
    # Redis broker: an unacknowledged message returns after the visibility timeout, found by a sweep that kombu
    # runs only every interval × throttle seconds (100 s by default); sweep at a quarter of the timeout instead.
    transport_options: dict[str, Any] = {
        "visibility_timeout": settings.visibility_timeout,
        "unacked_restore_interval": max(1, min(10, settings.visibility_timeout // 4)),
        "unacked_restore_throttle": 1,
    }
    backend_options: dict[str, Any] = {"visibility_timeout": settings.visibility_timeout}
    if urlparse(settings.broker_url).scheme == "sentinel":
        transport_options["master_name"] = settings.sentinel_master
    if urlparse(settings.result_backend).scheme == "sentinel":
        backend_options["master_name"] = settings.sentinel_master
    quorum = settings.queue_type == "quorum"
    if quorum:
        # Quorum queues confirm a publish only once a majority stored it; wait for that (the worker's own
        # publishes: retries, results of other backends). Celery's docs ask for it with quorum queues.
        transport_options["confirm_publish"] = True
    conf: dict[str, Any] = dict(
        task_serializer="json",
        result_serializer="json",
        # msgpack (contract 1.3): tensors as raw bytes; kombu's serializer packs bytes as msgpack bin, never pickle.
        # Results stay JSON, the one format every producer (and AsyncResult.get()) reads.
        accept_content=["json", "msgpack"],
        result_accept_content=["json"],
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        task_retry_on_worker_lost=True,
        task_acks_on_failure=True,
        task_queues=list(queues(settings).values()),
        task_default_queue=settings.inference_queue,
        task_routes=task_routes(settings),
        task_time_limit=settings.task_time_limit,
        result_expires=settings.result_expires,
        result_backend_always_retry=True,
        broker_transport_options=transport_options,
        result_backend_transport_options=backend_options,
        broker_connection_retry_on_startup=True,
        worker_send_task_events=True,
        worker_cancel_long_running_tasks_on_connection_loss=True,
        worker_proc_alive_timeout=60,
        worker_pool_start_method="spawn",
        worker_hijack_root_logger=True,
        worker_enable_soft_shutdown_on_idle=True,
        worker_soft_shutdown_timeout=10.0,
        # Quorum queues refuse a global QoS; Celery then uses a per-consumer prefetch (static: no autoscale).
        worker_detect_quorum_queues=True,
    )
    conf.update(extra_conf)
    app.conf.update(conf)
    app.steps["consumer"].add(BatcherStep)
    app.steps["consumer"].add(QueueDepthStep)
    app.steps["consumer"].add(ReclaimStep)
    app.steps["consumer"].add(SignalWakeup)
    app.steps["worker"].add(StartupChecks)
    if quorum:
        app.steps["consumer"].add(DeadLetterQueues)
    scheme = urlparse(settings.broker_url).scheme
    if scheme in AMQP_TRANSPORTS:
        # The same transport plus a signal when the socket is empty: see agent_workers/worker/kombu_amqp.py.
        app.conf.broker_transport = AMQP_TRANSPORTS[scheme]
    transport = REDIS_TRANSPORTS.get(scheme)
    if transport is not None:
        # Same wire format, fewer round trips, nothing lost to a SIGKILL: see agent_workers/worker/kombu_redis.py.
        app.conf.broker_transport = transport
        if urlparse(settings.broker_url).scheme == "rediss" and not app.conf.broker_use_ssl:
            # kombu turns TLS on from the 'rediss' scheme only when it picks the transport itself.
            app.conf.broker_use_ssl = tls_options(settings.broker_url)
    return app


#: The loss-free bulk transport for each Redis broker scheme.
REDIS_TRANSPORTS = {
    "redis": "agent_workers.worker.kombu_redis:Transport",
    "rediss": "agent_workers.worker.kombu_redis:Transport",
    "sentinel": "agent_workers.worker.kombu_redis:SentinelTransport",
}
#: py-amqp with the idle signal (``amqps://`` keeps kombu's own TLS transport, which waits out max_wait_ms).
AMQP_TRANSPORTS = {
    "amqp": "agent_workers.worker.kombu_amqp:Transport",
    "pyamqp": "agent_workers.worker.kombu_amqp:Transport",
}
_CERT_REQS = {"none": ssl.CERT_NONE, "optional": ssl.CERT_OPTIONAL, "required": ssl.CERT_REQUIRED}


def tls_options(url: str) -> dict[str, Any]:
    """kombu's ``ssl`` options from a ``rediss://`` URL's query (``ssl_cert_reqs``, ``ssl_ca_certs``,
    ``ssl_certfile``, ``ssl_keyfile``); certificates are verified unless the URL says ``ssl_cert_reqs=none``."""
    query = {k: v[-1] for k, v in parse_qs(urlparse(url).query).items()}
    reqs = query.get("ssl_cert_reqs", "required").lower().removeprefix("cert_")
    options: dict[str, Any] = {"ssl_cert_reqs": _CERT_REQS.get(reqs, ssl.CERT_REQUIRED)}
    for key in ("ssl_ca_certs", "ssl_certfile", "ssl_keyfile"):
        if key in query:
            options[key] = query[key]
    return options
