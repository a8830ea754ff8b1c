"""The task contract in one place (docs/tasks.md): task names, queues and routes, argument binding, and the
result record with its states. Producers and workers both import it; it never imports torch."""

from __future__ import annotations

from typing import Any, NamedTuple

from kombu import Exchange, Queue

from agent_workers import numbers
from agent_workers.config import Settings
from agent_workers.errors import InputError
from agent_workers.outputs import OutputOptions, parse_options

PREDICT = "agent_workers.predict"
PREDICT_MANY = "agent_workers.predict_many"
TRAIN_STEP = "agent_workers.train_step"
FIT = "agent_workers.fit"

INFERENCE_TASKS = (PREDICT, PREDICT_MANY)
TRAINING_TASKS = (TRAIN_STEP, FIT)

#: Quorum queues: deliveries of one message (RabbitMQ counts returns: a rejected message, or one its consumer's
#: channel closed on) before RabbitMQ dead-letters it to ``<queue>.dead``. The batcher fails a request that
#: crashed its worker twice on its own (batching.MAX_DELIVERIES); this is the broker's backstop, above it.
QUORUM_DELIVERY_LIMIT = 5
DEAD_LETTER_SUFFIX = ".dead"


def task_routes(settings: Settings) -> dict[str, dict[str, str]]:
    """Route every task by name to its queue, so producers that never import us still land right."""
    routes = {name: {"queue": settings.inference_queue} for name in INFERENCE_TASKS}
    routes.update({name: {"queue": settings.training_queue} for name in TRAINING_TASKS})
    return routes


def declare_queue(name: str, queue_type: str = "classic", max_priority: int = 0) -> Queue:
    """A durable direct queue declared exactly as a bare Celery producer or a Node client declares it, so RabbitMQ
    never refuses a mismatched redeclaration.

    ``classic`` has no arguments, or only ``x-max-priority`` when ``max_priority`` is set
    (``AGENT_WORKERS_QUEUE_MAX_PRIORITY``). ``quorum`` carries ``x-queue-type: quorum``, ``x-delivery-limit`` and a
    dead-letter exchange ``<queue>.dead``. Every producer that declares the queue must pass exactly these
    arguments (RabbitMQ answers ``PRECONDITION_FAILED - inequivalent arg`` otherwise; docs/operations.md).
    """
    if queue_type == "quorum":
        return Queue(name, Exchange(name, type="direct"), routing_key=name, queue_arguments=quorum_arguments(name))
    if max_priority:
        arguments = {"x-max-priority": max_priority}
        return Queue(name, Exchange(name, type="direct"), routing_key=name, queue_arguments=arguments)
    return Queue(name, Exchange(name, type="direct"), routing_key=name)


def queues(settings: Settings) -> dict[str, Queue]:
    """The inference and training queues by name, declared as every producer (the CLI, :class:`Client`, its
    publisher) and the worker declare them: one declaration, so a setting that changes a queue argument
    (``AGENT_WORKERS_QUEUE_TYPE``, ``AGENT_WORKERS_QUEUE_MAX_PRIORITY``) changes it everywhere at once."""
    return {
        name: declare_queue(name, settings.queue_type, settings.queue_max_priority)
        for name in (settings.inference_queue, settings.training_queue)
    }


def quorum_arguments(name: str) -> dict[str, Any]:
    """The queue arguments of quorum queue ``name``."""
    return {
        "x-queue-type": "quorum",
        "x-delivery-limit": QUORUM_DELIVERY_LIMIT,
        "x-dead-letter-exchange": name + DEAD_LETTER_SUFFIX,
    }


def dead_letter_queue(name: str) -> Queue:
    """``<name>.dead``: where RabbitMQ moves a message of quorum queue ``name`` past its delivery limit.

    Its exchange is a fanout, so dead letters land here whatever routing key they carried. Nobody consumes it:
    inspect it (``rabbitmqctl list_queues``, the management UI) and republish or drop by hand.
    """
    dead = name + DEAD_LETTER_SUFFIX
    return Queue(dead, Exchange(dead, type="fanout"), routing_key=dead, queue_arguments={"x-queue-type": "quorum"})


# -- arguments ------------------------------------------------------------------------------------------------------


class PredictCall(NamedTuple):
    """A checked ``predict(model, inputs, version=None, min_version=None, deadline_ms=None, options=None)`` call."""

    model: str
    inputs: Any
    version: int | None
    min_version: int | None = None
    deadline_ms: int | None = None
    options: OutputOptions | None = None


#: The latest ``deadline_ms`` accepted: the end of year 9999 (a later one is a unit or arithmetic mistake).
MAX_DEADLINE_MS = 253_402_300_800_000


def _optional(name: str, value: Any, high: int) -> int | None:
    return None if value is None else numbers.integer(name, value, low=0, high=high)


def _bind_predict(
    model: Any, inputs: Any, version: Any = None, min_version: Any = None, deadline_ms: Any = None, options: Any = None
) -> PredictCall:
    if not isinstance(model, str):
        raise InputError(f"model must be a model name (a string), got {type(model).__name__}")
    version = _optional("version", version, numbers.INT64_MAX)
    min_version = _optional("min_version", min_version, numbers.INT64_MAX)
    deadline_ms = _optional("deadline_ms", deadline_ms, MAX_DEADLINE_MS)
    if version is not None and min_version is not None and version < min_version:
        raise InputError(f"version {version} is pinned below min_version {min_version}; drop one of them")
    return PredictCall(model, inputs, version, min_version, deadline_ms, parse_options(options))


def bind_predict_call(args: list[Any], kwargs: dict[str, Any]) -> PredictCall:
    """Check a predict call's arguments against ``predict(model, inputs, version=None, min_version=None,
    deadline_ms=None, options=None)`` (contract 1.1 added min_version and deadline_ms, 1.3 options; docs/tasks.md).

    Raises:
        InputError: naming the argument that does not fit.
    """
    try:
        return _bind_predict(*args, **kwargs)
    except TypeError as exc:
        raise InputError(
            "agent_workers.predict takes (model, inputs, version=None) and, since contract 1.1, the optional "
            f"min_version and deadline_ms, since 1.3 options: {exc}"
        ) from None


def bind_predict(args: list[Any], kwargs: dict[str, Any]) -> tuple[str, Any, int | None]:
    """:func:`bind_predict_call`, reduced to ``(model, inputs, version)``."""
    call = bind_predict_call(args, kwargs)
    return call.model, call.inputs, call.version


# -- results --------------------------------------------------------------------------------------------------------

#: Where Celery's Redis backend stores a task's result record (``get_key_for_task``, no global key prefix).
RESULT_KEY_PREFIX = "celery-task-meta-"
#: The final states: once one is stored, the task id has its answer.
READY_STATES = frozenset({"SUCCESS", "FAILURE", "REVOKED"})


def result_record(
    task_id: str,
    status: str,
    result: Any,
    *,
    traceback: str | None = None,
    date_done: str | None = None,
    parent_id: str | None = None,
    group_id: str | None = None,
) -> dict[str, Any]:
    """The result record Celery's backends store for a task (``BaseBackend._get_result_meta``), as a dict.

    Args:
        date_done: ISO 8601; set for final states only.
        parent_id, group_id: included only when set, as Celery does.
    """
    record: dict[str, Any] = {
        "status": status,
        "result": result,
        "traceback": traceback,
        "children": [],
        "date_done": date_done,
        "task_id": task_id,
    }
    if parent_id:
        record["parent_id"] = parent_id
    if group_id:
        record["group_id"] = group_id
    return record
