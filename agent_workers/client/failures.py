"""A stored failure as the exception it stands for: ours by class name, anything else as Celery rebuilds it."""

from __future__ import annotations

from typing import Any

from celery import Celery
from celery.exceptions import TimeoutError as ResultTimeout
from celery.result import AsyncResult

from agent_workers import errors
from agent_workers.errors import AgentWorkersError

_ERRORS: dict[str, type[AgentWorkersError]] = {name: getattr(errors, name) for name in errors.__all__}


def outcome(app: Celery, meta: dict[str, Any], task_id: str, return_exceptions: bool) -> Any:
    """A result record's value, or its failure as an exception (raised, or returned with ``return_exceptions``)."""
    if meta["status"] == "SUCCESS":
        return meta["result"]
    error = error_from(app, meta["result"])
    error.task_id = task_id  # type: ignore[attr-defined]
    if return_exceptions:
        return error
    raise error


def unwrap_celery(handle: AsyncResult, timeout: float, return_exceptions: bool) -> Any:
    """``handle.get()``, a failure of ours mapped to our class (a backend other than Redis)."""
    try:
        return handle.get(timeout=timeout, disable_sync_subtasks=False)
    except ResultTimeout:
        raise
    except Exception as exc:  # noqa: BLE001 - mapped to ours or handed back as is
        mapped = _ERRORS.get(type(exc).__name__)
        error = mapped(*exc.args) if mapped is not None and not isinstance(exc, mapped) else exc
        if return_exceptions:
            return error
        raise error from (exc if error is not exc else None)


def error_from(app: Celery, payload: Any) -> BaseException:
    """The exception a stored failure stands for: ours by class name, anything else as Celery rebuilds it.

    ``payload`` is Celery's failure format ``{"exc_type", "exc_message", "exc_module"}`` (docs/tasks.md).
    """
    if isinstance(payload, dict):
        cls = _ERRORS.get(str(payload.get("exc_type")))
        if cls is not None and payload.get("exc_module", errors.__name__) == errors.__name__:
            args = payload.get("exc_message")
            args = list(args) if isinstance(args, (list, tuple)) else [args]
            try:
                return cls(*args)
            except TypeError:
                return cls(" ".join(map(str, args)))
    try:
        exc = app.backend.exception_to_python(payload)
    except Exception as err:  # noqa: BLE001 - an unknown or malformed payload still tells what happened
        return RuntimeError(f"task failed: {payload!r} ({err})")
    return exc if isinstance(exc, BaseException) else RuntimeError(f"task failed: {payload!r}")
