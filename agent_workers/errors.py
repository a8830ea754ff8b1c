"""The whole exception tree of agent-workers.

    AgentWorkersError                 root: catch everything of ours
    ├── ConfigError                   bad settings, raised at start-up, never mid-task
    ├── InputError                    a request that cannot be served (shape, type, size, NaN)
    ├── ModelError                    unknown model, unknown version, load or forward failure
    └── StoreError                    the parameter store
        ├── VersionConflictError      compare-and-set lost; carries expected and actual
        └── StoreUnavailableError     Redis could not be reached (wraps the redis error)
            └── PublishError          the broker did not take (all of) a publish; says which rows went out
    ResultTimeout                     (also ``celery.exceptions.TimeoutError``) results not ready by the deadline

Every exception keeps its context in ``args`` so that it survives the JSON result backend: Celery stores
``type(exc).__qualname__``, ``__module__`` and ``args`` and rebuilds the exception from them on the client.
"""

from __future__ import annotations

from collections.abc import Sequence

from celery.exceptions import TimeoutError as _CeleryTimeout


class AgentWorkersError(Exception):
    """Root of every error raised by agent-workers."""

    def __init__(self, message: str, *args: object) -> None:
        super().__init__(message, *args)
        self.message = message

    def __str__(self) -> str:
        return self.message


class ConfigError(AgentWorkersError):
    """Settings that cannot work; raised at start-up with the fix in the message."""


class InputError(AgentWorkersError):
    """A request that cannot be served as sent; fails only that request."""


class ModelError(AgentWorkersError):
    """Unknown model or version, or a model that failed to load or to run."""


class StoreError(AgentWorkersError):
    """The parameter store refused or failed an operation."""


class VersionConflictError(StoreError):
    """A compare-and-set commit lost: the head moved from ``expected`` to ``actual``."""

    def __init__(self, message: str, expected: int = -1, actual: int = -1) -> None:
        super().__init__(message, expected, actual)
        self.expected = expected
        self.actual = actual


class StoreUnavailableError(StoreError):
    """Redis could not be reached or timed out; transient, safe to retry."""


class PublishError(StoreUnavailableError):
    """The broker did not take all of a publish, or did not say so before the deadline; nothing is sent twice.

    Every row of the call is in exactly one of three lists of row indices: ``queued`` (the broker took it: collect
    ``ids[i]``), ``not_sent`` (known not queued: sending it again cannot duplicate it) and ``unknown`` (sent, but
    the broker's answer was lost: collect ``ids[i]`` to learn whether it was served). ``ids`` are the task ids of
    all rows, in row order.
    """

    def __init__(
        self,
        message: str,
        ids: Sequence[str] = (),
        queued: Sequence[int] = (),
        not_sent: Sequence[int] = (),
        unknown: Sequence[int] = (),
    ) -> None:
        super().__init__(message, list(ids), list(queued), list(not_sent), list(unknown))
        self.ids = list(ids)
        self.queued = list(queued)
        self.not_sent = list(not_sent)
        self.unknown = list(unknown)


class ResultTimeout(AgentWorkersError, _CeleryTimeout):
    """Some results were not ready within the call's timeout; also a ``celery.exceptions.TimeoutError``.

    ``ids`` are the task ids of the call (in order) and ``pending`` those without a final result yet: they may
    still be answered, so collect them later instead of sending again. ``partial`` maps the index of every row that
    was answered to its outcome (a value, or the row's error).
    """

    def __init__(self, message: str, ids: Sequence[str] = (), pending: Sequence[str] = ()) -> None:
        super().__init__(message, list(ids), list(pending))
        self.ids = list(ids)
        self.pending = list(pending)
        self.partial: dict[int, object] = {}


__all__ = [
    "AgentWorkersError",
    "ConfigError",
    "InputError",
    "ModelError",
    "PublishError",
    "ResultTimeout",
    "StoreError",
    "StoreUnavailableError",
    "VersionConflictError",
]
