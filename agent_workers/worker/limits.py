"""Limits every task shares: a message over ``AGENT_WORKERS_MAX_MESSAGE_BYTES`` fails before it is decoded.

Celery's default strategy decodes the body and builds a ``Request`` before any task code runs, so the size check
wraps the strategy (:class:`LimitedTask`); the batched ``predict`` has the same check in its own strategy.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

from celery import Task
from celery.worker.strategy import default as default_strategy

from agent_workers.errors import InputError

log = logging.getLogger(__name__)


def too_large(size: int, limit: int) -> InputError:
    """The error of a message of ``size`` bytes over ``limit``."""
    return InputError(f"message is {size} bytes; the limit is {limit} (AGENT_WORKERS_MAX_MESSAGE_BYTES)")


def limited_strategy(task: Any, app: Any, consumer: Any, **kwargs: Any) -> Callable[..., Any]:
    """Celery's default strategy behind a size check: an oversized message fails alone (FAILURE stored under its
    task id when it has one) and is acknowledged, without being decoded."""
    handle = default_strategy(task, app, consumer, **kwargs)
    limit = app.settings.max_message_bytes

    def on_message(
        message: Any, body: Any, ack: Callable[..., Any], reject: Callable[..., Any], callbacks: Any, **kw: Any
    ) -> Any:
        size = len(message.body or b"")
        if size <= limit:
            return handle(message, body, ack, reject, callbacks, **kw)
        task_id = (message.headers or {}).get("id")
        error = too_large(size, limit)
        log.warning("refusing message %.80r of task %s: %s", task_id, task.name, error)
        if isinstance(task_id, str) and 0 < len(task_id) <= 255:
            app.backend.mark_as_failure(task_id, error)
        message.ack()
        return None

    return on_message


def deadline(app: Any) -> float:
    """``time.monotonic()`` at which a task started now reaches ``AGENT_WORKERS_TASK_TIME_LIMIT``: the threads pool
    does not enforce Celery's time limits, so long tasks check this between steps."""
    return time.monotonic() + app.settings.task_time_limit


class LimitedTask(Task):
    """A task whose messages are size-checked before they are decoded (see :func:`limited_strategy`)."""

    Strategy = "agent_workers.worker.limits:limited_strategy"
